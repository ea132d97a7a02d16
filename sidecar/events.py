"""What ZooKeeper's events do to the cache, and the restore of its watches after a reconnect.

:class:`CacheEvents` is the :class:`~sidecar.coordination.Events` listener of
the coordinator: every call comes on the event loop.  It is also the one
place that drops entries (``drop_key``, ``drop_prefixes``, ``drop_all``), for
the read and write protocols and for invalidations published here, so that
dropping an entry always voids its fills in flight and detaches its flight:

* a fill that began before an invalidation of its key is never installed
  (``cache.FillTicket``), and
* a reader arriving after it never joins a flight that read the origin
  before it (``singleflight.Group.forget``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .cache import CoherentCache
from .coordination import ZkState
from .singleflight import Group
from .stats import Stats

if TYPE_CHECKING:
    from .reads import Fetched

__all__ = ["CacheEvents"]

log = logging.getLogger(__name__)


class CacheEvents:
    """Applies invalidations to one cache (the loop only)."""

    def __init__(self, cache: CoherentCache, flights: Group[Fetched], stats: Stats) -> None:
        self.cache = cache
        self.flights = flights
        self.stats = stats

    def drop_key(self, key: str) -> None:
        """Drop ``key`` and void its fills; later readers start a new flight."""
        self.cache.invalidate(key)
        self.flights.forget(key)

    def drop_prefixes(self, prefixes: list[str]) -> None:
        """Drop every key under ``prefixes`` and void their fills."""
        if prefixes:
            self.cache.invalidate_prefixes(prefixes)  # one pass over the cache
            # Over-approximates: forgets every flight, so later callers refill.
            self.flights.forget_all()

    def drop_all(self) -> None:
        """Drop everything and void every fill."""
        self.cache.invalidate_all()
        self.flights.forget_all()

    # -- coordination events (the Events protocol) ---------------------------
    def key_changed(self, key: str) -> None:
        """A key's version znode changed: drop it and void its fills."""
        self.stats.invalidations_received += 1
        self.drop_key(key)

    def prefixes_invalidated(self, prefixes: list[str]) -> None:
        """New prefix-log entries arrived."""
        self.stats.invalidations_received += len(prefixes)
        self.drop_prefixes(prefixes)

    def flush(self, reason: str) -> None:
        """Drop everything and void every fill."""
        self.stats.flushes += 1
        self.stats.invalidations_received += 1
        log.info("flushing the cache: %s", reason)
        self.drop_all()

    async def restore(self, restore_watches: Callable[[dict[str, int]], Awaitable[None]]) -> None:
        """Hand back every cached key's watch after a reconnect; the keys that changed meanwhile are dropped.

        Runs while the sidecar is not ready (no hit is served, no fill
        installs).  ``restore_watches`` (``Coordinator.restore_watches``)
        returns once ZooKeeper's events for the keys changed since the loss
        are applied here: those entries are gone, the others are watched
        again.  Each key holds a fill ticket meanwhile, so that none is
        reported vacated (its watch removed) while its watch is being restored.
        """
        started = time.monotonic()
        versions = {key: entry.version for key in self.cache.keys() if (entry := self.cache.peek(key)) is not None}
        tickets = [self.cache.begin_fill(key) for key in versions]
        try:
            await restore_watches(versions)
        finally:
            for ticket in tickets:
                self.cache.end_fill(ticket)
        dropped = sum(1 for key in versions if key not in self.cache)
        elapsed = time.monotonic() - started
        s = self.stats
        s.revalidations += 1
        s.last_revalidation_entries, s.last_revalidation_dropped = len(versions), dropped
        s.last_revalidation_seconds = elapsed
        log.info("restored the watches of %d cached entries in %.3fs; %d had changed", len(versions), elapsed, dropped)

    def void_fills(self) -> None:
        """An invalidation is on its way (a prefix-log event): no fill begun before it may install."""
        self.cache.void_fills()
        self.flights.forget_all()

    def state_changed(self, state: ZkState) -> None:
        """Any state change may have cost us watches: no fill begun before it may install."""
        self.void_fills()
