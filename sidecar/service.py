"""The sidecar's one service: a thin facade over the protocols, for the HTTP layer.

The HTTP layer and the metrics call only this class's public methods and
properties.  Each protocol lives in its own module, with its invariants:

* ``reads``: hit policy, read-through fills, strong reads, leases and fills;
* ``writes``: write-through PUT and DELETE, with their lock janitor;
* ``events``: what ZooKeeper's events do to the cache, and revalidation;
* ``coordination``: everything that talks to ZooKeeper (only it uses kazoo).

Every method runs on the event loop; ZooKeeper events reach ``events``
through the coordinator, also on the loop, so the cache needs no locks.
Serving policy by session state is ``ReadProtocol.cached``; the README's
"Connection states" section documents it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import __version__
from .budget import ByteBudget
from .cache import CacheCounters, CoherentCache
from .config import LIVE_SETTINGS, Config, container_memory_limit, memory_needed, parse_live, with_live
from .coordination import Coordinator, EventDelivery, InvalidationReceipt, validate_key
from .errors import ConfigError, NotAcknowledged, PayloadTooLarge
from .events import CacheEvents
from .origins import NoOrigin, Origin, OriginValue
from .origins.monitor import MonitoredOrigin
from .reads import Fetched, ReadProtocol
from .singleflight import Group
from .stats import Stats
from .writes import WriteProtocol, Written

__all__ = ["CacheService", "Fetched", "Stats", "Written"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class LiveConfigStatus:
    """The config znode as this sidecar last read it."""

    version: int = 0  # the znode's mzxid; 0 while it does not exist
    error: str | None = None  # why that version was refused (the settings before it stay)
    settings: list[str] = dataclasses.field(default_factory=list)  # the live settings it holds

    def as_json(self) -> dict[str, Any]:
        """For ``/readyz`` and ``/v1/stats``."""
        body: dict[str, Any] = {"status": "invalid" if self.error else "ok", "version": self.version}
        if self.error:
            body["error"] = self.error
        else:
            body["settings"] = self.settings
        return body


class CacheService:
    """Coherent read-through / write-through cache for one sidecar."""

    def __init__(self, config: Config, origin: Origin, *, coord: Coordinator | None = None) -> None:
        """``coord``: a coordinator to use (built from ``config`` if not given); its events are set here."""
        self.config = config
        # The settings as started (flags, environment, file): the config
        # znode's live settings apply over these, and removing one brings
        # its value here back.
        self.base_config = config
        self.live_config = LiveConfigStatus()
        # Every call to a real origin is watched, so /readyz can say when it is down.
        self.origin: Origin = origin if isinstance(origin, NoOrigin) else MonitoredOrigin(origin)
        self.stats = Stats()
        # What request bodies and batch responses hold besides the cache (max_bytes).
        self.inflight = ByteBudget(config.max_inflight_bytes)
        self.cache = CoherentCache(config.max_entries, config.max_bytes, config.ttl)
        flights: Group[Fetched] = Group()
        self.events = CacheEvents(self.cache, flights, self.stats)
        self._writes: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        # A plain GET (no query) is served by the HTTP layer's short path.
        self.hit_path_plain = config.consistency == "eventual" and not isinstance(origin, NoOrigin)
        # With no origin every read is cache-aside (GET ?fill=true implied).
        self.cache_aside = isinstance(origin, NoOrigin)
        self.coord = coord or Coordinator.from_config(config, origin.name, __version__)
        self.coord.attach(self.events)
        self.coord.live_config.listener = self.apply_live_config
        # A key left with no entry and no fill gives up its ZooKeeper watch.
        self.cache.on_vacated = self.coord.release_watch
        self.reads = ReadProtocol(config, self.origin, self.cache, self.coord, self.stats, flights)
        self.writes = WriteProtocol(config, self.origin, self.coord, drop=self.events.drop_key, written=self._written)
        # The read protocol's public surface, as the HTTP layer calls it.
        self.cached = self.reads.cached
        self.read_strong = self.reads.read_strong
        self.lease = self.reads.lease
        self.fill = self.reads.fill
        self.fetch = self.reads.fetch

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start connecting to ZooKeeper (readiness follows asynchronously)."""
        self.coord.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Finish writes in progress, leave the fleet, close the origin: within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.config.lock_timeout + 5.0)
        self.refuse_writes()
        if self.reads.probe is not None:
            await self.reads.probe.stop()
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
        log.debug("writes and origin closed; leaving ZooKeeper")
        await self.coord.stop(timeout=max(0.1, deadline - loop.time()))

    def refuse_writes(self) -> None:
        """The sidecar is stopping: writes that have not reached the origin answer 503 ``write-abandoned``.

        Called before the HTTP server drains, so that writes waiting for a
        connection answer instead of holding the drain up.
        """
        self.writes.refuse()

    @property
    def ready(self) -> bool:
        """Connected, every namespace watch armed, and ZooKeeper answered within the lease."""
        return self.coord.usable

    def apply_live_config(self, data: bytes | None, version: int) -> None:
        """Apply what the namespace's config znode holds (version = its mzxid, 0 if absent).

        Checked as a whole with the daemon's own parsers over the settings as
        started; an invalid version changes nothing, and says why in the log,
        ``/readyz`` and ``/metrics``.  The cache is kept: smaller bounds evict
        the least recently used entries.
        """
        try:
            live = parse_live(data)
            new = with_live(self.base_config, live)
            limit = container_memory_limit()
            if "max_bytes" in live and limit is not None and memory_needed(new.max_bytes) > limit:
                raise ConfigError(
                    f"setting 'max_bytes': {new.max_bytes} needs a memory limit of at least "
                    f"{memory_needed(new.max_bytes) // 1024**2} MiB (1.25 x max_bytes + 64 MiB); "
                    f"this container's is {limit // 1024**2} MiB"
                )
        except ConfigError as exc:
            self.live_config = dataclasses.replace(self.live_config, version=version, error=exc.detail)
            log.error("config znode (version %d) is invalid; keeping the current settings: %s", version, exc.detail)
            return
        changed = {
            name: (getattr(self.config, name), getattr(new, name))
            for name in LIVE_SETTINGS
            if getattr(self.config, name) != getattr(new, name)
        }
        self.config = new
        self.live_config = LiveConfigStatus(version=version, error=None, settings=sorted(live))
        self.reads.reconfigure(new)
        self.hit_path_plain = new.consistency == "eventual" and not isinstance(self.origin, NoOrigin)
        if {"max_entries", "max_bytes", "ttl"} & changed.keys():
            self.cache.reconfigure(new.max_entries, new.max_bytes, new.ttl)
        if "log_level" in changed:
            logging.getLogger().setLevel(new.log_level.upper())
        if changed:
            log.info(
                "live config version %d applied: %s",
                version,
                ", ".join(f"{name} {old!r} -> {value!r}" for name, (old, value) in changed.items()),
            )

    async def origin_status(self) -> dict[str, Any]:
        """``{"status": "ok"}`` or ``"down"`` with reasons (the last error, the origin's own health check)."""
        if isinstance(self.origin, MonitoredOrigin):
            return await self.origin.status()
        return {"status": "ok"}

    def describe_state(self) -> str:
        """One line for operators: why the sidecar is or is not ready."""
        return self.coord.describe_state()

    @property
    def zookeeper_state(self) -> str:
        """The session state's name: connecting, connected, suspended or lost."""
        return self.coord.state.value

    @property
    def key_events(self) -> EventDelivery:
        """How key watch events travelled, kazoo's thread to the cache (metrics)."""
        return self.coord.key_events

    @property
    def cache_counters(self) -> CacheCounters:
        """Evictions, invalidated entries and refused fills (metrics)."""
        return self.cache.counters

    @property
    def key_watches(self) -> int:
        """Key watches this sidecar may hold in ZooKeeper: at most entries + fills in flight (metrics)."""
        return len(self.coord.key_watches)

    @property
    def watch_removals(self) -> int:
        """removeWatches requests sent for keys the cache no longer holds (metrics)."""
        return self.coord.key_watches.removals

    @property
    def entries(self) -> int:
        """Entries cached now."""
        return len(self.cache)

    @property
    def bytes_cached(self) -> int:
        """Bytes charged against ``max_bytes`` now."""
        return self.cache.bytes

    # -- writes -------------------------------------------------------------
    async def put(
        self,
        key: str,
        value: OriginValue,
        *,
        if_match: int | None = None,
        if_none_match: bool = False,
        wanted: Callable[[], bool] = lambda: True,
    ) -> Written:
        """Write-through; returns the new version (``writes.WriteProtocol``).

        ``wanted``: whether the client still waits (asked until the write is locked).
        """
        if len(value.value) > self.config.max_value_bytes:
            raise PayloadTooLarge(f"value is {len(value.value)} bytes; the limit is {self.config.max_value_bytes}")
        return await self._shielded(
            self.writes.write(key, value, if_match=if_match, if_none_match=if_none_match, wanted=wanted)
        )

    async def delete(
        self, key: str, *, if_match: int | None = None, wanted: Callable[[], bool] = lambda: True
    ) -> Written:
        """Delete-through; the version bump is the tombstone. Returns it."""
        return await self._shielded(self.writes.write(key, None, if_match=if_match, wanted=wanted))

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
            self._spawn(self.reads.refill(key))

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
        if wait is not None:
            # Confirming needs this sidecar's own membership and watches: refuse before publishing.
            self.coord.require_usable("acknowledged invalidations need this sidecar ready")
        else:
            await self.coord.wait_writable(self.config.lock_timeout, "invalidations need ZooKeeper")
        receipt = await self.coord.publish(keys, prefixes, everything)
        self.stats.invalidations_published += 1
        if everything:
            self.events.drop_all()
        for key in keys:
            self.events.drop_key(key)
        self.events.drop_prefixes(prefixes)
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

    # -- introspection ------------------------------------------------------
    def housekeeping_snapshot(self) -> dict[str, Any]:
        """Whether this sidecar leads its namespace, and what its housekeeping did."""
        election, keeper = self.coord.election, self.coord.housekeeper
        return {
            "leader": election.leading,
            "candidate": election.node,
            "terms": election.terms,
            "rounds": keeper.rounds,
            "round_failures": keeper.failures,
            "totals": dataclasses.asdict(keeper.totals),
            "last_round": None if keeper.last is None else dataclasses.asdict(keeper.last),
            "absent_version": self.coord.namespace.retired,
        }

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
                "key_watches": self.key_watches,
                "watch_removals": self.watch_removals,
            },
            "entries": len(c),
            "bytes": c.bytes,
            "max_entries": self.config.max_entries,
            "max_bytes": self.config.max_bytes,
            "config": dict(
                self.live_config.as_json(), effective={name: getattr(self.config, name) for name in LIVE_SETTINGS}
            ),
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
            "housekeeping": self.housekeeping_snapshot(),
            "consistency_probe": None
            if self.reads.probe is None
            else dict(dataclasses.asdict(self.reads.probe.counts), rate=self.reads.probe.rate),
            "origin": self.origin.name,
            "version": __version__,
        }
