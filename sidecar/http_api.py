"""The localhost HTTP API (see README, "HTTP API").

Handlers parse and validate, call :class:`~sidecar.service.CacheService`, and
shape responses.  Errors are rendered in one place, :meth:`Api.__call__`, as
``application/problem+json``.

No router and no middleware: aiohttp's low-level ``web.Server`` hands every
request to :class:`Api`, which sends ``/v1/keys/...`` straight to its handler
and looks the few other paths up in a dict.  Profiling the hit path under wrk
showed aiohttp's Application (URL dispatcher, middleware chain, per-request
app bookkeeping) costing about a tenth of the CPU of a hit; a hit is now one
dict lookup and one response: no ZooKeeper, origin, lock or thread hop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from . import metrics
from .cache import Entry
from .coordination import validate_key
from .errors import (
    BadRequest,
    InvalidKey,
    MethodNotAllowed,
    NotAcknowledged,
    NotCached,
    NotConnected,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    PreconditionRequired,
    SidecarError,
    Unauthorized,
)
from .origins import DEFAULT_CONTENT_TYPE, OriginValue
from .service import CacheService, Fetched, Written

__all__ = ["KEY_PREFIX", "Api", "make_server"]

log = logging.getLogger(__name__)

KEY_PREFIX = "/v1/keys/"
_PROBLEM_TYPE = "application/problem+json"
_UNAUTHENTICATED = frozenset({"/healthz", "/readyz"})
_ETAG_RE = re.compile(r'^\s*(?:W/)?"(\d+)"\s*$')
_MAX_INVALIDATE_ITEMS = 1000

Handler = Callable[[CacheService, web.BaseRequest], Awaitable[web.StreamResponse]]


# -- problem rendering ------------------------------------------------------
def _problem(status: int, type_uri: str, title: str, detail: str, instance: str, **extra: Any) -> web.Response:
    body = {"type": type_uri, "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_PROBLEM_TYPE)


def _problem_of(exc: SidecarError, path: str) -> web.Response:
    extra: dict[str, Any] = {}
    headers = {}
    if isinstance(exc, PreconditionFailed) and exc.current_version is not None:
        extra["current_version"] = exc.current_version
        headers["ETag"] = _etag(exc.current_version)
    if isinstance(exc, NotAcknowledged):
        extra["not_confirmed"], extra["acknowledged_by"] = exc.missing, exc.confirmed
    if isinstance(exc, LeaseGranted):
        extra["lease"] = exc.lease
        headers["ETag"] = _etag(exc.lease)
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = exc.allow
    resp = _problem(exc.status, exc.type_uri, exc.title, exc.detail, path, **extra)
    resp.headers.update(headers)
    return resp


# -- request parsing --------------------------------------------------------
def _raw_path(request: web.BaseRequest) -> str:
    # The request target as sent, still percent-encoded, without its query:
    # '%2F' and '/' both work and no '.'/'..' normalisation changes a key.
    # Slicing the string is cheaper than yarl's parse; an absolute-form
    # target (http://host/path, from some proxies) goes through yarl.
    target = request.raw_path
    if not target.startswith("/"):
        return request.rel_url.raw_path
    end = target.find("?")
    return target if end < 0 else target[:end]


def _key_of(request: web.BaseRequest) -> str:
    raw = _raw_path(request)[len(KEY_PREFIX) :]
    if "%" in raw:
        try:
            raw = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise InvalidKey("key is not valid percent-encoded UTF-8") from None
    return validate_key(raw)


def _parse_etag(value: str, header: str) -> int:
    m = _ETAG_RE.match(value)
    if m is None:
        raise BadRequest(f'{header} must be one entity tag like "42", got {value!r}')
    return int(m.group(1))


def _consistency(request: web.BaseRequest, default: str) -> str:
    if not request.query_string:  # the common case costs nothing
        return default
    level = request.query.get("consistency", default)
    if level not in ("eventual", "strong"):
        raise BadRequest(f"consistency must be 'eventual' or 'strong', got {level!r}")
    return level


def _fill_mode(request: web.BaseRequest, service: CacheService) -> bool:
    if service.cache_aside:
        return True
    return bool(request.query_string) and request.query.get("fill") == "true"


class LeaseGranted(NotFound):
    """A cache-aside miss: 404, with the lease to fill under as the ETag."""

    def __init__(self, lease: int) -> None:
        super().__init__(f'not cached; load it and PUT ?fill=true with If-Match: "{lease}"')
        self.lease = lease


def _etag(version: int) -> str:
    return f'"{version}"'


# -- handlers ---------------------------------------------------------------
async def get_key(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """GET /v1/keys/{key}: hit, miss (read-through) or 404."""
    key = _key_of(request)
    if service.hit_path_plain and "?" not in request.raw_path:
        # The hot path: eventual read, no query, read-through origin.
        entry = service.cached(key)
        if entry is not None:
            return _respond(request, entry.value, entry.content_type, service.coord.etag(entry.version), "hit")
    version: int | None
    result: Entry | Fetched | None
    if _consistency(request, service.config.consistency) == "strong":
        result, source = await service.read_strong(key)
    elif _fill_mode(request, service):
        # Cache-aside: a miss hands out a lease instead of reading an origin.
        result = service.cached(key)
        source = "hit"
        if result is None:
            lease = await service.lease(key)
            raise LeaseGranted(lease)
    else:
        result = service.cached(key)
        source = "hit"
        if result is None:
            if "only-if-cached" in request.headers.get("Cache-Control", ""):
                raise NotCached(f"key {key!r} is not cached here")
            result = await service.fetch(key)
            source = result.source
    if isinstance(result, Entry):
        value, ctype, version = result.value, result.content_type, result.version
    else:
        if result is None or result.value is None:
            raise NotFound(f"the origin has no value for key {key!r}")
        value, ctype, version = result.value.value, result.value.content_type, result.version
    # Versions inside are 0 for a key with no version znode; its ETag is the absent version.
    return _respond(request, value, ctype, None if version is None else service.coord.etag(version), source)


def _respond(request: web.BaseRequest, value: bytes, ctype: str, version: int | None, source: str) -> web.Response:
    if version is None:
        return web.Response(body=value, headers={"X-Cache": source, "Content-Type": ctype})
    etag = _etag(version)
    inm = request.headers.get("If-None-Match")
    if inm is not None and etag in (t.strip() for t in inm.split(",")):
        return web.Response(status=304, headers={"X-Cache": source, "ETag": etag})
    return web.Response(body=value, headers={"X-Cache": source, "ETag": etag, "Content-Type": ctype})


async def put_key(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """PUT /v1/keys/{key}: write-through, optionally conditional."""
    key = _key_of(request)
    limit = service.config.max_value_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"value is {request.content_length} bytes; the limit is {limit}")
    # Bounded by client_max_size (aiohttp answers 413 beyond); the value's own
    # limit is the service's to enforce, for chunked bodies too.
    body = await request.read()
    if_match = request.headers.get("If-Match")
    ctype = request.headers.get("Content-Type", DEFAULT_CONTENT_TYPE)
    if request.query_string and request.query.get("fill") == "true":
        if if_match is None:
            raise PreconditionRequired('PUT ?fill=true needs If-Match: "<lease>" from the 404 of a GET')
        installed = await service.fill(key, OriginValue(body, ctype), _parse_etag(if_match, "If-Match"))
        return web.Response(
            body=orjson.dumps({"key": key, "version": installed, "filled": True}),
            content_type="application/json",
            headers={"ETag": _etag(installed)},
        )
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise BadRequest("PUT supports only 'If-None-Match: *' (create only)")
    if if_match is not None and if_none_match is not None:
        raise BadRequest("send If-Match or If-None-Match, not both")
    written = await service.put(
        key,
        OriginValue(body, ctype),
        if_match=None if if_match is None else _parse_etag(if_match, "If-Match"),
        if_none_match=if_none_match is not None,
        wanted=_client_waits(request),
    )
    return web.Response(
        body=orjson.dumps({"key": key, "version": written.version}),
        content_type="application/json",
        headers={"ETag": _etag(written.version), "Server-Timing": _server_timing(written)},
    )


def _client_waits(request: web.BaseRequest) -> Callable[[], bool]:
    # aiohttp drops the transport when the client disconnects (a client
    # timeout closes the connection): a write not yet locked is then dropped.
    return lambda: request.transport is not None and not request.transport.is_closing()


def _server_timing(written: Written) -> str:
    # Where a write's time went (check, lock, origin, publish),
    # for clients and the write benchmark: the standard Server-Timing header.
    return ", ".join(f"{phase};dur={ms:.3f}" for phase, ms in written.phases.items())


async def delete_key(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """DELETE /v1/keys/{key}: delete-through; the version bump is the tombstone."""
    key = _key_of(request)
    if_match = request.headers.get("If-Match")
    written = await service.delete(
        key, if_match=None if if_match is None else _parse_etag(if_match, "If-Match"), wanted=_client_waits(request)
    )
    return web.Response(status=204, headers={"ETag": _etag(written.version), "Server-Timing": _server_timing(written)})


def _string_list(body: dict[str, Any], name: str) -> list[str]:
    items = body.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadRequest(f"'{name}' must be a list of strings")
    if len(items) > _MAX_INVALIDATE_ITEMS:
        raise BadRequest(f"at most {_MAX_INVALIDATE_ITEMS} {name} per request")
    for item in items:
        try:
            validate_key(item)
        except InvalidKey as exc:
            raise BadRequest(f"'{name}' has an invalid entry: {exc.detail}") from None
    return items


async def invalidate(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """POST /v1/invalidate: fleet-wide invalidation; the origin is not touched."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be an object like {"keys": [], "prefixes": [], "all": false}')
    unknown = sorted(set(body) - {"keys", "prefixes", "all"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    keys, prefixes = _string_list(body, "keys"), _string_list(body, "prefixes")
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise BadRequest("'all' must be true or false")
    if not keys and not prefixes and not everything:
        raise BadRequest("nothing to invalidate: give keys, prefixes or all=true")
    wait = _wait_seconds(request)
    receipt = await service.invalidate(keys, prefixes, everything, wait=wait)
    # 202: published, applied as watches fire. 200 with wait: every live sidecar confirmed.
    status = 202 if wait is None else 200
    return web.Response(status=status, body=orjson.dumps(receipt.as_json()), content_type="application/json")


def _wait_seconds(request: web.BaseRequest) -> float | None:
    if request.query.get("wait") not in ("true", "1"):
        return None
    raw = request.query.get("timeout", "10")
    try:
        timeout = float(raw)
    except ValueError:
        raise BadRequest(f"timeout must be seconds, got {raw!r}") from None
    if not 0 < timeout <= 300:
        raise BadRequest("timeout must be more than 0 and at most 300 seconds")
    return timeout


async def healthz(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """GET /healthz: the process is alive and serving HTTP."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """GET /readyz: 200 only while the ZooKeeper session is connected and set up.

    An origin that is down is reported in the body but does not make the
    sidecar unready: hits are still served, and taking every pod out of
    service would turn an origin outage into a total one.
    """
    if not service.ready:
        raise NotConnected(service.describe_state())
    body = {"status": "ready", "origin": await service.origin_status(), "config": service.live_config.as_json()}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def stats(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """GET /v1/stats: counters and state as JSON."""
    return web.Response(body=orjson.dumps(service.snapshot()), content_type="application/json")


class Api:
    """The request handler of one sidecar's HTTP API (or, ``ops_only``, of its probe port)."""

    def __init__(self, service: CacheService, *, ops_only: bool = False) -> None:
        self.service = service
        self.ops_only = ops_only
        registry = metrics.make_registry(service)

        async def metrics_handler(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
            """GET /metrics: Prometheus text format."""
            return web.Response(body=metrics.render(registry), headers={"Content-Type": metrics.CONTENT_TYPE})

        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": healthz},
            "/readyz": {"GET": readyz},
            "/metrics": {"GET": metrics_handler},
        }
        if not ops_only:
            self._routes |= {"/v1/stats": {"GET": stats}, "/v1/invalidate": {"POST": invalidate}}
        token = service.config.auth_token
        self._expected_auth = f"Bearer {token}".encode() if token and not ops_only else None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Dispatch one request; every error becomes a problem+json response here."""
        try:
            path = _raw_path(request)
            if path.startswith(KEY_PREFIX) and not self.ops_only:
                self._authorize(request)
                handler = _KEY_HANDLERS.get(request.method)
                if handler is None:
                    raise MethodNotAllowed(request.method, "GET, PUT, DELETE")
                return await handler(self.service, request)
            methods = self._routes.get(path)
            if methods is None:
                raise NotFound(f"no such resource: {request.path}")
            if path not in _UNAUTHENTICATED:
                self._authorize(request)
            handler = methods.get(request.method)
            if handler is None:
                raise MethodNotAllowed(request.method, ", ".join(methods))
            return await handler(self.service, request)
        except SidecarError as exc:
            if exc.status >= 500 and not isinstance(exc, NotConnected):
                log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.detail)
            return _problem_of(exc, request.path)
        except web.HTTPException as exc:  # aiohttp's own (a body over client_max_size...)
            if exc.status < 400:
                raise
            return _problem(exc.status, "about:blank", exc.reason, exc.text or exc.reason, request.path)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _problem(
                500, "about:blank", "Internal Server Error", "unexpected error; see the sidecar log", request.path
            )

    def _authorize(self, request: web.BaseRequest) -> None:
        if self._expected_auth is None:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):
            raise Unauthorized("send 'Authorization: Bearer <auth_token>'")


_KEY_HANDLERS: dict[str, Handler] = {"GET": get_key, "PUT": put_key, "DELETE": delete_key}


def make_server(service: CacheService, *, ops_only: bool = False, **kwargs: Any) -> web.Server:
    """The low-level aiohttp server of ``service``'s API (``ops_only``: probes and metrics only).

    ``kwargs`` go to aiohttp's request handler (``access_log``...).
    """
    loop = asyncio.get_running_loop()
    # Large enough for the biggest value and for a full invalidation request.
    max_body = 1024 if ops_only else max(service.config.max_value_bytes, 2 * 1024**2) + 64 * 1024

    def request_factory(
        message: Any, payload: Any, protocol: Any, writer: Any, task: asyncio.Task[None]
    ) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

    return web.Server(Api(service, ops_only=ops_only), request_factory=request_factory, **kwargs)
