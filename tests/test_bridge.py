"""The kazoo -> asyncio bridge, with kazoo's real AsyncResult and handler threads."""

from __future__ import annotations

import asyncio
import threading

import pytest
from kazoo.handlers.threading import AsyncResult, SequentialThreadingHandler

from sidecar import bridge


@pytest.fixture
def handler() -> SequentialThreadingHandler:
    h = SequentialThreadingHandler()
    h.start()
    yield h
    h.stop()


async def test_value_set_on_another_thread_resolves_on_the_loop(handler: SequentialThreadingHandler) -> None:
    result = AsyncResult(handler)
    fut = bridge.wait(result)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(threading.get_ident()))
    threading.Thread(target=result.set, args=(42,)).start()
    assert await asyncio.wait_for(fut, 5) == 42
    assert seen == [loop_thread]


async def test_exception_is_raised_in_the_awaiting_task(handler: SequentialThreadingHandler) -> None:
    result = AsyncResult(handler)
    fut = bridge.wait(result)
    threading.Thread(target=result.set_exception, args=(KeyError("gone"),)).start()
    with pytest.raises(KeyError):
        await asyncio.wait_for(fut, 5)


async def test_cancelled_waiter_ignores_the_late_result(handler: SequentialThreadingHandler) -> None:
    result = AsyncResult(handler)
    fut = bridge.wait(result)
    fut.cancel()
    result.set(1)  # must not raise InvalidStateError on the loop
    await asyncio.sleep(0.05)
    assert fut.cancelled()


def test_post_to_a_closed_loop_is_dropped() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    bridge.post(loop, lambda: None)  # no exception: shutdown races are normal


async def test_cancel_and_wait_ends_a_loop_whose_first_cancellation_was_swallowed() -> None:
    """What asyncio.wait_for does on Python 3.11 when the call completes as the cancellation arrives."""
    rounds = 0

    async def stubborn() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if rounds < 3:
                    continue  # swallowed, as the race does
                raise

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(bridge.cancel_and_wait(task), 2)
    assert task.cancelled()
