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
import base64
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, unquote

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import ERROR as PARSE_ERROR
from aiohttp.web_protocol import RequestPayloadError

from . import metrics
from .cache import Entry
from .coordination import validate_key
from .errors import (
    BadRequest,
    CoordinationError,
    InvalidKey,
    MethodNotAllowed,
    NotAcknowledged,
    NotCached,
    NotConnected,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    PreconditionRequired,
    RequestTimeout,
    ServiceBusy,
    SidecarError,
    Unauthorized,
    UnsupportedMediaType,
)
from .http_server import Connection, HttpServer, raise_fd_limit
from .openapi import MAX_BATCH_KEYS, MAX_INVALIDATE_ITEMS
from .openapi import render as render_openapi
from .origins import DEFAULT_CONTENT_TYPE, MAX_CONTENT_TYPE_BYTES, OriginValue
from .service import CacheService, Fetched, Written

__all__ = ["KEY_PREFIX", "MAX_BATCH_KEYS", "Api", "make_server"]

log = logging.getLogger(__name__)

KEY_PREFIX = "/v1/keys/"
_PROBLEM_TYPE = "application/problem+json"
_UNAUTHENTICATED = frozenset({"/healthz", "/readyz", "/openapi.json"})
# Versions are ASCII digits: \d would take any Unicode digit ("٢٨").
_STRONG_ETAG_RE = re.compile(r'^\s*"([0-9]{1,19})"\s*$', re.ASCII)
_WEAK_ETAG_RE = re.compile(r'^\s*W/"[^"]*"\s*$', re.ASCII)
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A value may be kept by HTTP caches in the app's client (OkHttp, requests-cache...)
# only if they revalidate it with its ETag on every use: the sidecar may have
# dropped it a millisecond ago.  "private": not for caches shared between apps.
_VALUE_CACHE_CONTROL = "private, no-cache"
_NO_STORE = "no-store"
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# Values one batch response carries, all told; the rest answer 413 each.
_MAX_BATCH_VALUE_BYTES = 4 * 1024**2
# Seconds a body that holds room in max_inflight_bytes has, besides its size at the minimum rate.
_BODY_GRACE = 2.0
# How long a batch response waits for max_inflight_bytes before 503 +
# Retry-After: its reads are done, and the client backs off rather than queue.
_BUDGET_WAIT = 1.0
# Large enough for a full invalidation request (1000 keys of 1 KiB, 1000 prefixes).
_MAX_JSON_BODY = 2 * 1024**2 + 64 * 1024

Handler = Callable[[CacheService, web.BaseRequest], Awaitable[web.StreamResponse]]


# -- problem rendering ------------------------------------------------------
def _problem(status: int, type_uri: str, title: str, detail: str, instance: str, **extra: Any) -> web.Response:
    body = {"type": type_uri, "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        headers={"Content-Type": _PROBLEM_TYPE, "Cache-Control": _NO_STORE},
    )


def _protocol_problem(status: int, title: str, detail: str) -> web.Response:
    # Errors of aiohttp's parser, before any route: http_server renders them through here.
    return _problem(status, "about:blank", title, detail, "/")


def _problem_body(exc: SidecarError, instance: str) -> dict[str, Any]:
    return {"type": exc.type_uri, "title": exc.title, "status": exc.status, "detail": exc.detail, "instance": instance}


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
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="zk-cache-sidecar"'
    if isinstance(exc, ServiceBusy):
        headers["Retry-After"] = "1"
    if isinstance(exc, UnsupportedMediaType):
        headers["Accept-Encoding"] = "identity"
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
        if _BAD_ESCAPE_RE.search(raw):
            raise InvalidKey("key has a malformed percent escape ('%' must be followed by two hex digits)")
        try:
            raw = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise InvalidKey("key is not valid percent-encoded UTF-8") from None
    return validate_key(raw)


def _parse_etag(value: str, header: str) -> int:
    """The version of ``If-Match``: one strong entity tag."""
    m = _STRONG_ETAG_RE.match(value)
    if m is not None:
        return int(m.group(1))
    if _WEAK_ETAG_RE.match(value):
        # RFC 9110 13.1.1: If-Match uses the strong comparison; a weak tag never matches.
        raise PreconditionFailed(f"{header} {value.strip()} is a weak entity tag, which never matches")
    raise BadRequest(f'{header} must be one entity tag like "42", got {value!r}')


def _conditional(request: web.BaseRequest, name: str) -> str | None:
    # An empty list of entity tags is no condition (RFC 9110's #list may be empty).
    value = request.headers.get(name)
    return value if value is not None and value.strip() else None


