"""The consistency probe: its verdicts, and what a real sidecar counts."""

from __future__ import annotations

import sqlite3

import aiohttp
import pytest

from sidecar.cache import Entry
from sidecar.coordination import KeyState
from sidecar.origins import OriginValue
from sidecar.origins.sqlite import sqlite_path
from sidecar.probe import Verdict, judge
from tests.conftest import SidecarFactory, eventually
from tests.test_coherence import get, get_hit, put

WINDOW = 1.0
NOW = 1_700_000_000.0


def entry(value: bytes = b"v", version: int = 10, *, filled: bool = False) -> Entry:
    return Entry.make("k", value, "text/plain", version, filled=filled)


def state(version: int = 10, *, writing: bool = False, modified: float = NOW - 60) -> KeyState:
    return KeyState(version, writing, 0, 0, int(modified * 1000) if version else 0)


@pytest.mark.parametrize(
    ("served", "now", "stored", "verdict"),
    [
        (entry(), state(), OriginValue(b"v"), Verdict.AGREED),
        # Changed long before the hit: stale beyond the window.
        (entry(), state(11, modified=NOW - 5), OriginValue(b"w"), Verdict.DISAGREED),
        # Changed just before (or after) the hit: propagation.
        (entry(), state(11, modified=NOW - 0.2), OriginValue(b"w"), Verdict.INCONCLUSIVE),
        (entry(), state(11, modified=NOW + 3), OriginValue(b"w"), Verdict.INCONCLUSIVE),
        # Same version, other bytes: the origin was written without a version bump.
        (entry(), state(), OriginValue(b"changed behind the cache"), Verdict.DISAGREED),
        (entry(), state(), None, Verdict.DISAGREED),
        # A write in progress, or the application's own fill: no verdict.
        (entry(), state(writing=True), OriginValue(b"w"), Verdict.INCONCLUSIVE),
        (entry(filled=True), state(), OriginValue(b"other"), Verdict.INCONCLUSIVE),
        # Retired since the hit (no version znode): only the bytes can tell.
        (entry(), state(0), OriginValue(b"v"), Verdict.AGREED),
        (entry(), state(0), OriginValue(b"w"), Verdict.INCONCLUSIVE),
    ],
)
def test_verdicts(served: Entry, now: KeyState, stored: OriginValue | None, verdict: Verdict) -> None:
    assert judge(served, NOW, now, stored, WINDOW)[0] is verdict


def test_staleness_is_the_time_from_the_change_to_the_hit() -> None:
    assert judge(entry(), NOW, state(11, modified=NOW - 5), OriginValue(b"w"), WINDOW) == (Verdict.DISAGREED, 5.0)


async def counts(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("zkcache_consistency_probes_total{"):
            result = line.split('result="')[1].split('"')[0]
            found[result] = float(line.rsplit(" ", 1)[1])
    return found


@pytest.mark.slow
async def test_a_sidecar_counts_agreeing_hits_and_catches_an_origin_written_behind_its_back(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    a = sidecars("a")
    b = sidecars("b", consistency_probe_rate="1")
    off = await counts(http, a.url)
    assert set(off) == {"agreed", "disagreed", "inconclusive", "failed", "dropped"} and not any(off.values())
    assert (await put(http, a.url, "k", b"v1"))[0] == 200
    await get_hit(http, b.url, "k")
    await eventually(lambda: _agreed(http, b.url), what="an agreeing probe")
    assert (await counts(http, b.url)).get("disagreed") == 0

    # An outside writer changes the origin without a version bump: b keeps
    # serving v1, and the probe says so.
    db = sqlite3.connect(sqlite_path(sqlite_url))
    db.execute("UPDATE kv SET value = ? WHERE key = ?", (b"v2", "k"))
    db.commit()
    db.close()
    assert (await get(http, b.url, "k"))[1:3] == ("hit", b"v1")

    async def disagreed() -> bool:
        return (await counts(http, b.url)).get("disagreed", 0) >= 1

    await eventually(disagreed, what="the probe finding the stale hit")
    async with http.get(b.url + "/v1/stats") as resp:
        probe = (await resp.json())["consistency_probe"]
    assert probe["rate"] == 1.0 and probe["disagreed"] >= 1 and probe["failed"] == 0


async def _agreed(http: aiohttp.ClientSession, base: str) -> bool:
    return (await counts(http, base)).get("agreed", 0) >= 1
