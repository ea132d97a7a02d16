"""Duplicate call suppression: concurrent misses of one key share one fill.

Like groupcache's ``singleflight``: the first caller for a key runs the
function; callers arriving while it runs await the same result.  Unlike it,
:meth:`Group.forget` detaches a flight so that callers arriving *after* an
invalidation start a fresh fill instead of joining one that read the origin
before the write.  Only the event loop thread may use a ``Group``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Group"]

T = TypeVar("T")


class Group(Generic[T]):
    """A set of in-flight calls keyed by string. Not thread-safe: loop only."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Return ``await fn()``, sharing one call among concurrent callers of ``key``."""
        fut = self._flights.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fn())
            self._flights[key] = fut
            fut.add_done_callback(functools.partial(self._done, key))
        # shield: one caller going away (client disconnect) must not cancel
        # the fill that the other callers are waiting for.
        return await asyncio.shield(fut)

    def forget(self, key: str) -> None:
        """Let the next caller of ``key`` start a new flight; current waiters keep theirs."""
        self._flights.pop(key, None)

    def forget_all(self) -> None:
        """:meth:`forget` every key."""
        self._flights.clear()

    def _done(self, key: str, fut: asyncio.Future[T]) -> None:
        if self._flights.get(key) is fut:
            del self._flights[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: every waiter may have gone away
