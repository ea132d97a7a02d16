"""The per-key write lock: one ephemeral znode, taken in the same ZooKeeper
transaction as the intent bump and given back in the same transaction as the
final version bump.

An uncontended write makes two round trips to ZooKeeper:

1. ``multi[create <lock> ephemeral, set <version> = "" (intent)]``: the lock
   and the "write in progress" mark land together or not at all.  With
   If-Match the ``set`` is conditional on the data version read just before
   (one more round trip), which makes the compare and the lock one atomic step.
2. ``multi[set <version> = note, delete <lock>]``: publish the new version
   (every watcher's event) and release, together.

kazoo's Lock recipe took four round trips on its own (ensure_path, create
sequential, get_children; delete), blocked a thread per waiting writer, and
left a lock directory behind for every key ever written.  What this gives up:
waiters are not served in order (each waits for the node's deletion and tries
again), which matters only for a key many sidecars fight over; the service's
per-key ``asyncio.Lock`` keeps one sidecar's own writers out of that race.

Everything here runs on the loop; waiting is a data watch, never a thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from kazoo.exceptions import (
    BadVersionError,
    NodeExistsError,
    NoNodeError,
    RolledBackError,
    RuntimeInconsistency,
)

from .. import bridge
from ..errors import CoordinationError, LockTimeout
from .layout import Layout
from .operations import set_version
from .session import ZkSession

__all__ = ["VersionConflict", "WriteLock", "acquire_write_lock"]

log = logging.getLogger(__name__)


class VersionConflict(Exception):
    """The key's version moved between the If-Match read and the lock."""


def _failure(results: list[Any]) -> Exception | None:
    # A failed multi reports the culprit's own error; the other operations
    # say only "rolled back" or "not run".
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, RolledBackError | RuntimeInconsistency):
            return result
    return None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


class WriteLock:
    """A key's write lock held by this session, with the key's version znode in intent."""

    def __init__(self, zk: ZkSession, lock_path: str, version_path: str, *, intent: bool = True) -> None:
        self.zk = zk
        self.lock_path = lock_path
        self.version_path = version_path
        self.held = True
        self.intent = intent  # the version znode says "write in progress"

    async def mark_intent(self) -> None:
        """Put the version znode in intent now (for a lock taken with ``intent=False``)."""
        await set_version(self.zk, self.version_path, b"")
        self.intent = True

    async def publish(self, note: bytes) -> int:
        """Set the version znode to ``note`` and release, in one transaction; return the new version.

        Safe to call again after a connection error: if the lock is already
        gone (an earlier attempt landed, or the session expired), the version
        is bumped on its own; a version only has to move forward.
        """
        if self.held:
            tx = self.zk.client.transaction()
            tx.set_data(self.version_path, note)
            tx.delete(self.lock_path)
            results = await self.zk.commit(tx, "publish")
            error = _failure(results)
            if error is None:
                self.held = False
                return int(results[0].mzxid)
            if not isinstance(error, NoNodeError) or isinstance(results[0], NoNodeError):
                raise CoordinationError(f"publishing {self.version_path}: {error!r}")
            self.held = False  # the lock node is gone: only the bump is left to do
        return await set_version(self.zk, self.version_path, note)

    async def abandon(self, note: bytes | None) -> None:
        """Release without a new value: with ``note``, also clear the intent (nothing was written).

        Without ``note`` the intent stays, so no sidecar caches the key until
        its next write: right when the origin write failed midway and its
        outcome is unknown.
        """
        if not self.held:
            return
        tx = self.zk.client.transaction()
        if note is not None and self.intent:
            tx.set_data(self.version_path, note)
        tx.delete(self.lock_path)
        error = _failure(await self.zk.commit(tx, "unlock"))
        if error is not None and not isinstance(error, NoNodeError):
            raise CoordinationError(f"releasing {self.lock_path}: {error!r}")
        self.held = False


async def release_leftover(zk: ZkSession, layout: Layout, key: str, note: bytes | None) -> None:
    """Delete ``key``'s lock node if this session holds it: a release that failed earlier.

    Callers hold the service's per-key ``asyncio.Lock``, so no write of this
    sidecar is using the node meanwhile.
    """
    lock_path = layout.lock_path(key)
    stat = await zk.exists(lock_path)
    if stat is not None and stat.ephemeralOwner == zk.session_id:
        await WriteLock(zk, lock_path, layout.version_path(key)).abandon(note)


async def acquire_write_lock(
    zk: ZkSession,
    layout: Layout,
    key: str,
    owner: str,
    timeout: float,
    expected_version: int | None = None,
    *,
    intent: bool = True,
) -> WriteLock:
    """Take ``key``'s lock and put its version znode in intent, atomically.

    ``expected_version`` (the znode's data version; -1: it must not exist yet)
    makes the intent conditional: :class:`VersionConflict` if it moved.
    ``intent=False`` takes only the lock, for a write that may still be
    refused without leaving a trace (If-None-Match); it then calls
    :meth:`WriteLock.mark_intent` itself.  Waits up to ``timeout`` seconds
    for another holder: :class:`LockTimeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    lock_path, version_path = layout.lock_path(key), layout.version_path(key)
    data = orjson.dumps({"member": owner, "session": f"0x{zk.session_id or 0:x}"})
    version_exists = expected_version != -1
    while True:
        tx = zk.client.transaction()
        tx.create(lock_path, data, ephemeral=True)
        if intent and version_exists:
            tx.set_data(version_path, b"", -1 if expected_version is None else expected_version)
        elif intent:
            tx.create(version_path, b"")
        results = await zk.commit(tx, "lock")
        error = _failure(results)
        if error is None:
            return WriteLock(zk, lock_path, version_path, intent=intent)
        if results[0] is error:  # the lock node
            if isinstance(error, NoNodeError):
                await zk.ensure_path(_parent(lock_path))  # first lock in this bucket
                continue
            if not isinstance(error, NodeExistsError):
                raise CoordinationError(f"lock {lock_path}: {error!r}")
            await _wait_for_release(zk, lock_path, deadline)
        elif isinstance(error, BadVersionError):
            raise VersionConflict(version_path)
        elif isinstance(error, NoNodeError) and version_exists:
            if expected_version is not None:
                raise VersionConflict(version_path)  # expected a version; the key has none
            version_exists = False  # first write of the key: create its version znode
        elif isinstance(error, NoNodeError):
            await zk.ensure_path(_parent(version_path))  # first key in this bucket
        elif isinstance(error, NodeExistsError):
            if expected_version == -1:
                raise VersionConflict(version_path)
            version_exists = True  # created meanwhile (an invalidation)
        else:
            raise CoordinationError(f"lock {lock_path}: {error!r}")


async def _wait_for_release(zk: ZkSession, lock_path: str, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    released: asyncio.Future[None] = loop.create_future()

    def on_event(_event: Any) -> None:
        # kazoo's thread: deletion, or the connection dropping (try again either way).
        bridge.post(loop, _resolve, released)

    if await zk.exists(lock_path, watch=on_event) is None:
        return  # released between our attempt and the watch
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise LockTimeout("the key's write lock is held by another writer")
    try:
        await asyncio.wait_for(released, remaining)
    except TimeoutError:
        raise LockTimeout(f"the key's write lock stayed held by another writer for {remaining:.3g}s") from None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
