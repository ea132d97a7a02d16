"""The consistency probe: how often hits really agree with the origin (after Meta's Polaris).

At ``consistency_probe_rate`` (a fraction of hits; 0, the default, is off)
a hit is re-checked in the background once it has been served: a strong
look at the key in ZooKeeper (``sync``, then its version), then the origin,
then the key's version again (moved meanwhile: inconclusive).
Each check is counted as one of

* ``agreed``: the version is still the one served, and the origin holds the
  bytes served;
* ``disagreed``: the hit was stale beyond the propagation window: served at
  a version superseded more than ``consistency_probe_window`` before, or at
  the current version with bytes the origin does not have (someone wrote the
  origin without a version bump, or a fill installed a value the origin
  never had);
* ``inconclusive``: the key changed within the window before the hit, or a
  write of it is in progress: propagation, not incoherence.

``disagreed / (agreed + disagreed)`` across the fleet is the fraction of
stale hits: ``-log10`` of it is the number of nines (README, "Consistency
probe").  How stale a disagreement was (the hit's time minus the newer
version's ``mtime``, ZooKeeper's clock against this host's: skew counts) goes
into a histogram.

Checks run at most ``max_in_flight`` at a time; a sample beyond that is
dropped (and counted), so a hot sidecar never queues work it cannot do.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from dataclasses import dataclass

from prometheus_client import Histogram

from .cache import Entry
from .coordination import Coordinator, KeyState
from .origins import Origin, OriginValue

__all__ = ["ConsistencyProbe", "ProbeCounts", "Verdict", "judge"]

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    """What one check found."""

    AGREED = "agreed"
    DISAGREED = "disagreed"
    INCONCLUSIVE = "inconclusive"


@dataclass(slots=True)
class ProbeCounts:
    """Checks by outcome, and samples that were not checked."""

    agreed: int = 0
    disagreed: int = 0
    inconclusive: int = 0
    failed: int = 0  # ZooKeeper or the origin failed the check
    dropped: int = 0  # sampled while max_in_flight checks ran


def judge(
    entry: Entry, served_at: float, state: KeyState, stored: OriginValue | None, window: float
) -> tuple[Verdict, float]:
    """The verdict on a hit of ``entry`` served at ``served_at`` (unix time), and how stale it was (seconds).

    ``state`` is the key read strongly after the hit, ``stored`` the origin's
    value read after that.
    """
    if state.writing:
        return Verdict.INCONCLUSIVE, 0.0  # the origin may be changing under the intent
    if entry.version != state.version:
        if not state.version or not state.modified_ms:
            # Retired since (no version znode): the bytes are the only witness.
            same = stored is not None and stored.value == entry.value
            return (Verdict.AGREED if same else Verdict.INCONCLUSIVE), 0.0
        stale = served_at - state.modified_ms / 1000
        if stale > window:
            return Verdict.DISAGREED, stale
        return Verdict.INCONCLUSIVE, 0.0  # changed just before the hit (or after it)
    if entry.filled:
        return Verdict.INCONCLUSIVE, 0.0  # the application's value, not necessarily the origin's
    if stored is None or stored.value != entry.value:
        return Verdict.DISAGREED, 0.0  # the origin changed without a version bump
    return Verdict.AGREED, 0.0


class ConsistencyProbe:
    """Samples hits and checks them in the background (the loop only)."""

    def __init__(
        self, rate: float, window: float, coord: Coordinator, origin: Origin, *, max_in_flight: int = 4
    ) -> None:
        self.rate = rate
        self.window = window
        self._coord = coord
        self._origin = origin
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts = ProbeCounts()
        self.staleness = Histogram(
            "zkcache_consistency_stale_seconds",
            "How stale hits the probe found stale were: hit time minus the newer version's mtime",
            registry=None,
            buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
        )

    def wanted(self) -> bool:
        """Sample this hit?"""
        return random.random() < self.rate

    def sample(self, key: str, entry: Entry) -> None:
        """Check this hit of ``entry`` in the background (dropped if too many checks run)."""
        if len(self._tasks) >= self._max or not self._coord.usable:
            self.counts.dropped += 1
            return
        task = asyncio.ensure_future(self._check(key, entry, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the checks under way."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check(self, key: str, entry: Entry, served_at: float) -> None:
        try:
            state = await self._coord.key_state(key, strong=True)
            stored = await self._origin.get(key)
            # A write that landed between the two reads makes a correct hit
            # look stale: the key must not have moved while the origin was read.
            after = await self._coord.key_state(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counts.failed += 1
            log.debug("consistency probe of %r failed: %s", key, exc)
            return
        if (after.version, after.writing) != (state.version, state.writing):
            self.counts.inconclusive += 1
            return
        verdict, stale = judge(entry, served_at, state, stored, self.window)
        if verdict is Verdict.AGREED:
            self.counts.agreed += 1
        elif verdict is Verdict.INCONCLUSIVE:
            self.counts.inconclusive += 1
        else:
            self.counts.disagreed += 1
            self.staleness.observe(stale)
            log.warning(
                "consistency probe: a hit of %r was stale (served version %d, current %d, %.3fs beyond its change)",
                key,
                entry.version,
                state.version,
                stale,
            )
