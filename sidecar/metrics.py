"""Prometheus metrics, read from the service's own counters at scrape time.

The request path only increments plain integers (``service.Stats``,
``cache.CacheCounters``); this collector turns them into Prometheus families
when ``/metrics`` is scraped, so metrics cost nothing on a hit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import CacheService

__all__ = ["CONTENT_TYPE", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "hits": "Reads served from the local cache",
    "misses": "Reads filled from the origin through the watch protocol",
    "bypassed_reads": "Reads sent to the origin uncached while ZooKeeper was unavailable",
    "strong_reads": "Reads with consistency=strong (a ZooKeeper sync each)",
    "fills": "Cache-aside values installed with PUT ?fill=true under a valid lease",
    "writes": "Write-through PUTs acknowledged",
    "deletes": "Delete-through DELETEs acknowledged",
    "invalidations_received": "Invalidation events applied from ZooKeeper",
    "invalidations_published": "Invalidation requests published by this sidecar",
    "flushes": "Whole-cache flushes (invalidate-all, a gap in the prefix log, ZooKeeper's history going back)",
}


class _ServiceCollector(Collector):
    def __init__(self, service: CacheService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        svc = self._service
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"zkcache_{name}", doc, value=getattr(svc.stats, name))
        counters = svc.cache_counters
        yield CounterMetricFamily("zkcache_evictions", "Entries evicted by the LRU bounds", value=counters.evictions)
        yield CounterMetricFamily(
            "zkcache_refused_fills",
            "Fills not installed because an invalidation overtook them",
            value=counters.refused_fills,
        )
        events = svc.key_events
        yield CounterMetricFamily("zkcache_key_events", "Key watch events applied", value=events.count)
        yield CounterMetricFamily(
            "zkcache_key_event_delivery_seconds",
            "Time from a key event's arrival on kazoo's thread to its entry dropped on the loop (sum)",
            value=events.hop_seconds_total,
        )
        yield GaugeMetricFamily("zkcache_entries", "Entries cached", value=svc.entries)
        yield GaugeMetricFamily(
            "zkcache_key_watches",
            "Key watches this sidecar may hold in ZooKeeper (entries + fills in flight at most)",
            value=svc.key_watches,
        )
        yield CounterMetricFamily(
            "zkcache_watch_removals",
            "removeWatches requests sent for keys no longer cached",
            value=svc.watch_removals,
        )
        yield GaugeMetricFamily("zkcache_bytes", "Bytes charged against max_bytes", value=svc.bytes_cached)
        yield GaugeMetricFamily("zkcache_max_bytes", "Configured byte bound", value=svc.config.max_bytes)
        yield GaugeMetricFamily("zkcache_ready", "1 when the ZooKeeper session is usable", value=int(svc.ready))
        live = svc.live_config
        yield GaugeMetricFamily(
            "zkcache_config_valid",
            "0 while the namespace's config znode holds settings this sidecar refused (it keeps the previous ones)",
            value=int(live.error is None),
        )
        yield GaugeMetricFamily(
            "zkcache_config_version", "mzxid of the config znode version last read (0: none)", value=live.version
        )
        state = GaugeMetricFamily("zkcache_zookeeper_state", "ZooKeeper session state", labels=["state"])
        for candidate in ("connecting", "connected", "suspended", "lost"):
            state.add_metric([candidate], int(svc.zookeeper_state == candidate))
        yield state
        election, keeper = svc.coord.election, svc.coord.housekeeper
        yield GaugeMetricFamily(
            "zkcache_leader", "1 on the sidecar elected as its namespace's housekeeper", value=int(election.leading)
        )
        totals = keeper.totals
        for name, value, doc in (
            ("retired", totals.retired, "Version znodes deleted after version_retention by this sidecar as leader"),
            ("repaired", totals.repaired, "Dead writers' intents closed by this sidecar as leader"),
            ("skipped", totals.skipped, "Housekeeping writes left out: the znode was written or gone since the scan"),
            ("prefix_entries_trimmed", totals.prefix_entries_trimmed, "Prefix-log entries trimmed as leader"),
            ("rounds", keeper.rounds, "Housekeeping rounds completed as leader"),
            ("round_failures", keeper.failures, "Housekeeping rounds that failed (ZooKeeper errors), as leader"),
        ):
            yield CounterMetricFamily(f"zkcache_housekeeping_{name}", doc, value=value)
        yield from svc.coord.zk.latency.collect()
        # Exported at 0 with the probe off too: increase() needs a series from
        # the start to see the first disagreement.
        probe = svc.reads.probe
        checks = CounterMetricFamily(
            "zkcache_consistency_probes",
            "Sampled hits re-checked against ZooKeeper and the origin, by verdict (all 0 with the probe off)",
            labels=["result"],
        )
        for result in ("agreed", "disagreed", "inconclusive", "failed", "dropped"):
            checks.add_metric([result], getattr(probe.counts, result) if probe is not None else 0)
        yield checks
        if probe is not None:
            yield from probe.staleness.collect()


def make_registry(service: CacheService) -> CollectorRegistry:
    """A registry with the service's metrics (no process metrics: keep scrapes cheap)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServiceCollector(service))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``."""
    return generate_latest(registry)
