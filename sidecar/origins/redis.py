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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.sentinel import Sentinel

from ..errors import OriginError, OriginTimeout, OriginUnavailable
from .base import DEFAULT_CONTENT_TYPE, OriginValue

__all__ = ["RedisOrigin", "RedisUrl", "parse_redis_url"]

T = TypeVar("T")

# One round trip, and never more than ``max`` bytes of value on the wire: a
# value written by another client may be larger than the sidecar accepts.
_READ = """
local size = redis.call('HSTRLEN', KEYS[1], 'value')
if size > tonumber(ARGV[1]) then return {size} end
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
        # The pool never grows past the semaphore; redis-py's own pool would
        # raise "Too many connections" instead of waiting.
        self._slots = asyncio.Semaphore(max_connections)
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "max_connections": max_connections,
            "client_name": "zkcache-sidecar",
        }
        if self._url.sentinels is not None:
            sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
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

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    return await fn()
        except (TimeoutError, rexc.TimeoutError):
            raise OriginTimeout(f"{self.name}: {what} timed out after {self._timeout:g}s") from None
        except rexc.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise OriginError(f"{self.name}: {what}: the Redis key is not a hash (see the layout)") from None
            raise OriginError(f"{self.name}: {what}: {exc}") from None
        except (rexc.RedisError, OSError) as exc:
            raise OriginUnavailable(f"{self.name}: {what} failed: {exc}") from None

    async def open(self) -> None:
        """Fail early on a wrong address or password (one PING)."""
        await self._call("PING", self._redis.ping)

    async def get(self, key: str) -> OriginValue | None:
        """``HMGET`` of the key's hash, refused beyond ``max_value_bytes``."""
        reply = await self._call("read", lambda: self._read(keys=[self._key(key)], args=[self._max]))
        if len(reply) == 1:  # {size}: too large to fetch
            raise OriginError(f"{self.name}: origin value for key exceeds {self._max} bytes ({reply[0]})")
        value, content_type = reply
        if value is None:
            return None
        return OriginValue(bytes(value), content_type.decode() if content_type else DEFAULT_CONTENT_TYPE)

    async def put(self, key: str, value: OriginValue) -> None:
        """``HSET`` both fields in one command, then ``WAIT`` for the replicas."""
        name = self._key(key)
        mapping: dict[Any, bytes | str] = {"value": value.value, "content_type": value.content_type}
        await self._write("write", lambda: self._redis.hset(name, mapping=mapping))

    async def delete(self, key: str) -> None:
        """``DEL`` the key's hash; absent keys are not an error."""
        name = self._key(key)
        await self._write("delete", lambda: self._redis.delete(name))

    async def _write(self, what: str, command: Callable[[], Awaitable[Any]]) -> None:
        replicas = self._url.replicas

        async def write_and_wait() -> int:
            await command()
            if not replicas:
                return 0
            # WAIT blocks the connection, not the server; its own timeout (ms)
            # stays inside ours so that its answer, not our timer, ends the wait.
            return int(await self._redis.wait(replicas, max(1, int(self._timeout * 800))))

        confirmed = await self._call(what, write_and_wait)
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
        """Close the pool (and the Sentinel connections)."""
        await self._redis.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()
