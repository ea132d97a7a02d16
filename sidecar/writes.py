"""The write protocol (PUT, DELETE): one object owns a write from start to end.

The README's "Write protocol" and "Writes that fail midway" sections describe
it; this is the one implementation.  Per key::

    local asyncio lock (one writer per key per sidecar; also waits for the janitor)
    -> [If-Match: read the version and its data version]
    -> still wanted? (the client is there, the sidecar not stopping)
    -> multi[create lock, version := "" (intent)]                 ZooKeeper round trip 1
    -> [If-None-Match: read the origin, then the intent]
    -> drop our own entry -> session unchanged? -> origin write
    -> multi[version := note, delete lock], fenced               ZooKeeper round trip 2
    -> drop our own entry -> refill in the background through the read protocol

Invariants, and what keeps each one:

* *No sidecar caches a value older than the origin's once the origin may
  change*: the intent is published before the origin write; fills that see it
  serve without caching, and an intent ends only with its own writer's
  publish, or once that writer's lock is gone (``operations.invalidate_key``
  keeps a live intent).
* *A release never deletes another writer's lock, nor ends its intent*: every
  release is fenced on the version znode's data version that our intent left
  (``coordination.lock.WriteLock``); after an ambiguous failure it reconciles
  from what ZooKeeper shows, never blindly.
* *A lock this sidecar could not release does not block the fleet*: the
  :class:`LockJanitor` finishes the publish or the release in the background,
  with bounded retries, as soon as ZooKeeper answers.
* *The key stays locked until the origin call has really ended*: origins
  return only once a write can no longer land (SQLite cancels a write that
  has not started, or waits for the one that has).
* *A write nobody waits for does not land later*: until it takes the lock
  (the point of no return) a write is dropped once its client has gone or
  the sidecar is stopping (``WriteAbandoned``); otherwise a client that gave
  up and wrote elsewhere would be overwritten when this one got through.

Waiting for a connection, for the janitor and for the lock share one
``lock_timeout``; publishing after the origin write has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .config import Config
from .coordination import CasBasis, Coordinator, LockLost, VersionConflict, WriteLock, validate_key
from .errors import (
    CoordinationError,
    InvalidationNotPublished,
    LockTimeout,
    NotConnected,
    PreconditionFailed,
    WriteAbandoned,
    WriteOutcomeUncertain,
)
from .origins import Origin, OriginValue

__all__ = ["LockJanitor", "WriteProtocol", "Written"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Written:
    """A write's outcome: the new version, and where its time went (ms per phase)."""

    version: int
    phases: dict[str, float]


