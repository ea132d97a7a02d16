"""The HTTP API's contract: an OpenAPI 3.1 document, served at ``/openapi.json``.

Built from the code it describes where it can be (the problem types from
:mod:`sidecar.errors`, the limits from :mod:`sidecar.http_api`), so it cannot
drift from them; the repository keeps the rendered copy (``openapi.json``,
``python -m sidecar.openapi > openapi.json``) and a test fails when the two
differ or when a route is missing.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from . import __version__
from .errors import PROBLEM_BASE, SidecarError

__all__ = ["document", "problem_types"]

_JSON = "application/json"
_PROBLEM = "application/problem+json"

# Tunables of the HTTP layer that the contract states; http_api imports these.
MAX_BATCH_KEYS = 256
MAX_INVALIDATE_ITEMS = 1000


def problem_types() -> dict[str, tuple[int, str]]:
    """Every problem ``type`` the API can answer: URI -> (status, title)."""
    found: dict[str, tuple[int, str]] = {}
    pending: list[type[SidecarError]] = [SidecarError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.status >= 400 and cls.problem != "internal-error":
            found[PROBLEM_BASE + cls.problem] = (cls.status, cls.title)
    return dict(sorted(found.items()))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_PROBLEM: {"schema": _ref("Problem")}}}


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


_ETAG = _header('The key\'s version as a strong entity tag, "<digits>"', {"type": "string", "pattern": '^"[0-9]+"$'})
_X_CACHE = _header(
    "hit (served from this sidecar's cache), miss (read through), bypass (origin read while ZooKeeper is "
    "unavailable: not cached, no ETag)",
    {"type": "string", "enum": ["hit", "miss", "bypass"]},
)
_VALUE_CACHE_CONTROL = _header(
    "private, no-cache: an HTTP cache in the client may store the value but must revalidate it (If-None-Match) "
    "before each use; no-store on bypass reads"
)
_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "1 to 1024 bytes of UTF-8; percent-encode '?', '#', '%' and whole '.'/'..' segments; "
    "'a/b' and 'a%2Fb' name the same key",
    "schema": {"type": "string", "minLength": 1},
}
_BOOLEAN_QUERY = {"type": "string", "enum": ["true", "false", "1", "0"]}
_CONSISTENCY = {
    "name": "consistency",
    "in": "query",
    "description": "eventual (hits served locally) or strong (a ZooKeeper sync per read); default: the "
    "consistency setting",
    "schema": {"type": "string", "enum": ["eventual", "strong"]},
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "description": "One strong entity tag (the ETag of a read): the write applies only if it is still the "
    "key's version, else 412; a weak tag (W/...) never matches: 412; empty: no condition",
    "schema": {"type": "string", "pattern": '^[ \\t]*("[0-9]{1,19}")?[ \\t]*$'},
}
_COMMON_ERRORS = {
    "400": _problem("Bad request: a bad key, header, query or body"),
    "401": {
        **_problem("Missing or wrong bearer token (only when auth_token is set)"),
        "headers": {"WWW-Authenticate": _header('Bearer realm="zk-cache-sidecar"')},
    },
}
_BODY_ERRORS = {
    "408": _problem("The body did not arrive within http_body_timeout"),
    "413": _problem("The body exceeds its limit (max_value_bytes for a value)"),
    "415": {
        **_problem("The body has a Content-Encoding: bodies are stored as sent, never decoded"),
        "headers": {"Accept-Encoding": _header("identity")},
    },
}
_UNAVAILABLE = {
    "502": _problem("The origin failed"),
    "503": {
        **_problem(
            "ZooKeeper unavailable, a write's lock or outcome, or too much in flight (busy: retry after Retry-After)"
        ),
        "headers": {"Retry-After": _header("Seconds to wait, on busy", {"type": "string", "pattern": "^[0-9]+$"})},
    },
    "504": _problem("The origin timed out, only-if-cached on a key not cached here, or an unacknowledged wait"),
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": schema}}}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}, **extra}


def _read_responses() -> dict[str, Any]:
    return {
        "200": {
            "description": "The value, with the Content-Type it was written with",
            "headers": {"ETag": _ETAG, "X-Cache": _X_CACHE, "Cache-Control": _VALUE_CACHE_CONTROL},
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        "304": {
            "description": "If-None-Match matched: the client's copy is current",
            "headers": {"ETag": _ETAG, "X-Cache": _X_CACHE, "Cache-Control": _VALUE_CACHE_CONTROL},
        },
        **_COMMON_ERRORS,
        "403": _problem("GET ?fill=true over a read-through origin with fills = auto"),
        "404": {
            **_problem("The origin has no value; in cache-aside mode, not cached, with the lease as ETag"),
            "headers": {"ETag": _ETAG},
        },
        "412": _problem("If-Match did not match the current version"),
        **_UNAVAILABLE,
    }


def _write_responses(ok: dict[str, Any]) -> dict[str, Any]:
    return {
        **ok,
        **_COMMON_ERRORS,
        "403": _problem("PUT ?fill=true over a read-through origin with fills = auto"),
        "412": {
            **_problem("If-Match or If-None-Match failed; the current version is in current_version and ETag"),
            "headers": {"ETag": _ETAG},
        },
        "428": _problem("PUT ?fill=true without If-Match"),
        **_BODY_ERRORS,
        **_UNAVAILABLE,
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the sidecar's HTTP API."""
    get_key = {
        "summary": "Read a key: a hit, or read through the origin on a miss",
        "operationId": "getKey",
        "parameters": [
            _KEY,
            _CONSISTENCY,
            {
                "name": "fill",
                "in": "query",
                "description": "Cache-aside: a miss answers 404 with a lease as ETag instead of reading the origin",
                "schema": _BOOLEAN_QUERY,
            },
            {
                "name": "If-None-Match",
                "in": "header",
                "description": "Entity tags (weak comparison) or *: 304 when one matches",
                "schema": {"type": "string"},
            },
            {
                "name": "If-Match",
                "in": "header",
                "description": "Entity tags or *: 412 unless one strong tag matches the current version",
                "schema": {"type": "string"},
            },
            {
                "name": "Cache-Control",
                "in": "header",
                "description": "only-if-cached: 504 rather than reading the origin on a miss",
                "schema": {"type": "string"},
            },
        ],
        "responses": _read_responses(),
    }
    ack = {
        "acknowledged_by": {"type": "array", "items": {"type": "string"}},
        "not_confirmed": {"type": "array", "items": {"type": "string"}},
    }
    receipt = {
        "type": "object",
        "required": ["keys", "prefixes", "all"],
        "properties": {
            "keys": {"description": "Each key's new version"},
            "prefixes": {"description": "Each prefix's sequence number in the prefix log"},
            "all": {"type": "boolean"},
            "epoch": {"type": ["integer", "null"]},
            "zxid": {"type": ["integer", "null"]},
            **ack,
        },
    }
    string_list = {"type": "array", "items": {"type": "string", "minLength": 1}}
    batch_result = {
        "type": "object",
        "required": ["key", "status"],
        "properties": {
            "key": {"type": "string"},
            "status": {"type": "integer", "enum": [200, 304, 404, 413, 502, 503, 504]},
            "etag": {"type": "string", "pattern": '^"[0-9]+"$'},
            "cache": {"type": "string", "enum": ["hit", "miss", "bypass"]},
            "content_type": {"type": "string"},
            "value": {"type": "string", "contentEncoding": "base64"},
            "problem": _ref("Problem"),
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "zk-cache-sidecar",
            "version": __version__,
            "description": "A coherent local cache beside each application pod, coordinated through ZooKeeper. "
            "Every error is application/problem+json (RFC 9457).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:7070"}],
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/keys/{key}": {
                "get": get_key,
                "head": {**get_key, "summary": "GET without the body", "operationId": "headKey"},
                "put": {
                    "summary": "Write-through: lock, origin write, version bump (every sidecar drops the key)",
                    "operationId": "putKey",
                    "parameters": [
                        _KEY,
                        {
                            "name": "fill",
                            "in": "query",
                            "description": "Cache-aside fill of this sidecar only, under If-Match: the lease",
                            "schema": _BOOLEAN_QUERY,
                        },
                        _IF_MATCH,
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "description": "* only: create, 412 if the key has a value (empty: no condition)",
                            "schema": {"type": "string", "enum": ["*", ""]},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "description": "The value; its Content-Type (at most 1024 characters) is kept with it",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "responses": _write_responses(
                        {
                            "200": _json(
                                {
                                    "type": "object",
                                    "required": ["key", "version"],
                                    "properties": {
                                        "key": {"type": "string"},
                                        "version": {"type": "integer"},
                                        "filled": {"type": "boolean"},
                                    },
                                },
                                "Written (or filled); ETag is the new version",
                                headers={
                                    "ETag": _ETAG,
                                    "Server-Timing": _header("check, lock, origin, publish: ms each"),
                                },
                            )
                        }
                    ),
                },
                "delete": {
                    "summary": "Delete-through: origin delete, then a version bump as the tombstone",
                    "operationId": "deleteKey",
                    "parameters": [_KEY, _IF_MATCH],
                    "responses": _write_responses(
                        {"204": {"description": "Deleted; ETag is the tombstone's version", "headers": {"ETag": _ETAG}}}
                    ),
                },
            },
            "/v1/batch/get": {
                "post": {
                    "summary": f"Read up to {MAX_BATCH_KEYS} keys, each as GET reads it",
                    "operationId": "batchGet",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["keys"],
                            "additionalProperties": False,
                            "properties": {
                                "keys": {**string_list, "minItems": 1, "maxItems": MAX_BATCH_KEYS},
                                "consistency": {"type": "string", "enum": ["eventual", "strong"]},
                                "if_none_match": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                    "maxProperties": MAX_BATCH_KEYS,
                                    "description": "key -> entity tag: that key's result is 304 if it matches "
                                    "(entries for keys not in keys are ignored)",
                                },
                            },
                        }
                    ),
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["results"],
                                "properties": {"results": {"type": "array", "items": batch_result}},
                            },
                            "One result per key, in order; values base64; at most 4 MiB of values in all, "
                            "the rest 413 each",
                        ),
                        **_COMMON_ERRORS,
                        **_BODY_ERRORS,
                        "503": _UNAVAILABLE["503"],
                    },
                }
            },
            "/v1/invalidate": {
                "post": {
                    "summary": "Fleet-wide invalidation; the origin is not touched",
                    "operationId": "invalidate",
                    "parameters": [
                        {
                            "name": "wait",
                            "in": "query",
                            "description": "true: answer 200 only once every live sidecar applied it",
                            "schema": _BOOLEAN_QUERY,
                        },
                        {
                            "name": "timeout",
                            "in": "query",
                            "description": "Seconds to wait with wait=true (default 10)",
                            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
                        },
                    ],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "description": "At least one key, one prefix, or all: true",
                            "anyOf": [
                                {"required": ["keys"], "properties": {"keys": {"minItems": 1}}},
                                {"required": ["prefixes"], "properties": {"prefixes": {"minItems": 1}}},
                                {"required": ["all"], "properties": {"all": {"const": True}}},
                            ],
                            "properties": {
                                "keys": {**string_list, "maxItems": MAX_INVALIDATE_ITEMS},
                                "prefixes": {
                                    "type": "array",
                                    "items": {"type": "string", "minLength": 1},
                                    "maxItems": MAX_INVALIDATE_ITEMS,
                                },
                                "all": {"type": "boolean"},
                            },
                        }
                    ),
                    "responses": {
                        "200": _json(receipt, "Applied by every live sidecar (wait=true)"),
                        "202": _json(receipt, "Published; applied as watches fire"),
                        **_COMMON_ERRORS,
                        **_BODY_ERRORS,
                        "503": _UNAVAILABLE["503"],
                        "504": {
                            **_problem("wait=true and some sidecars did not confirm in time"),
                        },
                    },
                }
            },
            "/v1/stats": {
                "get": {
                    "summary": "Counters and state",
                    "operationId": "stats",
                    "responses": {"200": _json({"type": "object"}, "Counters and state"), **_COMMON_ERRORS},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process serves HTTP (no auth)",
                    "operationId": "healthz",
                    "security": [{}],
                    "responses": {"200": _json({"type": "object"}, "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the ZooKeeper session is connected and set up (no auth)",
                    "operationId": "readyz",
                    "security": [{}],
                    "responses": {
                        "200": _json({"type": "object"}, "Ready; origin and live config status in the body"),
                        "503": _problem("Not ready, and why"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text format",
                    "operationId": "metrics",
                    "responses": {
                        "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "security": [{}],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "auth_token, when it is set"}
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "description": "RFC 9457. type is about:blank for malformed HTTP, else one of: "
                    + ", ".join(f"{uri} ({status})" for uri, (status, _) in problem_types().items()),
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "current_version": {"type": "integer"},
                        "lease": {"type": "integer"},
                        **ack,
                    },
                }
            },
        },
    }
    # What any request may get before its route is known: the connection
    # bound (503), and what aiohttp's parser refuses.
    connection_level = {
        "414": _problem("The request target is longer than 8190 bytes"),
        "431": _problem("A header line is longer than 8190 bytes"),
        "503": _UNAVAILABLE["503"],
    }
    for ops in doc["paths"].values():
        for op in ops.values():
            for status, response in connection_level.items():
                op["responses"].setdefault(status, response)
    for method in ("get", "put", "delete"):
        doc["paths"]["/v1/keys/{key}"][method]["responses"]["405"] = {
            **_problem("A method other than GET, HEAD, PUT, DELETE"),
            "headers": {"Allow": _header("GET, HEAD, PUT, DELETE")},
        }
    # HEAD has the same contract as GET, without bodies.
    for path in ("/v1/stats", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        get = doc["paths"][path]["get"]
        doc["paths"][path]["head"] = {**get, "operationId": get["operationId"] + "Head"}
    return doc


def render() -> bytes:
    """The document as served and as kept in the repository (sorted keys, indented)."""
    return orjson.dumps(document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
