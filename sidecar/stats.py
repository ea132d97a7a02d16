"""The service's counters, shared by the read, write and event paths; exported by /v1/stats and /metrics."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """Monotonic counters of one sidecar (the loop only: no locks)."""

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
