"""The coherence service: the cache, the origin and ZooKeeper, put together.

The HTTP layer calls only this module.  Every method runs on the event loop;
ZooKeeper events reach it through the :class:`~sidecar.coordination.Events`
methods, also on the loop, so the cache needs no locks.

Read (miss) protocol, per key::

    ticket = cache.begin_fill(key)        # 1. before anything else
    version = watch_version(key)          # 2. arm the watch, read the version
    value = origin.get(key)               # 3. only now read the origin
    cache.install(ticket, value@version)  # 4. refused if 1..4 saw an invalidation

The write protocol (PUT/DELETE) is one object, :class:`~sidecar.writes.WriteProtocol`.
After a write the writer does not cache the value it wrote: between its origin
write and its version bump an outside writer (or, after a lost lock, another
sidecar) may have written the origin again, and only a read after the bump can
tell; it refills through the read protocol instead.

Serving policy by session state is in :meth:`CacheService.cached` and
:meth:`CacheService.fetch`; the README's "Connection states" section is its
documentation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .cache import CoherentCache, Entry
from .config import Config
from .coordination import Coordinator, InvalidationReceipt, ZkState, validate_key
from .errors import (
    CoordinationError,
    FillsNotAllowed,
    NotAcknowledged,
    NotConnected,
    PayloadTooLarge,
    PreconditionFailed,
    ZkAccessDenied,
)
from .origins import NoOrigin, Origin, OriginValue
from .singleflight import Group
from .writes import WriteProtocol, Written

__all__ = ["CacheService", "Fetched", "Stats", "Written"]

# exists() calls in flight at once while revalidating: enough to fill the
# pipe to ZooKeeper, few enough not to flood its request queue.
_REVALIDATE_BATCH = 1000

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
    strong_reads: int = 0
    fills: int = 0
    revalidations: int = 0
    last_revalidation_entries: int = 0
    last_revalidation_dropped: int = 0
    last_revalidation_seconds: float = 0.0
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
        self._writes: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._grace = config.effective_suspended_grace
        # A plain GET (no query) is served by the HTTP layer's short path.
        self.hit_path_plain = config.consistency == "eventual" and not isinstance(origin, NoOrigin)
        # Cache-aside fills: always with no origin; over a read-through origin
        # only when allowed, since any local client could then cache bytes the
        # origin never had (strong reads never serve those).
        self.fills_allowed = isinstance(origin, NoOrigin) or config.fills == "allow"
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
            auth=config.zk_auth,
        )
        self.writes = WriteProtocol(config, origin, self.coord, drop=self._drop_key, written=self._written)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start connecting to ZooKeeper (readiness follows asynchronously)."""
        self.coord.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Finish writes in progress, leave the fleet, close the origin: within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.config.lock_timeout + 5.0)
        # Closing the session needs a moment of the budget; writes get the rest.
        if self._writes:
            await asyncio.wait(self._writes, timeout=max(0.0, deadline - loop.time() - 1.5))
        # The origin closes before the session does: a write still queued is
        # cancelled and a running one finishes while this session still holds
        # its lock, so no write lands after the lock is gone. Writes then
        # release (or publish) on the open session.
        await self.origin.close()
        if self._writes:
            await asyncio.wait(self._writes, timeout=max(0.0, deadline - loop.time() - 1.0))
        await self.writes.janitor.stop(timeout=max(0.0, deadline - loop.time() - 1.0))
        for task in self._background:
            task.cancel()
        await self.coord.stop(timeout=max(0.1, deadline - loop.time()))

    @property
    def ready(self) -> bool:
        """Connected, every namespace watch armed, and ZooKeeper answered within the lease."""
        return self.coord.usable

    # -- reads --------------------------------------------------------------
    def cached(self, key: str) -> Entry | None:
        """The cached entry if it may be served now (a hit), else ``None``.

        Connected: any cached entry, as long as ZooKeeper answered within
        ``lease + grace``.  Disconnected: for ``suspended_grace`` seconds after
        the connection was lost.  So no hit is served more than
        ``2/3 * session timeout + grace`` (at most one session timeout) after
        this sidecar last heard from ZooKeeper.
        """
        entry = self.cache.get(key)
        if entry is None or not self._may_serve_cached():
            return None
        self.stats.hits += 1
        return entry

    def _may_serve_cached(self) -> bool:
        coord = self.coord
        if coord.silence() > coord.lease + self._grace:
            return False
        if coord.ready:
            return True
        # The grace counts from the first loss of watches not yet repaired by
        # a completed revalidation: a second loss during revalidation must not
        # start it again for entries nobody re-checked.
        since = coord.unwatched_since
        return coord.state is ZkState.SUSPENDED and since is not None and time.monotonic() - since <= self._grace

    async def read_strong(self, key: str) -> tuple[Entry | Fetched, str]:
        """A read never older than any write or invalidation acknowledged before it began.

        ``sync``, then ``exists`` on the key, the epoch and the prefix log
        (one pipelined round trip via the leader); epoch or prefix entries not
        applied here yet are applied first (:meth:`Coordinator.key_state`).
        The cached entry is served only if it survived that and its version is
        still current; otherwise the key is filled afresh, not through a
        flight that may have started before this read.  Without a usable
        session the origin itself is read (still strong: writes are
        acknowledged only after the origin has them), or 503 with
        ``suspended_reads = fail``.  Values installed by fills are never
        served here over a read-through origin: the origin is the truth.
        """
        if not self.coord.usable:
            return await self._read_disconnected(key), "bypass"
        try:
            state = await self.coord.key_state(key, strong=True)
        except CoordinationError as exc:
            return await self._after_coordination_error(key, exc), "bypass"
        self.stats.strong_reads += 1
        entry = self.cache.get(key)
        if (
            entry is not None
            and entry.version == state.version
            and not state.writing
            and not (entry.filled and not isinstance(self.origin, NoOrigin))
        ):
            self.stats.hits += 1
            return entry, "hit"
        self.stats.misses += 1
        return await self._fill_or_bypass(key), "miss"

    async def lease(self, key: str) -> int:
        """Cache-aside miss: arm the key's watch and return its lease.

        The lease is the key's coverage version (:attr:`KeyState.lease`): it
        moves with every write or invalidation of the key and with every
        covering prefix or invalidate-all.  The application then loads the
        value from its own store and hands it to :meth:`fill` with the lease.
        """
        self._require_fills()
        self.coord.require_usable("leases need ZooKeeper")
        self.stats.misses += 1
        return (await self.coord.key_state(key, watch=True)).lease

    async def fill(self, key: str, value: OriginValue, lease: int) -> int:
        """Install a value the application loaded, if the key's lease is still ``lease``.

        Nothing is written to the origin or to ZooKeeper.  Refused (412) when
        the key was written or invalidated since the lease was handed out, by
        key, prefix or invalidate-all: the application may have read its
        store before that.  This is the stale-set race of cache-aside caches,
        closed.
        """
        validate_key(key)
        self._check_size(value)
        self._require_fills()
        self.coord.require_usable("fills need ZooKeeper")
        ticket = self.cache.begin_fill(key)  # before the watch, as every fill
        try:
            state = await self.coord.key_state(key, watch=True)
            if state.lease != lease or state.writing:
                raise PreconditionFailed(
                    f'lease "{lease}" is stale: the key was written or invalidated since (now "{state.lease}")',
                    state.lease,
                )
            entry = Entry.make(key, value.value, value.content_type, state.version, filled=True)
            if not self.cache.install(ticket, entry):
                raise PreconditionFailed(f'the key was invalidated while installing lease "{lease}"', None)
            self.stats.fills += 1
            return state.version
        finally:
            self.cache.end_fill(ticket)

    def _require_fills(self) -> None:
        if not self.fills_allowed:
            raise FillsNotAllowed(
                "this sidecar reads through its origin; cache-aside fills are off (set fills = allow to enable)"
            )

    async def fetch(self, key: str) -> Fetched:
        """Read ``key`` when :meth:`cached` had nothing to serve."""
        if not self.coord.usable:
            return await self._read_disconnected(key)
        self.stats.misses += 1
        try:
            return await self._flights.do(key, lambda: self._fill(key))
        except CoordinationError as exc:
            return await self._after_coordination_error(key, exc)

    async def _fill_or_bypass(self, key: str) -> Fetched:
        try:
            return await self._fill(key)
        except CoordinationError as exc:
            return await self._after_coordination_error(key, exc)

    async def _after_coordination_error(self, key: str, exc: CoordinationError) -> Fetched:
        # The connection dropped under a read: like any read while
        # disconnected, it goes to the origin uncached (or fails, by policy).
        # A refusal by ZooKeeper (ACLs) is a configuration error, not that.
        if isinstance(exc, ZkAccessDenied):
            raise exc
        log.debug("read of %r lost ZooKeeper midway (%s); reading the origin uncached", key, exc)
        return await self._read_disconnected(key)

    async def _fill(self, key: str) -> Fetched:
        ticket = self.cache.begin_fill(key)
        try:
            version, writing = await self.coord.watch_version(key)
            stored = await self.origin.get(key)
            # While a write is in progress (or its writer died before finishing)
            # the origin may change without another bump: serve, do not cache.
            if stored is not None and not writing:
                self.cache.install(ticket, Entry.make(key, stored.value, stored.content_type, version))
            return Fetched(stored, version, "miss")
        finally:
            self.cache.end_fill(ticket)

    async def _read_disconnected(self, key: str) -> Fetched:
        if self.config.suspended_reads == "fail":
            raise NotConnected(f"{self.coord.describe_state()}; cached values may be stale")
        self.stats.bypassed_reads += 1
        return Fetched(await self.origin.get(key), None, "bypass")

    # -- writes -------------------------------------------------------------
    async def put(
        self, key: str, value: OriginValue, *, if_match: int | None = None, if_none_match: bool = False
    ) -> Written:
        """Write-through; returns the new version (``writes.WriteProtocol``)."""
        self._check_size(value)
        return await self._shielded(self.writes.write(key, value, if_match=if_match, if_none_match=if_none_match))

    def _check_size(self, value: OriginValue) -> None:
        if len(value.value) > self.config.max_value_bytes:
            raise PayloadTooLarge(f"value is {len(value.value)} bytes; the limit is {self.config.max_value_bytes}")

    async def delete(self, key: str, *, if_match: int | None = None) -> Written:
        """Delete-through; the version bump is the tombstone. Returns it."""
        return await self._shielded(self.writes.write(key, None, if_match=if_match))

    async def _shielded(self, coro: Awaitable[Written]) -> Written:
        # Once the origin may have changed, the version bump must follow even
        # if the client goes away: run the write as its own task.
        task = asyncio.ensure_future(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    def _written(self, key: str, deleted: bool) -> None:
        if deleted:
            self.stats.deletes += 1
        else:
            self.stats.writes += 1
            self._spawn(self._refill(key))

    async def _refill(self, key: str) -> None:
        # "Update the local entry" after a write, through the read protocol
        # (watch, then origin read): correct whoever wrote the origin last.
        try:
            await self._flights.do(key, lambda: self._fill(key))
        except Exception as exc:  # best effort; the next read fills it
            log.debug("refill of %r after write failed: %s", key, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- invalidation -------------------------------------------------------
    async def invalidate(
        self, keys: list[str], prefixes: list[str], everything: bool, *, wait: float | None = None
    ) -> InvalidationReceipt:
        """Publish a fleet-wide invalidation (no origin change); apply it here at once.

        With ``wait`` (seconds), return only once every live sidecar confirmed
        it applied the invalidation; raise :class:`NotAcknowledged` naming the
        others when ``wait`` runs out.
        """
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
        self._drop_prefixes(prefixes)
        if wait is not None:
            receipt.ack = await self.coord.await_acknowledgement(receipt.zxid, wait)
            if not receipt.ack.complete:
                raise NotAcknowledged(
                    f"published at zxid {receipt.zxid}, but not confirmed within {wait:g}s by: "
                    + ", ".join(receipt.ack.missing),
                    receipt.ack.missing,
                    receipt.ack.confirmed,
                )
        return receipt

    def _drop_key(self, key: str) -> None:
        self.cache.invalidate(key)
        self._flights.forget(key)

    def _drop_prefixes(self, prefixes: list[str]) -> None:
        if prefixes:
            self.cache.invalidate_prefixes(prefixes)  # one pass over the cache
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
        self._drop_prefixes(prefixes)

    def flush(self, reason: str) -> None:
        """Drop everything and void every fill."""
        self.stats.flushes += 1
        self.stats.invalidations_received += 1
        log.info("flushing the cache: %s", reason)
        self._drop_all()

    async def revalidate(self) -> None:
        """Re-arm the watch of every cached key and drop those whose version moved.

        Runs while the sidecar is not ready (no hit is served, no fill
        installs).  Each check takes a fill ticket before arming the watch, as
        a fill does, so an event that arrives meanwhile still drops the entry.
        The ``exists`` calls are pipelined in batches on the one connection.
        """
        started = self._clock()
        keys = self.cache.keys()
        tickets = {key: self.cache.begin_fill(key) for key in keys}
        dropped = 0
        try:
            for i in range(0, len(keys), _REVALIDATE_BATCH):
                batch = keys[i : i + _REVALIDATE_BATCH]
                versions = await self.coord.watch_versions(batch)
                for key, (version, writing) in zip(batch, versions, strict=True):
                    entry = self.cache.peek(key)
                    if entry is not None and (not tickets[key].valid or writing or entry.version != version):
                        self._drop_key(key)
                        dropped += 1
        finally:
            for ticket in tickets.values():
                self.cache.end_fill(ticket)
        elapsed = self._clock() - started
        s = self.stats
        s.revalidations += 1
        s.last_revalidation_entries, s.last_revalidation_dropped = len(keys), dropped
        s.last_revalidation_seconds = elapsed
        log.info("revalidated %d cached entries in %.3fs; %d had changed", len(keys), elapsed, dropped)

    def void_fills(self) -> None:
        """An invalidation is on its way (a prefix-log event): no fill begun before it may install."""
        self.cache.void_fills()
        self._flights.forget_all()

    def state_changed(self, state: ZkState) -> None:
        """Any state change may have cost us watches: no fill begun before it may install."""
        self.void_fills()

    # -- introspection ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /v1/stats``."""
        s, c = self.stats, self.cache
        return {
            "member_id": self.config.member_id,
            "namespace": self.config.namespace,
            "zookeeper": {
                "state": self.coord.state.value,
                "ready": self.coord.usable,
                "silence_seconds": round(self.coord.silence(), 3),
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
            "strong_reads": s.strong_reads,
            "fills": s.fills,
            "evictions": c.counters.evictions,
            "invalidations_received": s.invalidations_received,
            "invalidations_published": s.invalidations_published,
            "entries_invalidated": c.counters.invalidated_entries,
            "refused_fills": c.counters.refused_fills,
            "flushes": s.flushes,
            "revalidation": {
                "count": s.revalidations,
                "entries": s.last_revalidation_entries,
                "dropped": s.last_revalidation_dropped,
                "seconds": round(s.last_revalidation_seconds, 4),
            },
            "writes": s.writes,
            "deletes": s.deletes,
            "writes_in_progress": len(self._writes),
            "locks_being_released": len(self.writes.janitor),
            "key_events": {
                "count": self.coord.key_events.count,
                "last_arrived_monotonic": self.coord.key_events.last_arrived,
                "last_applied_monotonic": self.coord.key_events.last_applied,
                "hop_ms_mean": round(
                    1000 * self.coord.key_events.hop_seconds_total / max(self.coord.key_events.count, 1), 4
                ),
                "hop_ms_max": round(1000 * self.coord.key_events.hop_seconds_max, 4),
            },
            "fills_in_flight": c.fills_in_flight,
            "origin": self.origin.name,
            "version": __version__,
        }
