"""The coherence service: the cache, the origin and ZooKeeper, put together.

The HTTP layer calls only this module.  Every method runs on the event loop;
ZooKeeper events reach it through the :class:`~sidecar.coordination.Events`
methods, also on the loop, so the cache needs no locks.

Read (miss) protocol, per key::

    ticket = cache.begin_fill(key)        # 1. before anything else
    version = watch_version(key)          # 2. arm the watch, read the version
    value = origin.get(key)               # 3. only now read the origin
    cache.install(ticket, value@version)  # 4. refused if 1..4 saw an invalidation

Write protocol (PUT/DELETE), per key::

    local asyncio lock -> ZooKeeper lock -> [check If-Match / If-None-Match]
    -> origin write -> bump version (fires every watch) -> release
    -> re-arm our own watch and install the written value (best effort)

Serving policy by session state is in :meth:`CacheService.cached` and
:meth:`CacheService.fetch`; the README's "Connection states" section is its
documentation.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .cache import CoherentCache, Entry
from .config import Config
from .coordination import Coordinator, InvalidationReceipt, ZkState, validate_key
from .errors import (
    CoordinationError,
    InvalidationNotPublished,
    NotConnected,
    PayloadTooLarge,
    PreconditionFailed,
)
from .origins import Origin, OriginValue
from .singleflight import Group

__all__ = ["CacheService", "Fetched", "Stats"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Fetched:
    """A read that was not a plain hit: ``value`` is ``None`` when the origin has none."""

    value: OriginValue | None
    version: int | None  # None: unknown (read while disconnected from ZooKeeper)
    source: str  # "miss" (read through ZooKeeper protocol) or "bypass" (uncached)


@dataclass(slots=True)
class Stats:
    """Counters of the service; exported by /v1/stats and /metrics."""

    hits: int = 0
    misses: int = 0
    bypassed_reads: int = 0
    writes: int = 0
    deletes: int = 0
    invalidations_received: int = 0
    invalidations_published: int = 0
    flushes: int = 0


class CacheService:
    """Coherent read-through / write-through cache for one sidecar."""

    def __init__(self, config: Config, origin: Origin, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.origin = origin
        self.stats = Stats()
        self.cache = CoherentCache(config.max_entries, config.max_bytes, config.ttl)
        self._clock = clock
        self._flights: Group[Fetched] = Group()
        self._local_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._writes: set[asyncio.Task[Any]] = set()
        self._grace = config.effective_suspended_grace
        self._disconnected_since: float | None = clock()
        self.started_at = time.time()
        self.coord = Coordinator(
            hosts=config.zk,
            root=config.namespace_root,
            session_timeout=config.zk_session_timeout,
            member_id=config.member_id,
            member_info={
                "member_id": config.member_id,
                "address": str(config.listen),
                "started_at": self.started_at,
                "version": __version__,
                "origin": origin.name,
            },
            events=self,
        )

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start connecting to ZooKeeper (readiness follows asynchronously)."""
        self.coord.start()

    async def stop(self) -> None:
        """Finish writes in progress, leave the fleet, close the origin."""
        if self._writes:
            await asyncio.wait(self._writes, timeout=self.config.lock_timeout)
        await self.coord.stop()
        await self.origin.close()

    @property
    def ready(self) -> bool:
        """True when the session is connected and every namespace watch is armed."""
        return self.coord.ready

    # -- reads --------------------------------------------------------------
    def cached(self, key: str) -> Entry | None:
        """The cached entry if it may be served now (a hit), else ``None``.

        Connected: any cached entry.  Disconnected: entries are served for
        ``suspended_grace`` seconds after the connection was lost, never later.
        """
        entry = self.cache.get(key)
        if entry is None:
            return None
        if not self.coord.ready and not self._within_grace():
            return None
        self.stats.hits += 1
        return entry

    async def fetch(self, key: str) -> Fetched:
        """Read ``key`` when :meth:`cached` had nothing to serve."""
        if not self.coord.ready:
            return await self._read_disconnected(key)
        self.stats.misses += 1
        return await self._flights.do(key, lambda: self._fill(key))

    async def _fill(self, key: str) -> Fetched:
        ticket = self.cache.begin_fill(key)
        try:
            version = await self.coord.watch_version(key)
            stored = await self.origin.get(key)
            if stored is not None:
                self.cache.install(ticket, Entry.make(key, stored.value, stored.content_type, version))
            return Fetched(stored, version, "miss")
        finally:
            self.cache.end_fill(ticket)

    async def _read_disconnected(self, key: str) -> Fetched:
        if self.config.suspended_reads == "fail":
            raise NotConnected(f"ZooKeeper session is {self.coord.state.value} and cached values may be stale")
        self.stats.bypassed_reads += 1
        return Fetched(await self.origin.get(key), None, "bypass")

    def _within_grace(self) -> bool:
        since = self._disconnected_since
        return since is not None and self.coord.state is ZkState.SUSPENDED and self._clock() - since <= self._grace

    # -- writes -------------------------------------------------------------
    async def put(
        self, key: str, value: OriginValue, *, if_match: int | None = None, if_none_match: bool = False
    ) -> int:
        """Write-through; returns the new version. See the module docstring."""
        if len(value.value) > self.config.max_value_bytes:
            raise PayloadTooLarge(f"value is {len(value.value)} bytes; the limit is {self.config.max_value_bytes}")
        return await self._shielded(self._write(key, value, if_match, if_none_match))

    async def delete(self, key: str, *, if_match: int | None = None) -> int:
        """Delete-through; the version bump is the tombstone. Returns it."""
        return await self._shielded(self._write(key, None, if_match, False))

    async def _shielded(self, coro: Awaitable[int]) -> int:
        # Once the origin may have changed, the version bump must follow even
        # if the client goes away: run the write as its own task.
        task = asyncio.ensure_future(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _write(self, key: str, value: OriginValue | None, if_match: int | None, if_none_match: bool) -> int:
        validate_key(key)
        if not self.coord.ready:
            raise NotConnected(f"writes need ZooKeeper; the session is {self.coord.state.value}")
        local = self._local_locks.get(key)
        if local is None:
            local = self._local_locks[key] = asyncio.Lock()
        async with local, self.coord.locked(key, self.config.lock_timeout) as generation:
            if if_match is not None:
                current = await self.coord.read_version(key)
                if current != if_match:
                    raise PreconditionFailed(f'If-Match "{if_match}" but the current version is "{current}"', current)
            if if_none_match and await self.origin.get(key) is not None:
                raise PreconditionFailed("If-None-Match: * but the key has a value")
            if self.coord.state_generation != generation:
                raise CoordinationError("the ZooKeeper connection moved while holding the lock")
            self.cache.invalidate(key)
            self._flights.forget(key)
            if value is None:
                await self.origin.delete(key)
            else:
                await self.origin.put(key, value)
            version = await self._bump_until_published(key, "delete" if value is None else "put")
        if value is None:
            self.stats.deletes += 1
        else:
            self.stats.writes += 1
            await self._install_own_write(key, value, version)
        return version

    async def _bump_until_published(self, key: str, op: str) -> int:
        # The origin already has the new value: keep trying to tell the fleet
        # (across a reconnect, even a new session) until the lock timeout.
        deadline = self._clock() + self.config.lock_timeout
        backoff = 0.05
        while True:
            try:
                return await self.coord.bump_version(key, op)
            except CoordinationError as exc:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    log.error("key %r: origin written but version bump failed: %s", key, exc)
                    raise InvalidationNotPublished(
                        "the origin has the new value but other sidecars were not told; "
                        "retry the write or invalidate the key"
                    ) from exc
                log.warning("key %r: version bump failed (%s); retrying", key, exc)
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 1.0)
                try:
                    await self.coord.zk.wait_connected(max(deadline - self._clock(), 0.001))
                except NotConnected:
                    continue

    async def _install_own_write(self, key: str, value: OriginValue, version: int) -> None:
        # Re-arm our watch and cache what we wrote, through the same ticket
        # protocol as a fill: if anything newer arrived meanwhile, skip it.
        ticket = self.cache.begin_fill(key)
        try:
            if await self.coord.watch_version(key) == version:
                self.cache.install(ticket, Entry.make(key, value.value, value.content_type, version))
        except CoordinationError:
            pass  # best effort: the next read fills it
        finally:
            self.cache.end_fill(ticket)

    # -- invalidation -------------------------------------------------------
    async def invalidate(self, keys: list[str], prefixes: list[str], everything: bool) -> InvalidationReceipt:
        """Publish a fleet-wide invalidation (no origin change); apply it here at once."""
        for key in keys:
            validate_key(key)
        for prefix in prefixes:
            validate_key(prefix)
        receipt = await self.coord.publish(keys, prefixes, everything)
        self.stats.invalidations_published += 1
        if everything:
            self._drop_all()
        for key in keys:
            self._drop_key(key)
        for prefix in prefixes:
            self._drop_prefix(prefix)
        return receipt

    def _drop_key(self, key: str) -> None:
        self.cache.invalidate(key)
        self._flights.forget(key)

    def _drop_prefix(self, prefix: str) -> None:
        self.cache.invalidate_prefix(prefix)
        # Over-approximates: forgets every flight, so later callers refill.
        self._flights.forget_all()

    def _drop_all(self) -> None:
        self.cache.invalidate_all()
        self._flights.forget_all()

    # -- coordination events (Events protocol; on the loop) -----------------
    def key_changed(self, key: str) -> None:
        """A key's version znode changed: drop it and void its fills."""
        self.stats.invalidations_received += 1
        self._drop_key(key)

    def prefixes_invalidated(self, prefixes: list[str]) -> None:
        """New prefix-log entries arrived."""
        self.stats.invalidations_received += len(prefixes)
        for prefix in prefixes:
            self._drop_prefix(prefix)

    def flush(self, reason: str) -> None:
        """Drop everything and void every fill."""
        self.stats.flushes += 1
        self.stats.invalidations_received += 1
        log.info("flushing the cache: %s", reason)
        self._drop_all()

    def state_changed(self, state: ZkState) -> None:
        """Any state change may have cost us watches: no fill begun before it may install."""
        self.cache.void_fills()
        self._flights.forget_all()
        if state is ZkState.CONNECTED:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = self._clock()

    # -- introspection ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /v1/stats``."""
        s, c = self.stats, self.cache
        return {
            "member_id": self.config.member_id,
            "namespace": self.config.namespace,
            "zookeeper": {
                "state": self.coord.state.value,
                "ready": self.coord.ready,
                "session": f"0x{self.coord.zk.session_id or 0:x}",
                "sessions": self.coord.sessions,
            },
            "entries": len(c),
            "bytes": c.bytes,
            "max_entries": self.config.max_entries,
            "max_bytes": self.config.max_bytes,
            "hits": s.hits,
            "misses": s.misses,
            "bypassed_reads": s.bypassed_reads,
            "evictions": c.counters.evictions,
            "invalidations_received": s.invalidations_received,
            "invalidations_published": s.invalidations_published,
            "entries_invalidated": c.counters.invalidated_entries,
            "refused_fills": c.counters.refused_fills,
            "flushes": s.flushes,
            "writes": s.writes,
            "deletes": s.deletes,
            "fills_in_flight": c.fills_in_flight,
            "origin": self.origin.name,
            "version": __version__,
        }
