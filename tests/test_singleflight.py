"""Duplicate suppression for concurrent misses."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.singleflight import Group


async def test_concurrent_callers_share_one_call() -> None:
    group: Group[int] = Group()
    calls = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 7

    tasks = [asyncio.create_task(group.do("k", load)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [7] * 10
    assert calls == 1 and len(group) == 0


async def test_forget_makes_later_callers_start_a_new_call() -> None:
    group: Group[int] = Group()
    gate = asyncio.Event()
    results = iter([1, 2])

    async def load() -> int:
        value = next(results)
        await gate.wait()
        return value

    first = asyncio.create_task(group.do("k", load))
    await asyncio.sleep(0)
    group.forget("k")  # an invalidation arrived
    second = asyncio.create_task(group.do("k", load))
    await asyncio.sleep(0)
    gate.set()
    assert (await first, await second) == (1, 2)


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    group: Group[int] = Group()

    async def boom() -> int:
        await asyncio.sleep(0)
        raise ValueError("origin down")

    results = await asyncio.gather(group.do("k", boom), group.do("k", boom), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)

    async def ok() -> int:
        return 1

    assert await group.do("k", ok) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_flight() -> None:
    group: Group[int] = Group()
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 5

    leaver = asyncio.create_task(group.do("k", load))
    stayer = asyncio.create_task(group.do("k", load))
    await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    gate.set()
    assert await stayer == 5
