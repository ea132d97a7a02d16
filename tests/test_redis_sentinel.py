"""A Sentinel failover under write load: no acknowledged write lost, nothing served stale after.

Real processes only: a primary, one replica and three Sentinels
(``harness/redis.py``), two sidecars on ``redis+sentinel://``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from harness import SidecarProcess
from harness.redis import LocalRedis, LocalSentinelGroup
from tests.conftest import SidecarFactory, eventually

pytestmark = pytest.mark.slow

KEYS = [f"k{i}" for i in range(4)]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalSentinelGroup]:
    g = LocalSentinelGroup(tmp_path / "redis")
    g.start()
    yield g
    g.stop()


def _stored(server: LocalRedis) -> dict[str, int]:
    with server.client() as plain:
        return {k: int(plain.hget(k, "value") or 0) for k in KEYS}


async def _serve(http: aiohttp.ClientSession, sidecars: list[SidecarProcess], expected: dict[str, int]) -> None:
    async def all_serve() -> bool:
        for sc in sidecars:
            for key in KEYS:
                async with http.get(f"{sc.url}/v1/keys/{key}") as resp:
                    if resp.status != 200 or int(await resp.read()) != expected[key]:
                        return False
        return True

    await eventually(all_serve, timeout=2, what=f"every sidecar serving what the primary holds: {expected}")


async def test_a_failover_during_writes_loses_no_acknowledged_write_and_serves_nothing_stale(
    group: LocalSentinelGroup, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a = sidecars("a", origin=group.url, origin_timeout="1s")
    b = sidecars("b", origin=group.url, origin_timeout="1s")
    acked: dict[str, int] = {}
    failed = acknowledged = 0
    stop = asyncio.Event()
    old_primary = group.primary

    async def writer(key: str) -> None:
        nonlocal failed, acknowledged
        deadline = time.monotonic() + 40
        for seq in range(1, 10000):  # bounded in count and in time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                async with http.put(f"{a.url}/v1/keys/{key}", data=f"{seq}".encode()) as resp:
                    ok = resp.status in (200, 201, 204)
            except aiohttp.ClientError:
                ok = False
            if ok:
                acked[key] = seq
                acknowledged += 1
            else:
                failed += 1
                await asyncio.sleep(0.05)

    async def reader() -> None:  # keeps sidecar b holding the keys
        while not stop.is_set():
            for key in KEYS:
                async with http.get(f"{b.url}/v1/keys/{key}") as resp:
                    await resp.read()
            await asyncio.sleep(0.01)

    load = asyncio.gather(reader(), *(writer(k) for k in KEYS))
    try:
        await eventually(lambda: acknowledged >= 40, timeout=15, what="writes acknowledged before the fault")
        # The replication link goes silent while writes go on; then the primary
        # dies.  A write the primary took meanwhile exists nowhere else:
        # acknowledging one would lose it.
        group.link.blackhole()
        await asyncio.sleep(0.6)
        await asyncio.to_thread(old_primary.kill)
        await eventually(
            lambda: asyncio.to_thread(lambda: group.current_primary() is not old_primary),
            timeout=20,
            interval=0.1,
            what="Sentinel promoting the replica",
        )
        # The new primary has no replica yet and refuses writes
        # (min-replicas-to-write): what it holds now is final until the old one returns.
        new_primary = group.current_primary()
        before_return = dict(acked)
        stored = await asyncio.to_thread(_stored, new_primary)
        lost = {k: (before_return[k], stored[k]) for k in KEYS if stored[k] < before_return.get(k, 0)}
        # pytest -s shows what happened (the closing notes quote it).
        print(
            f"\nfailover: primary :{old_primary.port} killed, :{new_primary.port} promoted; last acknowledged "
            f"{before_return}, held by the new primary {stored}; {failed} writes refused so far"
        )
        assert not lost, f"acknowledged writes lost in the failover (acknowledged, now held): {lost}"
        await _serve(http, [a, b], stored)

        # The old primary returns as the new one's replica; writes resume.
        await asyncio.to_thread(old_primary.start)
        resumed_from = acknowledged
        await eventually(
            lambda: acknowledged >= resumed_from + 40, timeout=20, what="writes acknowledged after the failover"
        )
    finally:
        stop.set()
        await asyncio.wait_for(load, 15)
    assert failed > 0, "no write failed: the fault missed the writes"
    final = await asyncio.to_thread(_stored, group.current_primary())
    assert all(final[k] >= acked[k] for k in KEYS), (final, acked)
    await _serve(http, [a, b], final)
    print(f"after: {acknowledged} writes acknowledged in all, {failed} refused; both sidecars serve {final}")