class _Laps:
    """Milliseconds per named phase, each from the end of the previous one."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._mark = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = (now - self._mark) * 1000
        self._mark = now


class LockJanitor:
    """Finishes, in the background, the publishes and releases a write could not.

    One task per key at most: tasks are started only by a write holding the
    key's local lock, after :meth:`settle`, and this sidecar's next write of
    the key settles them first (a lock we still hold would block that write
    anyway).  Retries are bounded (``attempts``, with capped backoff)
    and wait while ZooKeeper is not reachable.  A lock that is no longer ours
    (our session expired) needs nothing more: it went with the session.
    """

    def __init__(
        self,
        coord: Coordinator,
        on_published: Callable[[str], None],
        *,
        attempts: int = 60,
    ) -> None:
        self._coord = coord
        self._on_published = on_published
        self._attempts = attempts
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def pending(self, key: str) -> bool:
        """True while background work for ``key`` is under way (:meth:`settle` would wait)."""
        return key in self._tasks

    def publish(self, key: str, lock: WriteLock, note: bytes) -> None:
        """Keep trying to publish ``note`` (the origin has the new value) and release."""
        self._start(key, lambda: lock.publish(note), f"publishing {key!r}", published=True)

    def release(self, key: str, lock: WriteLock, note: bytes | None) -> None:
        """Keep trying to release ``lock`` (clearing the intent with ``note``, if given)."""
        self._start(key, lambda: lock.abandon(note), f"releasing the lock of {key!r}", published=False)

    def _start(self, key: str, attempt: Callable[[], Any], what: str, *, published: bool) -> None:
        task = asyncio.ensure_future(self._run(key, attempt, what, published))
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._tasks.pop(key, None) if self._tasks.get(key) is t else None)

    async def _run(self, key: str, attempt: Callable[[], Any], what: str, published: bool) -> None:
        backoff, n = 0.05, 0
        while n < self._attempts:
            # Only attempts ZooKeeper could answer count: a lock held through a
            # long outage is still released once the ensemble is back.
            if self._coord.writable:
                n += 1
                try:
                    await attempt()
                except LockLost as exc:
                    log.warning("%s: %s", what, exc)
                    if published:  # our origin write may have landed after the other writer's
                        try:
                            await self._coord.invalidate(key)
                        except CoordinationError as error:
                            log.error("%s: invalidating after losing the lock failed: %s", what, error)
                        self._on_published(key)
                    return
                except CoordinationError as exc:
                    log.info("%s failed (attempt %d: %s); retrying", what, n, exc)
                else:
                    log.info("%s: done in the background", what)
                    if published:
                        self._on_published(key)
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        log.error("%s: gave up after %d attempts; the lock goes with this session", what, self._attempts)

    async def settle(self, key: str, timeout: float) -> None:
        """Wait until no background work is pending for ``key`` (for the next write of it)."""
        task = self._tasks.get(key)
        if task is None:
            return
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            raise LockTimeout("an earlier write of this key is still being finished in the background")

    async def stop(self, timeout: float) -> None:
        """Give pending work ``timeout`` seconds, then cancel it (the session's end releases the locks)."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            task.cancel()


class WriteProtocol:
    """Write-through PUT and DELETE for one sidecar (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        origin: Origin,
        coord: Coordinator,
        *,
        drop: Callable[[str], None],
        written: Callable[[str, bool], None],
    ) -> None:
        self._config = config
        self._origin = origin
        self._coord = coord
        self._drop = drop
        self._written = written  # (key, deleted): counters, and the writer's refill
        self._local_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.janitor = LockJanitor(coord, drop)
        # Set when the sidecar begins to stop: writes not yet at the origin are dropped.
        self._stopping = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """True once :meth:`refuse` was called."""
        return self._stopping.is_set()

    def refuse(self) -> None:
        """Refuse writes from now on: the sidecar is stopping.

        New writes, and writes still waiting (for a connection, the janitor,
        or their lock's reply), answer ``WriteAbandoned``; nothing of theirs
        reaches the origin.  Writes already past that point run to their end.
        """
        self._stopping.set()

    async def _unless_stopping(self, waiting: Awaitable[None]) -> None:
        # Only for waits that change nothing (a connection, the janitor), so
        # that dropping them when the sidecar stops is safe.
        task = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            stop.cancel()
            raise
        stop.cancel()
        if task in done:
            task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise WriteAbandoned("the sidecar is stopping; nothing was written")

    def _local_lock(self, key: str) -> asyncio.Lock:
        local = self._local_locks.get(key)
        if local is None:
            local = self._local_locks[key] = asyncio.Lock()
        return local

    def _note(self, op: str) -> bytes:
        # Unique per write: after a lost reply, finding our own note in the
        # version znode is how we know our publish landed.
        return self._coord.note(op, uuid.uuid4().hex[:16])

    async def write(
        self,
        key: str,
        value: OriginValue | None,
        *,
        if_match: int | None = None,
        if_none_match: bool = False,
        wanted: Callable[[], bool] = lambda: True,
    ) -> Written:
        """PUT (``value``) or DELETE (``None``) through the origin; returns the new version.

        ``wanted`` says whether anyone still waits for the answer (the HTTP
        client is connected): asked until the write takes its lock.
        """
        validate_key(key)

        def still_wanted() -> bool:
            return not self.stopping and wanted()

        if self.stopping:
            raise WriteAbandoned("the sidecar is stopping; nothing was written")
        deadline = time.monotonic() + self._config.lock_timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        if not self._coord.writable:
            # A live session is enough (not a restored cache): see Coordinator.writable.
            await self._unless_stopping(self._coord.wait_writable(remaining(), "writes need ZooKeeper"))
        lap = _Laps()
        local = self._local_lock(key)
        async with local:
            if self.janitor.pending(key):
                await self._unless_stopping(self.janitor.settle(key, remaining()))
            expected: CasBasis | None = None
            if if_match is not None:
                expected = await self._coord.read_version_for_cas(key)
                if expected.etag != if_match:
                    raise PreconditionFailed(
                        f'If-Match "{if_match}" but the current version is "{expected.etag}"', expected.etag
                    )
            lap("check")
            session = self._coord.zk.session_id
            try:
                # If-None-Match may still refuse after the lock: intent only once it cannot.
                lock, generation = await self._coord.lock_for_write(
                    key,
                    remaining(),
                    expected,
                    intent=not if_none_match,
                    mark=self._origin.applies_late,
                    wanted=still_wanted,
                )
            except VersionConflict:
                current = await self._coord.read_version(key)
                raise PreconditionFailed(
                    f'If-Match "{if_match}" but the current version is "{current}"', current
                ) from None
            except (LockTimeout, WriteAbandoned, NotConnected):
                raise  # no lock transaction was sent, or none landed
            except CoordinationError:
                # The transaction may have landed before the connection broke:
                # release whatever this session may hold, in the background.
                adopted = self._coord.adopt_lock(key, session, intent=not if_none_match, mark=self._origin.applies_late)
                self.janitor.release(key, adopted, self._note("abort"))
                raise
            lap("lock")
            origin_touched = False
            try:
                if if_none_match:
                    if await self._origin.get(key) is not None:
                        raise PreconditionFailed("If-None-Match: * but the key has a value")
                    await lock.mark_intent()
                # Intent is published: no sidecar keeps or takes a copy from here on.
                self._drop(key)
                self._coord.check_lock(generation)  # last look before the origin changes
                if self.stopping:  # the origin may be closing: give the lock back untouched
                    raise WriteAbandoned("the sidecar is stopping; nothing was written")
                origin_touched = True
                if value is None:
                    await self._origin.delete(key)
                else:
                    await self._origin.put(key, value)
            except BaseException:
                # Nothing written: clear the intent. Origin write failed midway:
                # keep it, so nobody caches a value of unknown age.
                await self._release(key, lock, None if origin_touched else self._note("abort"))
                raise
            lap("origin")
            version = await self._publish(key, lock, self._note("delete" if value is None else "put"))
            lap("publish")
            if self._coord.zk.session_id != session:
                # Our session expired while we held the lock (a partition
                # longer than the session): another writer may have entered.
                # The bump above still invalidated every cache; but claiming
                # this write as version `version` could pair that ETag with
                # another writer's value.
                self._drop(key)
                raise WriteOutcomeUncertain(
                    "the origin was written, but this sidecar's ZooKeeper session expired while it held the "
                    "key's lock; another write may have replaced it: read the key to see which won"
                )
            # Our own watch event may still be on its way (kazoo delivers it on
            # another thread): drop now, so this sidecar never answers with the
            # old value after acknowledging, and void fills that read it.
            self._drop(key)
        self._written(key, value is None)
        return Written(version, lap.phases)

    async def _release(self, key: str, lock: WriteLock, note: bytes | None) -> None:
        try:
            await lock.abandon(note)
        except CoordinationError as exc:  # the write's own error matters more
            log.warning("key %r: releasing the write lock failed (%s); retrying in the background", key, exc)
            self.janitor.release(key, lock, note)

    async def _publish(self, key: str, lock: WriteLock, note: bytes) -> int:
        # The origin already has the new value: the fleet must be told. Retry
        # until the lock timeout; past it, answer 503 and let the janitor go
        # on (the publish is fenced, so a retry never touches another writer).
        deadline = time.monotonic() + self._config.lock_timeout
        backoff = 0.05
        while True:
            try:
                return await lock.publish(note)
            except LockLost as exc:
                # Another writer entered after our session lost the lock, and
                # our origin write may have landed after theirs: the fleet must
                # still hear of it, or caches could keep their value forever.
                # invalidate_key bumps the version and keeps a live intent.
                await self._coord.invalidate(key)
                self._drop(key)
                raise WriteOutcomeUncertain(
                    "the origin was written, but this sidecar lost the key's lock before publishing and another "
                    "writer entered; read the key to see which write won"
                ) from exc
            except CoordinationError as exc:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    log.warning("key %r: publishing the new version failed (%s); retrying", key, exc)
                    await asyncio.sleep(min(backoff, remaining))
                    backoff = min(backoff * 2, 2.0)
                    continue
                log.error("key %r: origin written, publish failed (%s); retrying in the background", key, exc)
                self.janitor.publish(key, lock, note)
                raise InvalidationNotPublished(
                    "the origin has the new value but other sidecars were not told yet; "
                    "this sidecar keeps retrying the invalidation in the background"
                ) from exc
