"""Bytes in flight: what request bodies and batch responses hold in memory at once.

The cache's ``max_bytes`` bounds what it keeps; this bounds the rest that
scales with load, so that the process stays within the chart's memory limit
(1.25 x ``max_bytes`` + 64 MiB) however many clients upload at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import ServiceBusy

__all__ = ["ByteBudget"]


class ByteBudget:
    """Bytes that requests may hold at once, granted first come, first served.

    A request that waits longer than its timeout gets 503 (``ServiceBusy``)
    rather than growing the process past what the chart's memory limit holds.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, size: int, timeout: float) -> AsyncIterator[None]:
        """Hold ``size`` bytes (at most the whole budget) for the body of the ``async with``."""
        size = await self.acquire(size, timeout)
        try:
            yield
        finally:
            self.release(size)

    async def acquire(self, size: int, timeout: float) -> int:
        """Take ``size`` bytes (at most the whole budget), waiting at most ``timeout``; the bytes taken.

        Raises :class:`ServiceBusy` when they are not granted in time.  The
        caller must :meth:`release` what this returns.
        """
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Granted just as we gave up: hand the bytes on.
                self.release(size)
            else:
                fut.cancel()
                self._grant()  # drops the cancelled waiter; those behind it may fit
            if isinstance(exc, TimeoutError):
                raise ServiceBusy(
                    f"{self.used} bytes of request bodies and batch responses are in flight "
                    f"(max_inflight_bytes {self.limit}); retry"
                ) from None
            raise
        return size

    def try_acquire(self, size: int) -> bool:
        """Take ``size`` bytes now if they are free and nobody waits; never waits."""
        size = min(size, self.limit)
        if self._waiters or self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        """Give back bytes :meth:`acquire` returned."""
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        # FIFO: a large request at the head is not overtaken forever by small ones.
        while self._waiters:
            size, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.limit:
                return
            self._waiters.popleft()
            self.used += size
            fut.set_result(None)