def _none_match(header: str, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag``: weak comparison (RFC 9110 13.1.2), ``*`` matches any."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag == etag or (tag.startswith("W/") and tag[2:] == etag):
            return True
    return False


def _directives(header: str) -> set[str]:
    # Cache-Control is a list of directives, each maybe with "=value".
    return {part.split("=", 1)[0].strip().lower() for part in header.split(",")}


def _flag(request: web.BaseRequest, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise BadRequest(f"{name} must be true or false, got {raw!r}")
    return value


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
    return bool(request.query_string) and _flag(request, "fill")


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
    only_if_cached = "only-if-cached" in _directives(request.headers.get("Cache-Control", ""))
    value, ctype, version, source = await _read_one(
        service,
        key,
        _consistency(request, service.config.consistency),
        only_if_cached=only_if_cached,
        lease=_fill_mode(request, service),
    )
    return _respond(request, value, ctype, version, source)


async def _read_one(
    service: CacheService, key: str, consistency: str, *, only_if_cached: bool = False, lease: bool = False
) -> tuple[bytes, str, int | None, str]:
    """One key read as GET reads it: ``(value, content type, ETag version or None, X-Cache)``.

    ``lease``: cache-aside, a miss raises :class:`LeaseGranted` instead of
    reading the origin.  Every read, single or batched, goes through here, so
    both follow the same coherence rules.
    """
    result: Entry | Fetched | None
    if consistency == "strong":
        result, source = await service.read_strong(key)
    else:
        result = service.cached(key)
        source = "hit"
        if result is None:
            if lease:
                raise LeaseGranted(await service.lease(key))
            if only_if_cached:
                raise NotCached(f"key {key!r} is not cached here")
            result = await service.fetch(key)
            source = result.source
    if isinstance(result, Entry):
        return result.value, result.content_type, service.coord.etag(result.version), source
    if result is None or result.value is None:
        raise NotFound(f"the origin has no value for key {key!r}")
    # Versions inside are 0 for a key with no version znode; its ETag is the absent version.
    version = None if result.version is None else service.coord.etag(result.version)
    return result.value.value, result.value.content_type, version, source


def _respond(request: web.BaseRequest, value: bytes, ctype: str, version: int | None, source: str) -> web.Response:
    if version is None:
        # Read around the cache (ZooKeeper unavailable): no version to revalidate against.
        return web.Response(body=value, headers={"X-Cache": source, "Content-Type": ctype, "Cache-Control": _NO_STORE})
    etag = _etag(version)
    if request.headers:  # conditionals cost nothing when absent
        if_match = _conditional(request, "If-Match")
        if if_match is not None and if_match.strip() != "*" and etag not in (t.strip() for t in if_match.split(",")):
            raise PreconditionFailed(f"the current version is {etag}", current_version=version)
        inm = _conditional(request, "If-None-Match")
        if inm is not None and _none_match(inm, etag):
            return web.Response(
                status=304, headers={"X-Cache": source, "ETag": etag, "Cache-Control": _VALUE_CACHE_CONTROL}
            )
    return web.Response(
        body=value,
        headers={"X-Cache": source, "ETag": etag, "Content-Type": ctype, "Cache-Control": _VALUE_CACHE_CONTROL},
    )


async def put_key(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """PUT /v1/keys/{key}: write-through, optionally conditional."""
    key = _key_of(request)
    async with _body(service, request, service.config.max_value_bytes) as body:
        return await _put(service, request, key, body)


@asynccontextmanager
async def _body(service: CacheService, request: web.BaseRequest, limit: int) -> AsyncIterator[bytes]:
    """The request body, at most ``limit`` bytes, held against ``max_inflight_bytes`` until the block ends.

    Each chunk is charged as it is read, so however many clients upload at
    once, bodies in memory stay within the budget: the rest wait in their
    sockets, and a body that cannot get room within ``http_body_timeout`` is 503.
    """
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        # Stored bytes are exactly the bytes sent: nothing is decoded, so nothing is refused late.
        raise UnsupportedMediaType(f"Content-Encoding {encoding.strip()!r} is not accepted: send the body as is")
    declared = request.content_length
    if declared is not None and declared > limit:
        _close_after(request)
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    # Bytes are charged when they start to arrive, not on the headers: a
    # client that sends headers and nothing more holds nothing (a hostile
    # review found 16 header-only PUTs starving every write for 30 s).
    # Twice: the chunks and their join coexist for a moment, and what a write
    # does with a value (the origin's copy, the writer's refill) is of the
    # same order.
    loop = asyncio.get_running_loop()
    timeout = service.config.http_body_timeout
    deadline = loop.time() + timeout
    budget = service.inflight
    held = 0
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await request.content.readany()
            except TimeoutError:
                _close_after(request)
                raise RequestTimeout(f"{size} bytes of the body arrived in {timeout:g}s (http_body_timeout)") from None
            except RequestPayloadError as exc:
                _close_after(request)
                raise BadRequest(f"malformed body: {exc}") from None
            except RuntimeError as exc:  # aiohttp's "Connection closed." once the socket is gone
                raise ConnectionResetError(str(exc)) from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                _close_after(request)  # rather than reading the rest only to drop it
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            if not held:
                # Charged once, whole, with its first byte: a declared body for
                # its length, a chunked one for the most it may be.  One
                # acquisition per body, so no two bodies each hold a part while
                # waiting for the rest (charged chunk by chunk, 16 concurrent
                # 1 MiB PUTs did, until all were 503); and what was read is
                # never left uncharged.  Within the same deadline; 503 past it.
                need = 2 * (declared if declared is not None else limit)
                held = await budget.acquire(need, max(0.0, deadline - loop.time()))
                # Holding room, the rest must come at a useful rate, not one byte a minute.
                deadline = min(deadline, loop.time() + _BODY_GRACE + need / _MIN_TRANSFER_RATE)
            chunks.append(chunk)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        yield body
    finally:
        budget.release(held)


def _close_after(request: web.BaseRequest) -> None:
    # The rest of the body is never read: close the connection after the answer.
    if request.protocol is not None:
        request.protocol.keep_alive(False)


async def _put(service: CacheService, request: web.BaseRequest, key: str, body: bytes) -> web.StreamResponse:
    if_match = _conditional(request, "If-Match")
    ctype = request.headers.get("Content-Type", DEFAULT_CONTENT_TYPE)
    if len(ctype) > MAX_CONTENT_TYPE_BYTES:
        raise BadRequest(f"Content-Type is {len(ctype)} characters; at most {MAX_CONTENT_TYPE_BYTES}")
    if request.query_string and _flag(request, "fill"):
        if if_match is None:
            raise PreconditionRequired('PUT ?fill=true needs If-Match: "<lease>" from the 404 of a GET')
        installed = await service.fill(key, OriginValue(body, ctype), _parse_etag(if_match, "If-Match"))
        return web.Response(
            body=orjson.dumps({"key": key, "version": installed, "filled": True}),
            content_type="application/json",
            headers={"ETag": _etag(installed)},
        )
    if_none_match = _conditional(request, "If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise BadRequest("PUT supports only 'If-None-Match: *' (create only)")
    if if_match is not None and if_none_match is not None:
        # RFC 9110 13.2.2: If-Match first, then If-None-Match: * on a key that
        # has a value; no write satisfies both.
        raise PreconditionFailed("If-Match and If-None-Match: * cannot both hold; send one")
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
    if_match = _conditional(request, "If-Match")
    written = await service.delete(
        key, if_match=None if if_match is None else _parse_etag(if_match, "If-Match"), wanted=_client_waits(request)
    )
    return web.Response(status=204, headers={"ETag": _etag(written.version), "Server-Timing": _server_timing(written)})


def _string_list(
    body: dict[str, Any], name: str, limit: int = MAX_INVALIDATE_ITEMS, *, required: bool = False
) -> list[str]:
    """``body[name]``: a list of at most ``limit`` valid keys (``required``: at least one)."""
    items = body.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items) or (required and not items):
        raise BadRequest(f"'{name}' must be a {'non-empty ' if required else ''}list of strings")
    if len(items) > limit:
        raise BadRequest(f"at most {limit} {name} per request, got {len(items)}")
    for item in items:
        try:
            validate_key(item)
        except InvalidKey as exc:
            raise BadRequest(f"'{name}' has an invalid entry: {exc.detail}") from None
    return items


async def _json_object(service: CacheService, request: web.BaseRequest, fields: set[str], example: str) -> Any:
    """The request body as a JSON object with only ``fields`` (400 otherwise, naming ``example``)."""
    async with _body(service, request, _MAX_JSON_BODY) as raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be an object like {example}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    return body


async def invalidate(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """POST /v1/invalidate: fleet-wide invalidation; the origin is not touched."""
    body = await _json_object(
        service, request, {"keys", "prefixes", "all"}, '{"keys": [], "prefixes": [], "all": false}'
    )
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


async def batch_get(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
    """POST /v1/batch/get: many keys in one request, each read exactly as GET reads it.

    Each result has its own status, ETag and cache outcome; one key failing
    (404, origin down) fails only its own result.  Values are base64, so any
    bytes fit in JSON.  Misses are read concurrently (the origin's own
    connection bound applies).

    Coherence: a GET looks its hit up and answers with no await between, and
    so does a batch of hits only (``_batch_of_hits``).  Any other batch
    awaits its misses and its response budget after looking up its hits, so
    each key holds a fill ticket from before its lookup to the response: any
    invalidation of the key (by key, prefix, all) and any connection state
    change voids it, and a voided key is looked up again (and read again if
    it is no longer cached) rather than served as it was.
    """
    keys, consistency, none_match = await _batch_request(service, request)
    if consistency == "eventual":
        fast = _batch_of_hits(service, keys, none_match)
        if fast is not None:
            return fast
    unique = list(dict.fromkeys(keys))
    cache = service.cache
    tickets = {key: cache.begin_fill(key) for key in unique}
    try:
        read = await _batch_read(service, unique, consistency)
        values = sum(len(r[1]) for r in read.values() if isinstance(r, tuple))
        # base64 and JSON: about 2.4 bytes of response per byte of value, and a
        # problem document per key at most; held until the bytes left.
        size = min(values, _MAX_BATCH_VALUE_BYTES) * 12 // 5 + len(keys) * _PROBLEM_BYTES
        async with service.inflight.hold(size, _BUDGET_WAIT):
            for _ in range(_BATCH_REREADS):
                stale = [key for key in unique if not tickets[key].valid]
                if not stale:
                    break
                for key in stale:
                    cache.end_fill(tickets[key])
                    tickets[key] = cache.begin_fill(key)
                read.update(await _batch_read(service, stale, consistency))
            # From here to the response's bytes, no await: what is served is current now.
            results = [
                _batch_result(service, key, read[key], tickets[key].valid, consistency, none_match) for key in keys
            ]
            _cap_batch_values(results)
            body = orjson.dumps({"results": results})
            del read, results
            # The bytes are fixed: the keys' watches need not wait for the client to read them.
            for ticket in tickets.values():
                cache.end_fill(ticket)
            tickets.clear()
            timeout = service.config.http_body_timeout + len(body) / _MIN_TRANSFER_RATE
            return await _send(request, body, {"Content-Type": "application/json", "Cache-Control": _NO_STORE}, timeout)
    finally:
        for ticket in tickets.values():
            cache.end_fill(ticket)


def _hit(service: CacheService, key: str, entry: Entry) -> tuple[str, bytes, str, int | None, str]:
    """A cached entry as one key's read of a batch."""
    return key, entry.value, entry.content_type, service.coord.etag(entry.version), "hit"


def _batch_of_hits(service: CacheService, keys: list[str], none_match: dict[str, str]) -> web.StreamResponse | None:
    """The common case, every key a hit and room free now: looked up and answered with no await between.

    None when a key misses or the budget has no room at once; the caller
    then takes the path with tickets.
    """
    results: list[dict[str, Any]] = []
    values = 0
    for key in keys:
        entry = service.cached(key)
        if entry is None:
            return None
        read = _hit(service, key, entry)
        results.append(_batch_result(service, key, read, True, "eventual", none_match))
        values += len(entry.value)
    # base64 makes 4 bytes of 3; a result's other fields are well under 256 bytes.
    if values * 4 // 3 + len(keys) * 256 > _SMALL_RESPONSE or not service.inflight.try_acquire(values):
        return None  # large, or no room now: sent under the budget with a deadline, on the other path
    try:
        _cap_batch_values(results)
        body = orjson.dumps({"results": results})
    finally:
        service.inflight.release(values)
    # Small enough for the socket's own buffer: nothing to hold for it once built.
    return web.Response(body=body, headers={"Content-Type": "application/json", "Cache-Control": _NO_STORE})


_BATCH_REREADS = 3
# A batch response this small is answered like a GET (web.Response): no budget held while it is sent.
_SMALL_RESPONSE = 256 * 1024
_BATCH_READS_AT_ONCE = 16
# Generous size of one key's problem document in a batch (the key, quoted twice, and a detail).
_PROBLEM_BYTES = 6 * 1024
# A body or response under way must move at least this fast (bytes per second) on top of
# http_body_timeout, once it holds memory: 1 MiB/s.
_MIN_TRANSFER_RATE = 1024 * 1024
_BatchRead = dict[str, "tuple[str, bytes, str, int | None, str] | SidecarError"]


async def _batch_request(service: CacheService, request: web.BaseRequest) -> tuple[list[str], str, dict[str, str]]:
    body = await _json_object(service, request, {"keys", "consistency", "if_none_match"}, '{"keys": ["a", "b"]}')
    keys = _string_list(body, "keys", MAX_BATCH_KEYS, required=True)
    consistency = body.get("consistency", service.config.consistency)
    if consistency not in ("eventual", "strong"):
        raise BadRequest(f"consistency must be 'eventual' or 'strong', got {consistency!r}")
    none_match = body.get("if_none_match", {})
    if not isinstance(none_match, dict) or not all(isinstance(v, str) for v in none_match.values()):
        raise BadRequest('\'if_none_match\' must map keys to entity tags like {"a": "\\"42\\""}')
    if len(none_match) > MAX_BATCH_KEYS:  # entries for keys not asked for are ignored, but bounded
        raise BadRequest(f"'if_none_match' has more than {MAX_BATCH_KEYS} entries")
    return keys, consistency, none_match


async def _batch_read(service: CacheService, keys: list[str], consistency: str) -> _BatchRead:
    """Read ``keys`` as GET does: hits without a task each, the others a few at a time.

    Reads stop once the values read pass what one response carries: the
    keys left answer 413 rather than hold their values in memory uncharged.
    """
    read: _BatchRead = {}
    pending = keys
    room = _MAX_BATCH_VALUE_BYTES
    if consistency == "eventual":
        pending = []
        for key in keys:
            entry = service.cached(key)
            if entry is None:
                pending.append(key)
            else:
                read[key] = _hit(service, key, entry)
                room -= len(entry.value)
    lanes = asyncio.Semaphore(_BATCH_READS_AT_ONCE)

    async def one(key: str) -> None:
        nonlocal room
        async with lanes:
            if room <= 0:
                read[key] = PayloadTooLarge(
                    f"the batch's values exceed {_MAX_BATCH_VALUE_BYTES} bytes; read this key on its own"
                )
                return
            try:
                # Cache-aside: a miss hands out a lease, as GET does.
                value = await _read_one(service, key, consistency, lease=service.cache_aside)
            except SidecarError as exc:
                read[key] = exc
                return
            room -= len(value[0])
            read[key] = (key, *value)

    await asyncio.gather(*(one(key) for key in pending))
    return read


def _batch_result(
    service: CacheService,
    key: str,
    read: tuple[str, bytes, str, int | None, str] | SidecarError,
    current: bool,
    consistency: str,
    none_match: dict[str, str],
) -> dict[str, Any]:
    instance = KEY_PREFIX + quote(key, safe="/")
    if not current:
        # Invalidated on every re-read: an eventual read may serve what is
        # cached now (as a GET now would); a strong one never falls back to it.
        entry = service.cached(key) if consistency == "eventual" else None
        if entry is None:
            exc = CoordinationError(f"key {key!r} kept being invalidated while the batch read it; read it again")
            return {"key": key, "status": exc.status, "problem": _problem_body(exc, instance)}
        read = _hit(service, key, entry)
    if isinstance(read, SidecarError):
        out: dict[str, Any] = {"key": key, "status": read.status, "problem": _problem_body(read, instance)}
        if isinstance(read, LeaseGranted):
            out["etag"] = _etag(read.lease)
        return out
    _, value, ctype, version, source = read
    out = {"key": key, "status": 200, "cache": source, "content_type": ctype, "value": value}
    if version is not None:
        out["etag"] = etag = _etag(version)
        tag = none_match.get(key)
        if tag is not None and _none_match(tag, etag):
            return {"key": key, "status": 304, "cache": source, "etag": etag}
    return out


def _cap_batch_values(results: list[dict[str, Any]]) -> None:
    # At most _MAX_BATCH_VALUE_BYTES of values per response; base64 last, in place.
    room = _MAX_BATCH_VALUE_BYTES
    for i, out in enumerate(results):
        value = out.get("value")
        if value is None:
            continue
        if len(value) > room:
            too_large = PayloadTooLarge(
                f"the batch's values exceed {_MAX_BATCH_VALUE_BYTES} bytes; read this key on its own"
            )
            instance = KEY_PREFIX + quote(out["key"], safe="/")
            results[i] = {"key": out["key"], "status": 413, "problem": _problem_body(too_large, instance)}
            continue
        room -= len(value)
        out["value"] = base64.b64encode(value).decode("ascii")


async def _send(request: web.BaseRequest, body: bytes, headers: dict[str, str], timeout: float) -> web.StreamResponse:
    """Write a response within the caller's budget hold, so the bytes are charged until they left.

    One deadline for the whole response: a client that reads a little just
    often enough to keep the connection's own send timer from firing is cut
    off all the same.
    """
    resp = web.StreamResponse(headers=headers)
    resp.content_length = len(body)
    await resp.prepare(request)
    try:
        async with asyncio.timeout(timeout):
            await resp.write(body)
            await resp.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client read its response too slowly") from None
    return resp


def _wait_seconds(request: web.BaseRequest) -> float | None:
    wait = _flag(request, "wait")
    raw = request.query.get("timeout")
    timeout = 10.0
    if raw is not None:  # checked even without wait: a bad parameter is never silently ignored
        try:
            timeout = float(raw)
        except ValueError:
            raise BadRequest(f"timeout must be seconds, got {raw!r}") from None
        if not 0 < timeout <= 300:
            raise BadRequest("timeout must be more than 0 and at most 300 seconds")
    return timeout if wait else None


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
            "/healthz": {"GET": healthz, "HEAD": healthz},
            "/readyz": {"GET": readyz, "HEAD": readyz},
            "/metrics": {"GET": metrics_handler, "HEAD": metrics_handler},
        }
        contract = render_openapi()

        async def openapi(service: CacheService, request: web.BaseRequest) -> web.StreamResponse:
            """GET /openapi.json: the API's OpenAPI 3.1 document."""
            return web.Response(body=contract, content_type="application/json")

        if not ops_only:
            self._routes |= {
                "/openapi.json": {"GET": openapi, "HEAD": openapi},
                "/v1/stats": {"GET": stats, "HEAD": stats},
                "/v1/invalidate": {"POST": invalidate},
                "/v1/batch/get": {"POST": batch_get},
            }
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
                    raise MethodNotAllowed(request.method, "GET, HEAD, PUT, DELETE")
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
            if exc.status >= 500 and not isinstance(exc, NotConnected | NotCached | ServiceBusy):
                log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.detail)
            return _problem_of(exc, request.path)
        except ConnectionError:
            # The client went away (mid-body, say): nothing to answer, nothing to log loudly.
            log.debug("client went away during %s %s", request.method, request.path)
            raise
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


# HEAD runs GET: aiohttp sends the headers, Content-Length included, and no body.
_KEY_HANDLERS: dict[str, Handler] = {"GET": get_key, "HEAD": get_key, "PUT": put_key, "DELETE": delete_key}


def make_server(service: CacheService, *, ops_only: bool = False, **kwargs: Any) -> web.Server:
    """The low-level aiohttp server of ``service``'s API (``ops_only``: probes and metrics only).

    ``kwargs`` go to aiohttp's request handler (``access_log``...).
    """
    loop = asyncio.get_running_loop()
    config = service.config
    # Bodies are read by _body, within max_inflight_bytes; this is aiohttp's own backstop.
    max_body = 1024 if ops_only else max(config.max_value_bytes, _MAX_JSON_BODY) + 64 * 1024

    def request_factory(
        message: Any, payload: Any, protocol: Any, writer: Any, task: asyncio.Task[None]
    ) -> web.BaseRequest:
        if message is PARSE_ERROR:
            # aiohttp answers a request it could not parse as HTTP/1.0; ours is a 1.1 server.
            message = message._replace(version=HttpVersion11)
        elif isinstance(protocol, Connection):
            protocol.request_began()
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

    return HttpServer(
        Api(service, ops_only=ops_only),
        max_connections=raise_fd_limit(config.max_connections),
        # A client that stops reading its response is cut off after this long.
        send_timeout=config.http_body_timeout,
        render=_protocol_problem,
        request_factory=request_factory,
        # What aiohttp buffers per connection before the handler reads it
        # (twice this): 3.14's default of 256 KiB would allow 512 MiB at 1024 connections.
        read_bufsize=64 * 1024,
        # A connection with no request in progress (one still sending its headers included) is closed.
        keepalive_timeout=config.http_idle_timeout,
        # Bodies are stored as sent; an encoded one is refused (415), never decoded.
        auto_decompress=False,
        # After an early answer (413, 408), read and drop the rest of the body
        # this long, so the client sees the answer and not a reset.
        lingering_time=2.0,
        **kwargs,
    )
