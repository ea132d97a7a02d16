"""The localhost HTTP API (see README, "HTTP API").

Handlers parse and validate, call :class:`~sidecar.service.CacheService`, and
shape responses.  Errors are rendered in one place, :func:`_problem_middleware`,
as ``application/problem+json``.  The hit path is one dict lookup and one
response: no ZooKeeper, origin, lock or thread hop.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import metrics
from .cache import Entry
from .coordination import validate_key
from .errors import (
    BadRequest,
    InvalidKey,
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
from .origins import DEFAULT_CONTENT_TYPE, NoOrigin, OriginValue
from .service import CacheService, Fetched, Written

__all__ = ["KEY_PREFIX", "SERVICE", "make_app", "make_ops_app"]

log = logging.getLogger(__name__)

KEY_PREFIX = "/v1/keys/"
SERVICE = web.AppKey("service", CacheService)
_REGISTRY = web.AppKey("registry", CollectorRegistry)
_PROBLEM_TYPE = "application/problem+json"
_UNAUTHENTICATED = frozenset({"/healthz", "/readyz"})
_ETAG_RE = re.compile(r'^\s*(?:W/)?"(\d+)"\s*$')
_MAX_INVALIDATE_ITEMS = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- problem rendering ------------------------------------------------------
def _problem(status: int, type_uri: str, title: str, detail: str, instance: str, **extra: Any) -> web.Response:
    body = {"type": type_uri, "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_PROBLEM_TYPE)


@web.middleware
async def _problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SidecarError as exc:
        extra: dict[str, Any] = {}
        headers = {}
        if isinstance(exc, PreconditionFailed) and exc.current_version is not None:
            extra["current_version"] = exc.current_version
            headers["ETag"] = f'"{exc.current_version}"'
        if isinstance(exc, NotAcknowledged):
            extra["not_confirmed"], extra["acknowledged_by"] = exc.missing, exc.confirmed
        if isinstance(exc, LeaseGranted):
            extra["lease"] = exc.lease
            headers["ETag"] = f'"{exc.lease}"'
        resp = _problem(exc.status, exc.type_uri, exc.title, exc.detail, request.path, **extra)
        resp.headers.update(headers)
        if exc.status >= 500 and not isinstance(exc, NotConnected):
            log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.detail)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(exc.status, "about:blank", exc.reason, exc.text or exc.reason, request.path)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _problem(
            500, "about:blank", "Internal Server Error", "unexpected error; see the sidecar log", request.path
        )


def _auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _UNAUTHENTICATED:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized("send 'Authorization: Bearer <auth_token>'")
        return await handler(request)

    return auth


# -- request parsing --------------------------------------------------------
def _key_of(request: web.Request) -> str:
    # The raw (still percent-encoded) path, so that '%2F' and '/' both work
    # and no normalisation of '.' or '..' segments changes the key.
    raw = request.rel_url.raw_path[len(KEY_PREFIX) :]
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidKey("key is not valid percent-encoded UTF-8") from None
    return validate_key(key)


def _parse_etag(value: str, header: str) -> int:
    m = _ETAG_RE.match(value)
    if m is None:
        raise BadRequest(f'{header} must be one entity tag like "42", got {value!r}')
    return int(m.group(1))


def _consistency(request: web.Request, default: str) -> str:
    if not request.query_string:  # the common case costs nothing
        return default
    level = request.query.get("consistency", default)
    if level not in ("eventual", "strong"):
        raise BadRequest(f"consistency must be 'eventual' or 'strong', got {level!r}")
    return level


def _fill_mode(request: web.Request, service: CacheService) -> bool:
    if isinstance(service.origin, NoOrigin):
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
async def get_key(request: web.Request) -> web.StreamResponse:
    """GET /v1/keys/{key}: hit, miss (read-through) or 404."""
    service = request.app[SERVICE]
    key = _key_of(request)
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
    headers = {"X-Cache": source}
    if version is not None:
        etag = _etag(version)
        headers["ETag"] = etag
        inm = request.headers.get("If-None-Match")
        if inm is not None and etag in (t.strip() for t in inm.split(",")):
            return web.Response(status=304, headers=headers)
    return web.Response(body=value, headers={**headers, "Content-Type": ctype})


async def put_key(request: web.Request) -> web.StreamResponse:
    """PUT /v1/keys/{key}: write-through, optionally conditional."""
    service = request.app[SERVICE]
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
    )
    return web.Response(
        body=orjson.dumps({"key": key, "version": written.version}),
        content_type="application/json",
        headers={"ETag": _etag(written.version), "Server-Timing": _server_timing(written)},
    )


def _server_timing(written: Written) -> str:
    # Where a write's time went (lock, check, intent, origin, bump, release),
    # for clients and the write benchmark: the standard Server-Timing header.
    return ", ".join(f"{phase};dur={ms:.3f}" for phase, ms in written.phases.items())


async def delete_key(request: web.Request) -> web.StreamResponse:
    """DELETE /v1/keys/{key}: delete-through; the version bump is the tombstone."""
    service = request.app[SERVICE]
    key = _key_of(request)
    if_match = request.headers.get("If-Match")
    written = await service.delete(key, if_match=None if if_match is None else _parse_etag(if_match, "If-Match"))
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


async def invalidate(request: web.Request) -> web.StreamResponse:
    """POST /v1/invalidate: fleet-wide invalidation; the origin is not touched."""
    service = request.app[SERVICE]
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


def _wait_seconds(request: web.Request) -> float | None:
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


async def healthz(request: web.Request) -> web.StreamResponse:
    """GET /healthz: the process is alive and serving HTTP."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.StreamResponse:
    """GET /readyz: 200 only while the ZooKeeper session is connected and set up."""
    service = request.app[SERVICE]
    if not service.ready:
        raise NotConnected(service.coord.describe_state())
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


async def stats(request: web.Request) -> web.StreamResponse:
    """GET /v1/stats: counters and state as JSON."""
    return web.Response(body=orjson.dumps(request.app[SERVICE].snapshot()), content_type="application/json")


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """GET /metrics: Prometheus text format."""
    body = metrics.render(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def make_app(service: CacheService) -> web.Application:
    """The aiohttp application serving ``service``."""
    middlewares = [_problem_middleware]
    if service.config.auth_token:
        middlewares.append(_auth_middleware(service.config.auth_token))
    # Large enough for the biggest value and for a full invalidation request.
    max_body = max(service.config.max_value_bytes, 2 * 1024**2) + 64 * 1024
    app = web.Application(middlewares=middlewares, client_max_size=max_body)
    app[SERVICE] = service
    app.router.add_get(KEY_PREFIX + "{key:.+}", get_key, allow_head=False)
    app.router.add_put(KEY_PREFIX + "{key:.+}", put_key)
    app.router.add_delete(KEY_PREFIX + "{key:.+}", delete_key)
    app.router.add_post("/v1/invalidate", invalidate)
    app.router.add_get("/v1/stats", stats)
    _add_ops_routes(app)
    return app


def make_ops_app(service: CacheService) -> web.Application:
    """Probes and metrics only, no data and no auth: safe on the pod IP for the kubelet."""
    app = web.Application(middlewares=[_problem_middleware], client_max_size=1024)
    app[SERVICE] = service
    _add_ops_routes(app)
    return app


def _add_ops_routes(app: web.Application) -> None:
    # A registry per app is cheap: its collector reads the one service.
    app[_REGISTRY] = metrics.make_registry(app[SERVICE])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
