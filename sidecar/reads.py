"""The read protocol: hit policy, read-through fills, strong reads, cache-aside leases.

Per key, a miss (README, "Read (miss) protocol")::

    ticket = cache.begin_fill(key)        # 1. before anything else
    version = watch_version(key)          # 2. arm the watch, read the version
    value = origin.get(key)               # 3. only now read the origin
    cache.install(ticket, value@version)  # 4. refused if 1..4 saw an invalidation

Invariants, and what keeps each one:

* *A fill that began before an invalidation of its key is never installed*:
  the ticket exists before the watch is armed, and every invalidation that
  covers the key (its watch, a prefix, invalidate-all, a prefix-log event, a
  session state change) voids it (``events.CacheEvents``), whichever order
  kazoo's two threads deliver the event and the ``exists`` reply in.
* *A hit is never served past the documented bound*: :meth:`ReadProtocol.cached`
  (README, "Connection states").
* *A strong read is never older than any write or invalidation acknowledged
  before it began*: ``Coordinator.key_state`` syncs and catches up on the
  epoch and the prefix log before the entry is compared.
* *A fill under a lease older than any covering invalidation is refused*:
  the lease is the key's coverage version (``KeyState.lease``).

Every method runs on the loop; nothing here blocks it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .cache import CoherentCache, Entry
from .config import Config
from .coordination import Coordinator, validate_key
from .errors import (
    CoordinationError,
    FillsNotAllowed,
    NotConnected,
    PayloadTooLarge,
    PreconditionFailed,
    ZkAccessDenied,
)
from .origins import NoOrigin, Origin, OriginValue
from .probe import ConsistencyProbe
from .singleflight import Group
from .stats import Stats

__all__ = ["Fetched", "ReadProtocol"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Fetched:
    """A read that was not a plain hit: ``value`` is ``None`` when the origin has none."""

    value: OriginValue | None
    version: int | None  # None: unknown (read while disconnected from ZooKeeper)
    source: str  # "miss" (read through ZooKeeper protocol) or "bypass" (uncached)


class ReadProtocol:
    """Reads of one sidecar (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        origin: Origin,
        cache: CoherentCache,
        coord: Coordinator,
        stats: Stats,
        flights: Group[Fetched],
    ) -> None:
        self._config = config
        self._origin = origin
        self._cache = cache
        self._coord = coord
        self._stats = stats
        self._flights = flights
        self._grace = config.effective_suspended_grace
        # Cache-aside fills: always with no origin; over a read-through origin
        # only when allowed, since any local client could then cache bytes the
        # origin never had (strong reads never serve those).
        self.fills_allowed = isinstance(origin, NoOrigin) or config.fills == "allow"
        # None (the default, off) costs a hit one attribute test.
        self.probe = (
            ConsistencyProbe(config.consistency_probe_rate, config.consistency_probe_window, coord, origin)
            if config.consistency_probe_rate > 0 and not isinstance(origin, NoOrigin)
            else None
        )

    def reconfigure(self, config: Config) -> None:
        """Live settings changed (``suspended_reads``, the probe's rate and window)."""
        self._config = config
        if self.probe is not None:
            self.probe.rate, self.probe.window = config.consistency_probe_rate, config.consistency_probe_window
        elif config.consistency_probe_rate > 0 and not isinstance(self._origin, NoOrigin):
            self.probe = ConsistencyProbe(
                config.consistency_probe_rate, config.consistency_probe_window, self._coord, self._origin
            )

    def cached(self, key: str) -> Entry | None:
        """The cached entry if it may be served now (a hit), else ``None``.

        Ready: any cached entry, as long as ZooKeeper answered within
        ``lease + grace``.  Not ready (disconnected, or connected again and
        still restoring its watches): for ``suspended_grace`` seconds after
        the first loss of watches that no completed restore has repaired
        (``Coordinator.unwatched_since``).  So no hit is served more than
        ``2/3 * session timeout + grace`` (at most one session timeout) after
        this sidecar last heard from ZooKeeper.
        """
        entry = self._cache.get(key)
        if entry is None or not self._may_serve_cached():
            return None
        self._stats.hits += 1
        if self.probe is not None and self.probe.wanted():
            self.probe.sample(key, entry)
        return entry

    def _may_serve_cached(self) -> bool:
        coord = self._coord
        if coord.silence() > coord.lease + self._grace:
            return False
        if coord.ready:
            return True
        # The grace counts from the first loss of watches not yet repaired by
        # a completed restore: a second loss during the restore must not start
        # it again for entries nobody re-checked. The state does not matter:
        # connected again, the restore only drops entries, never vouches for
        # one before it completes. LOST ends the grace (unwatched_since -inf).
        since = coord.unwatched_since
        return since is not None and time.monotonic() - since <= self._grace

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
        if not self._coord.usable:
            return await self._read_disconnected(key), "bypass"
        try:
            state = await self._coord.key_state(key, strong=True)
        except CoordinationError as exc:
            return await self._after_coordination_error(key, exc), "bypass"
        self._stats.strong_reads += 1
        entry = self._cache.get(key)
        if (
            entry is not None
            and entry.version == state.version
            and not state.writing
            and not (entry.filled and not isinstance(self._origin, NoOrigin))
        ):
            self._stats.hits += 1
            return entry, "hit"
        self._stats.misses += 1
        return await self._fill_or_bypass(key), "miss"

    async def lease(self, key: str) -> int:
        """Cache-aside miss: arm the key's watch and return its lease.

        The lease is the key's coverage version (:attr:`KeyState.lease`): it
        moves with every write or invalidation of the key and with every
        covering prefix or invalidate-all.  The application then loads the
        value from its own store and hands it to :meth:`fill` with the lease.
        """
        self._require_fills()
        self._coord.require_usable("leases need ZooKeeper")
        self._stats.misses += 1
        # A ticket only to count as a fill in flight: the watch armed here is
        # removed when the lease is handed out (the fill arms its own).
        ticket = self._cache.begin_fill(key)
        try:
            return (await self._coord.key_state(key, watch=True)).lease
        finally:
            self._cache.end_fill(ticket)

    async def fill(self, key: str, value: OriginValue, lease: int) -> int:
        """Install a value the application loaded, if the key's lease is still ``lease``.

        Nothing is written to the origin or to ZooKeeper.  Refused (412) when
        the key was written or invalidated since the lease was handed out, by
        key, prefix or invalidate-all: the application may have read its
        store before that.  This is the stale-set race of cache-aside caches,
        closed.
        """
        validate_key(key)
        if len(value.value) > self._config.max_value_bytes:
            raise PayloadTooLarge(f"value is {len(value.value)} bytes; the limit is {self._config.max_value_bytes}")
        self._require_fills()
        self._coord.require_usable("fills need ZooKeeper")
        ticket = self._cache.begin_fill(key)  # before the watch, as every fill
        try:
            state = await self._coord.key_state(key, watch=True)
            if state.lease != lease or state.writing:
                raise PreconditionFailed(
                    f'lease "{lease}" is stale: the key was written or invalidated since (now "{state.lease}")',
                    state.lease,
                )
            entry = Entry.make(key, value.value, value.content_type, state.version, filled=True)
            if not self._cache.install(ticket, entry):
                raise PreconditionFailed(f'the key was invalidated while installing lease "{lease}"', None)
            self._stats.fills += 1
            return state.etag
        finally:
            self._cache.end_fill(ticket)

    def _require_fills(self) -> None:
        if not self.fills_allowed:
            raise FillsNotAllowed(
                "this sidecar reads through its origin; cache-aside fills are off (set fills = allow to enable)"
            )

    async def fetch(self, key: str) -> Fetched:
        """Read ``key`` when :meth:`cached` had nothing to serve."""
        if not self._coord.usable:
            return await self._read_disconnected(key)
        self._stats.misses += 1
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
        ticket = self._cache.begin_fill(key)
        try:
            version, writing = await self._coord.watch_version(key)
            stored = await self._origin.get(key)
            # While a write is in progress (or its writer died before finishing)
            # the origin may change without another bump: serve, do not cache.
            if stored is not None and not writing:
                self._cache.install(ticket, Entry.make(key, stored.value, stored.content_type, version))
            return Fetched(stored, version, "miss")
        finally:
            self._cache.end_fill(ticket)

    async def refill(self, key: str) -> None:
        """After a write: update the local entry through the read protocol (best effort).

        The writer does not cache the value it wrote: between its origin
        write and its version bump an outside writer may have written the
        origin again, and only a read after the bump can tell.
        """
        try:
            await self._flights.do(key, lambda: self._fill(key))
        except Exception as exc:  # the next read fills it
            log.debug("refill of %r after write failed: %s", key, exc)

    async def _read_disconnected(self, key: str) -> Fetched:
        if self._config.suspended_reads == "fail":
            raise NotConnected(f"{self._coord.describe_state()}; cached values may be stale")
        self._stats.bypassed_reads += 1
        return Fetched(await self._origin.get(key), None, "bypass")
