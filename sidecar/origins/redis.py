"""A Redis origin: one hash per key, through redis-py's asyncio client.

    redis://[user:password@]host:port[/db][?options]
    rediss://...                     (TLS; redis-py's ssl_* query options, e.g. ssl_ca_certs=/ca.pem)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db][?options]

Options of ours (the rest go to redis-py): ``prefix`` (Redis key prefix,
default none), ``replicas`` (replicas that must confirm a write, via
``WAIT``; default 0, and 1 for Sentinel) and, for Sentinel,
``sentinel_password``.

**Layout**, readable by any Redis client: the key ``<prefix><key>`` is a hash
with the fields ``value`` (the bytes) and ``content_type``.  For example
``HGET user:42 value``.  A key that holds another type answers 502.

**Acknowledged writes survive a failover.**  Redis replicates
asynchronously: a primary can acknowledge a write and die before any
replica has it, and Sentinel then promotes a replica without it.  So a write
counts as done only once ``WAIT`` says ``replicas`` replicas have it; fewer
is an error (502) and the key stays uncacheable until it is written again,
as for any write whose outcome is unknown.  With one replica per primary and
``replicas=1``, the replica Sentinel promotes holds every acknowledged write.
Reads go to the primary only (a replica may lag).

A command whose reply was lost may still have been applied, so writers
mark their key before writing (``applies_late``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..errors import OriginError, OriginTimeout, OriginUnavailable
from .base import DEFAULT_CONTENT_TYPE, MAX_CONTENT_TYPE_BYTES, OriginValue

__all__ = ["RedisOrigin", "RedisUrl", "parse_redis_url"]

T = TypeVar("T")
log = logging.getLogger(__name__)
# What is left of our timeout for WAIT's answer to travel back: a quarter, and
# at least 0.1 s (CI saw 0.1 s of a 0.5 s timeout not be enough on a loaded machine).
_WAIT_MARGIN = 0.1
_WAIT_MARGIN_SHARE = 0.25


# Refusals that say the server cannot take commands now (the origin is down), not that a key is wrong.
_SERVER_UNAVAILABLE = (rexc.ReadOnlyError, rexc.OutOfMemoryError, rexc.MasterDownError, rexc.TryAgainError)


def _reason(exc: BaseException) -> str:
    """Redis's own message, without what redis-py's pipeline adds to it: the command and its
    arguments, i.e. the key and the value being written, which belong in no log and no response."""
    text = str(exc.args[0]) if exc.args else str(exc)
    if "of pipeline caused error: " in text:
        text = text.rpartition("of pipeline caused error: ")[2].strip()
        if text.startswith("(") and text.endswith(",)"):
            text = text[1:-2].strip().strip("'\"")
    return text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# One round trip, and never more than ``max`` bytes of value (nor an outsized
# content type) on the wire: another client may have written either.
_READ = """
local size = redis.call('HSTRLEN', KEYS[1], 'value')
if size > tonumber(ARGV[1]) then return {size} end
local type_size = redis.call('HSTRLEN', KEYS[1], 'content_type')
if type_size > tonumber(ARGV[2]) then return {-1, type_size} end
return redis.call('HMGET', KEYS[1], 'value', 'content_type')
"""


class RedisUrl:
    """A parsed Redis origin URL (see the module docstring)."""

    def __init__(
        self,
        *,
        sentinels: list[tuple[str, int]] | None,
        service: str | None,
        client_url: str | None,
        db: int,
        username: str | None,
        password: str | None,
        prefix: str,
        replicas: int,
        sentinel_password: str | None,
        options: dict[str, str],
    ) -> None:
        self.sentinels, self.service, self.client_url = sentinels, service, client_url
        self.db, self.username, self.password = db, username, password
        self.prefix, self.replicas, self.sentinel_password = prefix, replicas, sentinel_password
        self.options = options

    @property
    def display(self) -> str:
        """The URL without credentials, for logs and ``/v1/stats``."""
        if self.sentinels is not None:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        parts = urlsplit(self.client_url or "")
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}:{parts.port or 6379}/{self.db}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: {text!r} is not a port")
    return int(text)


def parse_redis_url(url: str) -> RedisUrl:
    """Check a Redis origin URL; ``ValueError`` with one line if it is wrong."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = options.pop("prefix", "")
    sentinel_password = options.pop("sentinel_password", None)
    sentinel = parts.scheme == "redis+sentinel"
    raw_replicas = options.pop("replicas", "1" if sentinel else "0")
    if not raw_replicas.isdigit():
        raise ValueError(f"replicas must be a whole number, got {raw_replicas!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    path = [p for p in parts.path.split("/") if p]
    if sentinel:
        if not hosts:
            raise ValueError("name the Sentinels: redis+sentinel://host:port[,host:port]/service[/db]")
        sentinels = []
        for hp in hosts.split(","):
            host, sep, port = hp.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{hp!r} is not host:port")
            sentinels.append((host.strip("[]"), _port(port, "Sentinel")))
        if not path:
            raise ValueError("name the Sentinel service: redis+sentinel://host:port/<service>[/db]")
        service, db_text = path[0], (path[1] if len(path) > 1 else "0")
        if len(path) > 2:
            raise ValueError("use redis+sentinel://host:port/<service>[/db]")
        client_url = None
    else:
        if not parts.hostname:
            raise ValueError("a redis origin needs a host, e.g. redis://127.0.0.1:6379/0")
        if parts.port is None and ":" in hosts.rsplit("]", 1)[-1]:
            raise ValueError(f"{hosts!r} is not host:port")
        sentinels, service = None, None
        db_text = path[0] if path else "0"
        if len(path) > 1:
            raise ValueError("use redis://host:port[/db]")
        client_url = parts._replace(query=urlencode(options)).geturl()
    if not db_text.isdigit():
        raise ValueError(f"the database must be a number, got {db_text!r}")
    return RedisUrl(
        sentinels=sentinels,
        service=service,
        client_url=client_url,
        db=int(db_text),
        username=unquote(username) or None,
        password=unquote(password) or None,
        prefix=prefix,
        replicas=int(raw_replicas),
        sentinel_password=sentinel_password,
        options=options,
    )


class RedisOrigin:
    """Hashes in a Redis primary, optionally found through Sentinel."""

    def __init__(self, url: str, timeout: float, max_value_bytes: int, max_connections: int) -> None:
        self._url = parse_redis_url(url)
        self.name = self._url.display
        self.applies_late = True  # a command whose reply we lost may have been applied
        self._timeout = timeout
        self._max = max_value_bytes
        self._closed = False
        # Reads and writes wait for slots of their own: a write holds its
        # connection in WAIT while a replica is missing, and must not starve
        # reads. The pool never grows past both; redis-py's own pool would
        # raise "Too many connections" instead of waiting.
        self._read_slots = asyncio.Semaphore(max_connections)
        self._write_slots = asyncio.Semaphore(max_connections)
        # No retries inside redis-py: every call is bounded by our timeout, and
        # a write retried on another connection would escape its WAIT.
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "max_connections": 2 * max_connections,
            "client_name": "zkcache-sidecar",
            "retry": Retry(NoBackoff(), 0),
        }
        if self._url.sentinels is not None:
            # Sentinels are asked in turn: each gets a share of the timeout, so
            # that a hung one still leaves time to ask the others.
            share = timeout / (len(self._url.sentinels) + 1)
            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": share,
                "socket_connect_timeout": share,
                "retry": Retry(NoBackoff(), 0),
            }
            if self._url.sentinel_password:
                sentinel_kwargs["password"] = self._url.sentinel_password
            self._sentinel: Sentinel | None = Sentinel(  # type: ignore[no-untyped-call]
                self._url.sentinels, sentinel_kwargs=sentinel_kwargs, **self._url.options
            )
            self._redis: aioredis.Redis = self._sentinel.master_for(
                self._url.service or "",
                db=self._url.db,
                username=self._url.username,
                password=self._url.password,
                **common,
            )
        else:
            self._sentinel = None
            self._redis = aioredis.Redis.from_url(self._url.client_url or "", **common)
        self._read = self._redis.register_script(_READ)

    def _key(self, key: str) -> str:
        return self._url.prefix + key

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], slots: asyncio.Semaphore | None = None) -> T:
        if self._closed:
            raise OriginUnavailable(f"{self.name}: closed; {what} not sent")
        acquired = False
        try:
            async with asyncio.timeout(self._timeout):
                async with slots or self._read_slots:
                    acquired = True
                    return await fn()
        except OriginError:
            raise
        except (TimeoutError, rexc.TimeoutError):
            if not acquired:  # certain: nothing reached Redis
                raise OriginTimeout(
                    f"{self.name}: {what}: no connection free within {self._timeout:g}s; nothing sent"
                ) from None
            raise OriginTimeout(f"{self.name}: {what} timed out after {self._timeout:g}s") from None
        except rexc.AuthenticationError as exc:
            raise OriginError(f"{self.name}: {what}: authentication failed: {exc}") from None
        except rexc.ResponseError as exc:
            reason = _reason(exc)
            if "WRONGTYPE" in reason:
                raise OriginError(f"{self.name}: {what}: the Redis key is not a hash (see the layout)") from None
            if isinstance(exc, _SERVER_UNAVAILABLE) or reason.startswith("NOREPLICAS"):
                raise OriginUnavailable(f"{self.name}: {what} refused: {reason}") from None
            raise OriginError(f"{self.name}: {what}: {reason}") from None
        except (rexc.RedisError, OSError) as exc:
            raise OriginUnavailable(f"{self.name}: {what} failed: {exc}") from None

    async def open(self) -> None:
        """One PING: a wrong password fails the start; an unreachable Redis only logs (the origin may come later)."""
        try:
            await self._call("PING", self._redis.ping)
        except (OriginUnavailable, OriginTimeout) as exc:
            log.warning("origin not reachable yet (reads and writes answer 502/504 until it is): %s", exc.detail)

    async def get(self, key: str) -> OriginValue | None:
        """``HMGET`` of the key's hash, refused beyond ``max_value_bytes``; only from the primary.

        ``ROLE`` goes in the same round trip: a demoted primary keeps its
        clients' connections and answers reads with data the new primary
        has overwritten, which a fill would cache under the new version.
        """

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:  # gives its connection back however it ends
                pipe.execute_command("ROLE")
                await self._read(keys=[self._key(key)], args=[self._max, MAX_CONTENT_TYPE_BYTES], client=pipe)  # queued
                return list(await pipe.execute())

        role, reply = await self._call("read", read)
        if _text(role[0]) != "master":
            raise OriginUnavailable(f"{self.name}: the server is a {_text(role[0])}, not the primary; nothing read")
        if isinstance(reply[0], int):  # {size} or {-1, size}: refused by the script
            if len(reply) == 1:
                raise OriginError(f"{self.name}: origin value for key exceeds {self._max} bytes ({reply[0]})")
            limit = MAX_CONTENT_TYPE_BYTES
            raise OriginError(f"{self.name}: the key's content type is {reply[1]} bytes long (at most {limit})")
        value, content_type = reply
        if value is None:
            return None
        return OriginValue(bytes(value), self._content_type(content_type))

    def _content_type(self, raw: bytes | None) -> str:
        # Written by any client: it becomes a response header, so it must be one.
        if not raw:
            return DEFAULT_CONTENT_TYPE
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text or not all(" " <= c <= "~" for c in text):
            raise OriginError(f"{self.name}: the key's content type {raw[:40]!r} is not a valid header value")
        return text

    async def put(self, key: str, value: OriginValue) -> None:
        """``HSET`` both fields in one command, then ``WAIT`` for the replicas."""
        name = self._key(key)
        mapping: dict[Any, bytes | str] = {"value": value.value, "content_type": value.content_type}
        await self._write("write", lambda pipe: pipe.hset(name, mapping=mapping))

    async def delete(self, key: str) -> None:
        """``DEL`` the key's hash; absent keys are not an error."""
        name = self._key(key)
        await self._write("delete", lambda pipe: pipe.delete(name))

    async def _write(self, what: str, command: Callable[[Any], Any]) -> None:
        replicas = self._url.replicas
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout

        async def write_and_wait() -> int:
            left = deadline - loop.time()  # after waiting for a slot
            if replicas and left < _WAIT_MARGIN * 1.5:
                raise OriginTimeout(f"{self.name}: {what}: no connection free within {self._timeout:g}s; nothing sent")
            # One pipeline, one connection: WAIT counts the replicas that have
            # this connection's writes, so it must follow the write on it.
            async with self._redis.pipeline(transaction=False) as pipe:
                command(pipe)
                if replicas:
                    # WAIT's own timeout ends a margin inside ours: its answer
                    # (how many replicas), not our timer, ends the wait.
                    margin = max(_WAIT_MARGIN, _WAIT_MARGIN_SHARE * left)
                    pipe.wait(replicas, max(1, int((left - margin) * 1000)))
                results = await pipe.execute()
            return int(results[-1]) if replicas else 0

        confirmed = await self._call(what, write_and_wait, self._write_slots)
        if confirmed < replicas:
            raise OriginUnavailable(
                f"{self.name}: {what} reached {confirmed} of the {replicas} replica(s) it needs; "
                "it may be lost on a failover"
            )

    async def health(self) -> list[str]:
        """Problems Redis itself reports (``PING``, ``INFO replication``); empty when healthy."""
        try:
            await self._call("PING", self._redis.ping)
            info: dict[str, Any] = await self._call("INFO replication", lambda: self._redis.info("replication"))
        except OriginError as exc:
            return [exc.detail]
        problems = []
        if info.get("role") != "master":
            problems.append(f"{self.name}: the server is a {info.get('role')}, not the primary")
        replicas = int(info.get("connected_slaves", 0))
        if replicas < self._url.replicas:
            problems.append(f"{self.name}: {replicas} replica(s) connected, writes need {self._url.replicas}")
        return problems

    async def describe(self) -> str:
        """One line of what ``INFO replication`` says (``cachectl doctor``)."""
        info: dict[str, Any] = await self._call("INFO replication", lambda: self._redis.info("replication"))
        return f"role {info.get('role')}, {info.get('connected_slaves', 0)} replica(s) connected"

    async def close(self) -> None:
        """Close the pool (and the Sentinel connections); calls after this send nothing."""
        self._closed = True
        await self._redis.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()
