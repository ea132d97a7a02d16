"""The one bridge from kazoo's threads to the asyncio event loop.

kazoo completes requests on its completion thread and runs watch callbacks and
state listeners on other threads of its own.  Nothing from those threads may
touch sidecar state directly: they go through :func:`post`, which schedules the
call on the loop with ``call_soon_threadsafe``.  :func:`wait` turns a kazoo
``IAsyncResult`` into an awaitable without blocking the loop.

Ordering: kazoo delivers completions and watch events on two different
threads, so the loop may see a watch event before or after the completion of a
request that was answered just before it.  Code above this bridge must not
rely on that order (see ``cache.FillTicket``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["KazooAsyncResult", "cancel_and_wait", "post", "wait"]

T = TypeVar("T")


class KazooAsyncResult(Protocol):
    """The part of kazoo's ``IAsyncResult`` the bridge uses."""

    def rawlink(self, callback: Callable[[Any], None]) -> None: ...

    def get(self, block: bool = ..., timeout: float | None = ...) -> Any: ...


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop`` soon; safe from any thread.

    A loop that is already closed (the daemon is shutting down) drops the call:
    there is no one left to act on it.
    """
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(fut: asyncio.Future[Any], ok: bool, payload: Any) -> None:
    # Runs on the loop. The awaiting task may have been cancelled meanwhile.
    if fut.done():
        return
    if ok:
        fut.set_result(payload)
    else:
        fut.set_exception(payload)


def wait(result: KazooAsyncResult, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
    """Return a future on ``loop`` settled with the kazoo result's value or exception."""
    loop = loop or asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def on_complete(res: KazooAsyncResult) -> None:
        # Runs on a kazoo thread: the result is already set, so get() does not block.
        try:
            value = res.get(block=False)
        except BaseException as exc:
            post(loop, _settle, fut, False, exc)
        else:
            post(loop, _settle, fut, True, value)

    result.rawlink(on_complete)
    return fut


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and return once it has ended, cancelling again as long as it runs.

    One ``cancel()`` is not enough on Python 3.11: ``asyncio.wait_for`` loses
    a cancellation that arrives as the awaited call completes (CPython
    gh-86296), and a background loop then carries on (a housekeeping round,
    then its pause) while the stop waits for it.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
