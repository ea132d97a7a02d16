"""The per-key write lock: kazoo's Lock recipe, driven from asyncio.

kazoo's ``Lock.acquire`` blocks a thread while it waits for its predecessor,
so it runs in a dedicated thread pool, never on the loop and never in the
default executor (where waiting writers could starve everything else).
Releases run in a second pool: if every acquiring thread waits for a lock held
by this same process, the holder must still be able to release it.

Callers put a local ``asyncio.Lock`` per key in front (see ``service``) so that
threads wait only for other sidecars, never for a request of their own process.

A cancelled acquisition may still succeed in its thread later; the lock is
then released as soon as it is taken, so no lock outlives its request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from kazoo.exceptions import KazooException
from kazoo.exceptions import LockTimeout as KazooLockTimeout

from ..errors import CoordinationError, LockTimeout
from .session import CONNECTION_ERRORS, ZkSession

__all__ = ["KeyLocks"]

log = logging.getLogger(__name__)


class KeyLocks:
    """Factory of ZooKeeper locks for keys, with their thread pools."""

    def __init__(self, zk: ZkSession, identifier: str, max_waiting: int = 32) -> None:
        self._zk = zk
        self._identifier = identifier
        self._acquirers = ThreadPoolExecutor(max_waiting, thread_name_prefix="zk-lock")
        self._releasers = ThreadPoolExecutor(4, thread_name_prefix="zk-unlock")

    def shutdown(self) -> None:
        """Stop the pools (waiting acquisitions finish or time out on their own)."""
        self._acquirers.shutdown(wait=False, cancel_futures=True)
        self._releasers.shutdown(wait=False, cancel_futures=True)

    @asynccontextmanager
    async def hold(self, path: str, timeout: float, wait_limit: float) -> AsyncIterator[None]:
        """Hold the lock at ``path`` for the block; raise :class:`LockTimeout`.

        ``timeout`` is the recipe's own wait for predecessors; ``wait_limit``
        bounds the whole acquisition, since kazoo's requests can sit queued
        while it reconnects and the recipe checks its deadline only between them.
        """
        loop = asyncio.get_running_loop()
        lock: Any = self._zk.client.Lock(path, self._identifier)
        acquiring = loop.run_in_executor(self._acquirers, functools.partial(lock.acquire, True, timeout))
        try:
            acquired = await asyncio.wait_for(asyncio.shield(acquiring), wait_limit)
        except (asyncio.CancelledError, TimeoutError) as exc:
            lock.cancel()
            acquiring.add_done_callback(functools.partial(self._release_if_acquired, lock))
            if isinstance(exc, TimeoutError):
                raise LockTimeout(f"no write lock within {wait_limit:g}s") from None
            raise
        except KazooLockTimeout:
            acquired = False
        except CONNECTION_ERRORS as exc:
            raise CoordinationError(f"lock {path}: {type(exc).__name__}") from exc
        except KazooException as exc:
            raise CoordinationError(f"lock {path}: {exc!r}") from exc
        if not acquired:
            raise LockTimeout(f"waited {timeout:g}s for the write lock")
        try:
            yield
        finally:
            await self._release(lock)

    async def _release(self, lock: Any) -> None:
        loop = asyncio.get_running_loop()
        releasing = loop.run_in_executor(self._releasers, lock.release)
        try:
            # Bounded: with ZooKeeper away, kazoo's delete waits in its queue.
            # The answer to the client must not wait for it; the release goes
            # on in its thread, and the node goes with the session anyway.
            await asyncio.wait_for(asyncio.shield(releasing), self._zk.op_timeout)
        except TimeoutError:
            log.warning("releasing lock %s is taking long; continuing in the background", lock.path)
        except Exception:
            # Do not fail the already-applied write. The node is ephemeral: it
            # goes when the session ends; until then, retry in the background.
            log.warning("releasing lock %s failed; retrying in the background", lock.path, exc_info=True)
            self._releasers.submit(self._release_later, lock)

    def _release_later(self, lock: Any) -> None:
        for delay in (1, 2, 5, 10, 30):
            time.sleep(delay)  # a releaser thread, never the loop
            try:
                lock.release()
                return
            except Exception:  # keep trying; logged below
                continue
        log.error("could not release lock %s; it stays until the session ends", lock.path)

    def _release_if_acquired(self, lock: Any, fut: Future[Any] | asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            return
        self._releasers.submit(lock.release)
