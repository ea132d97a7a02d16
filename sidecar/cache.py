"""The local cache: an LRU bounded by entries and bytes, with fill tickets.

Pure: no I/O, no ZooKeeper, no HTTP.  **Not safe for concurrent access**: only
the event loop thread may call it (kazoo events reach it through ``bridge.post``).

Fill tickets carry the coherence invariant "a fill that began before an
invalidation of its key is never installed":

1. the caller takes a ticket with :meth:`CoherentCache.begin_fill` *before* it
   arms the ZooKeeper watch and before it reads the origin;
2. every invalidation that covers the key (the key itself, a prefix of it,
   everything, or a connection state change) voids the tickets in flight for
   it, besides dropping the entry;
3. :meth:`CoherentCache.install` refuses a voided ticket.

``on_vacated(key)`` is called whenever a key is left with neither an entry
nor a fill in flight (evicted, expired, dropped, or a fill that installed
nothing ended), so that its ZooKeeper watch can go too: the watches a
sidecar holds then stay bounded by what it caches.

Because the ticket exists before the watch is armed, it does not matter whether
kazoo delivers the watch event to the loop before or after the completion of the
``exists`` call that armed it: either way the event is processed on the loop
after step 1 and voids the ticket.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cachetools

__all__ = ["ENTRY_OVERHEAD", "CacheCounters", "CoherentCache", "Entry", "FillTicket"]

log = logging.getLogger(__name__)

# Bytes charged per entry on top of key and value, so that max_bytes bounds
# the process's memory and not just the payload. `python -m bench.memory`
# measured ~950 B of RSS per entry beyond key and value (100,000 entries,
# 2026-12-01): kazoo's record of the key's watch (~320 B), the key-watch
# ledger's set entry (~50 B), the Entry object, its key and the LRU
# bookkeeping (~280 B), and allocator overhead.
ENTRY_OVERHEAD = 950


@dataclass(slots=True, frozen=True)
class Entry:
    """A cached value and the version (ZooKeeper mzxid) it was read at."""

    value: bytes
    content_type: str
    version: int
    size: int = 0
    filled: bool = False  # installed by the application (PUT ?fill=true), not read from the origin

    @classmethod
    def make(cls, key: str, value: bytes, content_type: str, version: int, *, filled: bool = False) -> Entry:
        """Build an entry charged for everything it holds: key, value, content type, fixed overhead."""
        # The content type is charged whole even when interned and shared:
        # one 8 KB content type per entry must not slip past max_bytes.
        size = len(value) + len(key.encode("utf-8", "surrogatepass")) + len(content_type) + ENTRY_OVERHEAD
        # A handful of distinct content types across many entries: share them.
        return cls(value, sys.intern(content_type), version, size, filled)


@dataclass(slots=True, eq=False)
class FillTicket:
    """Permission to install one fill of ``key``; voided by any invalidation of it."""

    key: str
    valid: bool = True


@dataclass(slots=True)
class CacheCounters:
    """Monotonic counters the cache itself can observe."""

    evictions: int = 0
    invalidated_entries: int = 0
    refused_fills: int = 0


class _BoundedMixin:
    """Adds an entry-count bound and eviction counting to a cachetools cache."""

    max_entries: int
    counters: CacheCounters
    on_removed: Callable[[str], None]  # an entry left on the cache's own account

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)  # type: ignore[misc]
        while len(self) > self.max_entries:  # type: ignore[arg-type]
            self.popitem()

    def popitem(self) -> tuple[Any, Any]:
        # cachetools calls popitem only to make room: that is an eviction.
        item = super().popitem()  # type: ignore[misc]
        self.counters.evictions += 1
        self.on_removed(item[0])
        return item  # type: ignore[no-any-return]


class _LRU(_BoundedMixin, cachetools.LRUCache[str, Entry]):
    pass


class _TTLLRU(_BoundedMixin, cachetools.TTLCache[str, Entry]):
    def expire(self, time: float | None = None) -> list[tuple[str, Entry]]:
        # cachetools expires entries inside its own operations: report each.
        expired: list[tuple[str, Entry]] = super().expire(time)
        for key, _ in expired:
            self.on_removed(key)
        return expired


def _entry_size(entry: Entry) -> int:
    return entry.size


class CoherentCache:
    """LRU of :class:`Entry` bounded by count and bytes, with optional TTL."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl: float = 0.0,
        timer: Callable[[], float] = time.monotonic,
        on_vacated: Callable[[str], None] | None = None,
    ) -> None:
        self.counters = CacheCounters()
        self.on_vacated: Callable[[str], None] = on_vacated or _ignore
        self._timer = timer
        self._ttl = ttl
        self._data = self._new_data(max_entries, max_bytes, ttl)
        self._fills: dict[str, list[FillTicket]] = {}

    def _new_data(self, max_entries: int, max_bytes: int, ttl: float) -> _LRU | _TTLLRU:
        data: _LRU | _TTLLRU
        if ttl > 0:
            data = _TTLLRU(maxsize=max_bytes, ttl=ttl, timer=self._timer, getsizeof=_entry_size)
        else:
            data = _LRU(maxsize=max_bytes, getsizeof=_entry_size)
        data.max_entries = max_entries
        data.counters = self.counters
        data.on_removed = self._removed
        return data

    def reconfigure(self, max_entries: int, max_bytes: int, ttl: float) -> None:
        """New bounds and TTL, keeping what fits: the least recently used entries go first.

        Each eviction is reported (its watch released); nothing else is
        dropped.  With the TTL unchanged the store shrinks in place, in time
        proportional to what it evicts, and every entry keeps its expiry.  A
        new TTL needs a new store: entries move into it in LRU order, and
        their lifetime starts again now (the TTL bounds age in the cache;
        coherence does not rest on it).
        """
        if ttl == self._ttl:
            data = self._data
            data.max_entries = max_entries
            # cachetools has no setter for maxsize; its private name has been
            # stable for years, and the cache tests catch a change.
            data._Cache__maxsize = max_bytes  # type: ignore[union-attr]
            assert data.maxsize == max_bytes, "cachetools changed how it keeps maxsize"
            while len(data) > max_entries or data.currsize > max_bytes:
                data.popitem()  # ours: counted as an eviction and reported
            return
        old = self._data
        # cachetools' own popitem yields least recently used first (and drops
        # what has expired, reported by _TTLLRU.expire); ours would count
        # each as an eviction.
        pop = cachetools.TTLCache.popitem if isinstance(old, _TTLLRU) else cachetools.LRUCache.popitem
        kept: list[tuple[str, Entry]] = []
        while True:
            try:
                kept.append(pop(old))
            except KeyError:
                break
        self._ttl = ttl
        self._data = self._new_data(max_entries, max_bytes, ttl)
        for key, entry in kept:
            try:
                self._data[key] = entry
            except ValueError:  # larger than the new max_bytes on its own
                self.counters.evictions += 1
                self._removed(key)

    # -- reads ------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` (marking it recently used), or ``None``."""
        return self._data.get(key)

    def peek(self, key: str) -> Entry | None:
        """The entry for ``key`` without marking it recently used."""
        try:
            # cachetools has no peek: the base class lookup skips LRU bookkeeping.
            return cachetools.Cache.__getitem__(self._data, key)
        except KeyError:
            return None

    def keys(self) -> list[str]:
        """A snapshot of the cached keys."""
        return list(self._data.keys())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    @property
    def bytes(self) -> int:
        """Bytes currently charged against ``max_bytes``."""
        return int(self._data.currsize)

    @property
    def fills_in_flight(self) -> int:
        """Tickets taken and not yet ended."""
        return sum(len(v) for v in self._fills.values())

    # -- fills --------------------------------------------------------------
    def begin_fill(self, key: str) -> FillTicket:
        """Take a ticket for ``key``; call before arming the watch or reading the origin."""
        ticket = FillTicket(key)
        self._fills.setdefault(key, []).append(ticket)
        return ticket

    def end_fill(self, ticket: FillTicket) -> None:
        """Forget ``ticket`` (always call, in ``finally``)."""
        tickets = self._fills.get(ticket.key)
        if tickets is None:
            return
        try:
            tickets.remove(ticket)
        except ValueError:
            return
        if not tickets:
            del self._fills[ticket.key]
            if ticket.key not in self._data:
                self._vacated(ticket.key)

    def install(self, ticket: FillTicket, entry: Entry) -> bool:
        """Cache ``entry`` for the ticket's key unless the ticket was voided."""
        if not ticket.valid:
            self.counters.refused_fills += 1
            return False
        try:
            self._data[ticket.key] = entry
        except ValueError:  # larger than max_bytes on its own
            return False
        return True

    # -- invalidation -------------------------------------------------------
    def invalidate(self, key: str) -> bool:
        """Drop ``key`` and void its fills in flight. True if an entry was dropped."""
        for ticket in self._fills.get(key, ()):
            ticket.valid = False
        dropped = self._data.pop(key, None) is not None
        self.counters.invalidated_entries += dropped
        if dropped:
            self._removed(key)
        return dropped

    def invalidate_prefixes(self, prefixes: Sequence[str]) -> int:
        """Drop every key starting with any of ``prefixes``, void their fills.

        One pass over the cache, however many prefixes: O(entries).
        """
        starts = tuple(prefixes)
        for key, tickets in self._fills.items():
            if key.startswith(starts):
                for ticket in tickets:
                    ticket.valid = False
        doomed = [k for k in list(self._data.keys()) if k.startswith(starts)]
        for key in doomed:
            self._data.pop(key, None)
        for key in doomed:  # after every drop: reporting must not stand between a key and its drop
            self._removed(key)
        self.counters.invalidated_entries += len(doomed)
        return len(doomed)

    def invalidate_all(self) -> int:
        """Drop every entry and void every fill in flight."""
        self.void_fills()
        doomed = list(self._data.keys())
        self._data.clear()
        for key in doomed:
            self._removed(key)
        self.counters.invalidated_entries += len(doomed)
        return len(doomed)

    def void_fills(self) -> None:
        """Void every fill in flight but keep the entries (a watch may have been lost)."""
        for tickets in self._fills.values():
            for ticket in tickets:
                ticket.valid = False

    def _removed(self, key: str) -> None:
        # An entry left (dropped, evicted, expired); a fill in flight still
        # needs the key's watch, and its end reports the key instead.
        if key not in self._fills:
            self._vacated(key)

    def _vacated(self, key: str) -> None:
        try:
            self.on_vacated(key)
        except Exception:  # a watch left behind costs memory in ZooKeeper; a broken cache costs coherence
            log.exception("reporting %r as vacated failed", key)


def _ignore(key: str) -> None:
    pass
