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
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
from kazoo.exceptions import (
    BadVersionError,
    NodeExistsError,
    NoNodeError,
    RolledBackError,
    RuntimeInconsistency,
)

from .. import bridge
from ..errors import CoordinationError, LockTimeout, WriteAbandoned
from .layout import Layout
from .session import ZkSession, ZkState, ZnodeStat

__all__ = ["CasBasis", "LockLost", "VersionConflict", "WriteLock", "acquire_write_lock"]

log = logging.getLogger(__name__)


class VersionConflict(Exception):
    """The key's version moved between the If-Match read and the lock."""


class CasBasis(NamedTuple):
    """What an If-Match write read of its key, to make its lock conditional on exactly that.

    A data version alone is not enough once version znodes can be retired
    and created again (housekeeping.py): a new incarnation counts its data
    versions from 0 again.  So a present key's lock also checks the
    znode's ``czxid``, and an absent key's checks that ``retired`` did not
    move (its absent version is ``retired``'s mzxid).
    """

    etag: int  # the version clients see
    data_version: int  # -1: no version znode
    czxid: int  # the version znode's creation; 0: none
    retired_version: int  # ``retired``'s data version; -1: missing


def _failure(results: list[Any]) -> Exception | None:
    # A failed multi reports the culprit's own error; the other operations
    # say only "rolled back" or "not run".
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, RolledBackError | RuntimeInconsistency):
            return result
    return None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


class LockLost(Exception):
    """The lock is no longer this session's: another writer may hold the key now."""


class WriteLock:
    """A key's write lock held by this session, with the key's version znode in intent.

    Fencing: the lock is an ephemeral znode, so after a session expiry another
    writer can hold the same path, and a multi cannot check an ephemeral's
    owner.  What the multi *can* check is the version znode's data version,
    which every writer moves when it takes the lock (the intent).  So every
    release is ``multi[set or check <version> at the data version our intent
    left, delete <lock>]``: it fails (and deletes nothing) once anyone else
    has entered.  When it fails, or its reply was lost, :meth:`_reconcile`
    reads what is there and decides from the owner and the data, never blindly.
    """

    def __init__(
        self,
        zk: ZkSession,
        lock_path: str,
        version_path: str,
        *,
        intent_version: int | None,
        session: int | None,
        marker_path: str | None = None,
        marker: str | None = None,
        sets_intent: bool = True,
    ) -> None:
        self.zk = zk
        self.lock_path = lock_path
        self.version_path = version_path
        # The key's kept-intent marker (see "Markers" in the module
        # docstring); None: this origin never applies a write late.
        self.marker_path = marker_path
        # MINE: created by this write, ours to delete when the intent ends;
        # ADOPTED: another write's kept intent was there first (never end it
        # without a value); None: no marker; UNKNOWN: an adopted lock, not read yet.
        self.marker = marker
        self.sets_intent = sets_intent  # the lock transaction included an intent
        self.session = session  # the session that created the lock znode
        self.held = True
        # The version znode's data version right after our intent; None: no
        # intent set yet (If-None-Match takes the lock alone first).
        self.intent_version = intent_version

    @property
    def intent(self) -> bool:
        """True once the version znode says "write in progress" for this write."""
        return self.intent_version is not None

    async def mark_intent(self) -> None:
        """Put the version znode in intent now (for a lock taken with ``intent=False``).

        The marker first, when this origin needs one: never an intent without it.
        """
        if self.marker_path is not None:
            self.marker = await _place_marker(self.zk, self.marker_path, self.session)
        stat = await _set_or_create(self.zk, self.version_path, b"")
        self.intent_version = int(stat.version)
        self.sets_intent = True

    async def publish(self, note: bytes) -> int:
        """Set the version znode to ``note`` and release, in one fenced transaction; return the new version.

        Safe to call again after a connection error (the reply may have been
        lost with the transaction applied): the retry's fence fails, and the
        reconciliation finds our note.  Raises :class:`LockLost` when another
        writer entered after our session lost the lock.
        """
        for _ in range(5):
            # Only from the session that took the lock: kazoo sends requests
            # made after an expiry on the next session, where our fence could
            # pass over a writer that took the lock without an intent.
            if self.zk.session_id is None:
                raise CoordinationError("not connected to ZooKeeper")
            if self.held and self.intent_version is not None and self.zk.session_id == self.session:
                if self.marker == UNKNOWN:
                    await self._learn_marker()
                tx = self.zk.client.transaction()
                tx.set_data(self.version_path, note, self.intent_version)
                tx.delete(self.lock_path)
                if self.marker is not None:
                    tx.delete(self.marker_path)  # the new value ends any kept intent too
                results = await self.zk.commit(tx, "publish")
                error = _failure(results)
                if error is None:
                    self.held = False
                    return int(results[0].mzxid)
                if len(results) > 2 and results[2] is error:
                    self.marker = None  # gone already: publish without it
                    continue
            mzxid = await self._reconcile(note)
            if mzxid is not None:
                return mzxid
        raise CoordinationError(f"publishing {self.version_path}: the version znode kept changing")

    async def abandon(self, note: bytes | None) -> None:
        """Release without a new value: with ``note``, also clear our intent (nothing was written).

        Without ``note`` the intent stays, so no sidecar caches the key until
        its next write or invalidation: right when the origin write failed
        midway and its outcome is unknown.  With a marker (an origin that
        may apply a write late) it stays too, so the housekeeper never ends
        that intent.  ``note`` never ends an intent this write did not set,
        nor one another write kept on purpose before us (a refused or
        aborted write changes nothing).  Deletes the lock only while it is
        still ours (see the class docstring); raises ``CoordinationError`` if
        ZooKeeper cannot be reached.
        """
        for _ in range(5):
            if not self.held:
                return
            if not await self._still_ours():
                self.held = False  # gone with our session, or someone else's now
                return
            if self.marker == UNKNOWN:
                await self._learn_marker()
            stat = await self.zk.exists(self.version_path)
            expected = self.intent_version if self.intent_version is not None else (stat.version if stat else None)
            ending = (
                note is not None
                and stat is not None
                and stat.dataLength == 0
                and (self.intent or self.sets_intent)
                and self.marker != ADOPTED
            )
            tx = self.zk.client.transaction()
            if stat is not None and expected is not None:
                if ending:
                    tx.set_data(self.version_path, note, expected)
                else:
                    tx.check(self.version_path, expected)
            tx.delete(self.lock_path)
            marker_op = ending and self.marker == MINE
            if marker_op:
                tx.delete(self.marker_path)
            # No await between this check and the send: a release built on
            # one session must not go out on the next (kazoo would send it
            # there), where our lock may be another writer's now.
            if self.zk.session_id != self.session or self.zk.state is not ZkState.CONNECTED:
                raise CoordinationError("the ZooKeeper session moved while releasing the lock")
            results = await self.zk.commit(tx, "unlock")
            error = _failure(results)
            if error is None:
                self.held = False
                return
            if marker_op and results[-1] is error:
                self.marker = None  # gone already: release without it
                continue
            # The version znode moved under our lock (an invalidation keeps an
            # intent but bumps it): take its new data version and try again.
            if self.intent_version is not None and stat is not None:
                fresh = await self.zk.exists(self.version_path)
                self.intent_version = int(fresh.version) if fresh else None
        raise CoordinationError(f"releasing {self.lock_path}: the version znode kept changing")

    async def _learn_marker(self) -> None:
        # An adopted lock (its transaction's reply was lost): whose marker is there?
        if self.marker_path is None:
            self.marker = None
            return
        try:
            data, _ = await self.zk.get(self.marker_path)
        except NoNodeError:
            self.marker = None
            return
        info = _marker_info(data)
        mine = info.get("session") == f"0x{self.session or 0:x}" and not info.get("adopted")
        self.marker = MINE if mine else ADOPTED

    async def _still_ours(self) -> bool:
        current = self.zk.session_id
        if current is None:
            # Disconnected (kazoo forgets the id meanwhile): nothing is known
            # yet, and "not ours" would give up a lock we may still hold.
            raise CoordinationError("not connected to ZooKeeper")
        if self.session is None or current != self.session:
            return False
        stat = await self.zk.exists(self.lock_path)
        return stat is not None and stat.ephemeralOwner == self.session

    async def _reconcile(self, note: bytes) -> int | None:
        """After a failed or ambiguous publish: the new version if settled, ``None`` to try again."""
        if self.held and await self._still_ours():
            # Ours still; the version znode was bumped under our lock (an
            # invalidation leaves an intent in place but moves it).
            stat = await self.zk.exists(self.version_path)
            if stat is None:
                stat = await _set_or_create(self.zk, self.version_path, b"")
            self.intent_version = int(stat.version)
            return None
        self.held = False
        try:
            data, stat = await self.zk.get(self.version_path)
        except NoNodeError:
            return int((await _set_or_create(self.zk, self.version_path, note)).mzxid)
        if data == note:
            return int(stat.mzxid)  # our publish landed; its reply was lost
        if data == b"" and await self.zk.exists(self.lock_path) is None:
            # Still in intent and nobody holds the lock: ours (our session
            # lost the lock before we published) or a dead writer's. The
            # origin has our value: end the intent with our note (and its
            # marker, whoever kept it: our value is the newer one).
            tx = self.zk.client.transaction()
            tx.set_data(self.version_path, note, stat.version)
            if self.marker_path is not None and await self.zk.exists(self.marker_path) is not None:
                tx.delete(self.marker_path)
            results = await self.zk.commit(tx, "publish")
            if _failure(results) is None:
                return int(results[0].mzxid)
            return None
        raise LockLost(
            f"{self.lock_path}: another writer entered after this session lost the lock; "
            "the key was published by it or will be"
        )


MINE, ADOPTED, UNKNOWN = "mine", "adopted", "unknown"


def _marker_data(session: int | None, *, adopted: bool = False) -> bytes:
    return orjson.dumps({"session": f"0x{session or 0:x}", "adopted": adopted})


def _marker_info(data: bytes) -> dict[str, Any]:
    try:
        info = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


async def _place_marker(zk: ZkSession, path: str, session: int | None) -> str:
    """Create the key's marker (MINE), or touch one a kept intent left (ADOPTED): the touch moves its
    version, so a sweep that read it before fails its conditional delete."""
    for _ in range(5):
        try:
            await zk.create(path, _marker_data(session), makepath=True)
            return MINE
        except NodeExistsError:
            pass
        try:
            await zk.set(path, _marker_data(session, adopted=True))
            return ADOPTED
        except NoNodeError:
            continue  # swept meanwhile: create it
    raise CoordinationError(f"{path}: the marker kept coming and going")


async def _set_or_create(zk: ZkSession, path: str, data: bytes) -> ZnodeStat:
    try:
        return await zk.set(path, data)
    except NoNodeError:
        pass
    try:
        _, stat = await zk.create(path, data, makepath=True)
        return stat
    except NodeExistsError:
        return await zk.set(path, data)


async def acquire_write_lock(
    zk: ZkSession,
    layout: Layout,
    key: str,
    owner: str,
    timeout: float,
    expected: CasBasis | None = None,
    *,
    intent: bool = True,
    mark: bool = False,
    wanted: Callable[[], bool] = lambda: True,
) -> WriteLock:
    """Take ``key``'s lock and put its version znode in intent, atomically.

    ``mark`` (an origin that may apply a write late): the key's kept-intent
    marker is created (or, left by a kept intent, touched) in the same
    transaction, so no intent of such a write is ever without it.

    ``expected`` (what an If-Match read: see :class:`CasBasis`) makes the
    intent conditional: :class:`VersionConflict` if the key moved since.
    ``intent=False`` takes only the lock, for a write that may still be
    refused without leaving a trace (If-None-Match); it then calls
    :meth:`WriteLock.mark_intent` itself.  Waits up to ``timeout`` seconds
    for another holder: :class:`LockTimeout`.  ``wanted`` is asked before
    every attempt (none of the earlier ones landed): once it says no, the
    write is dropped with :class:`WriteAbandoned` and nothing was written.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    lock_path, version_path = layout.lock_path(key), layout.version_path(key)
    data = orjson.dumps({"member": owner, "session": f"0x{zk.session_id or 0:x}"})
    expected_version = None if expected is None else expected.data_version
    version_exists = expected_version != -1
    marker_path = layout.uncertain_path(key) if mark else None
    adopt_marker = False
    while True:
        if not wanted():
            raise WriteAbandoned("the client went away (or the sidecar is stopping) before the write took its lock")
        tx = zk.client.transaction()
        tx.create(lock_path, data, ephemeral=True)
        if intent and version_exists:
            tx.set_data(version_path, b"", -1 if expected_version is None else expected_version)
        elif intent:
            tx.create(version_path, b"")
            if expected is not None and expected.retired_version >= 0:
                tx.check(layout.retired, expected.retired_version)  # the absent version did not move
        session = zk.session_id
        marker_index = None
        if marker_path is not None and intent:
            marker_index = len(tx.operations)
            if adopt_marker:
                tx.set_data(marker_path, _marker_data(session, adopted=True))
            else:
                tx.create(marker_path, _marker_data(session))
        if session is None:
            # kazoo would queue the request and send it on whatever session
            # comes next, and the lock would not be known as ours.
            raise CoordinationError("not connected to ZooKeeper")
        results = await zk.commit(tx, "lock")
        error = _failure(results)
        if error is None:
            # set_data answers the znode's stat; a create in a multi only its
            # path, and a new znode's data version is 0.
            intent_version = (int(results[1].version) if version_exists else 0) if intent else None
            marker = (ADOPTED if adopt_marker else MINE) if marker_index is not None else None
            lock = WriteLock(
                zk,
                lock_path,
                version_path,
                intent_version=intent_version,
                session=session,
                marker_path=marker_path,
                marker=marker,
                sets_intent=intent,
            )
            if expected is not None and intent and version_exists and int(results[1].czxid) != expected.czxid:
                # The same data version on another incarnation of the znode
                # (retired and written again since the read): not the version
                # the client saw. Give it back, with a note ending our intent.
                await lock.abandon(orjson.dumps({"op": "abort", "by": owner}))
                raise VersionConflict(version_path)
            return lock
        if marker_index is not None and results[marker_index] is error:
            if isinstance(error, NodeExistsError):
                adopt_marker = True  # a kept intent's marker: touch it instead
            elif isinstance(error, NoNodeError):
                if adopt_marker:
                    adopt_marker = False  # swept meanwhile: create it
                else:
                    await zk.ensure_path(_parent(marker_path))  # type: ignore[arg-type]
            else:
                raise CoordinationError(f"lock {lock_path}: {error!r}")
            continue
        if not version_exists and len(results) > 2 and results[2] is error:  # the check on `retired`
            raise VersionConflict(version_path)
        if results[0] is error:  # the lock node
            if isinstance(error, NoNodeError):
                await zk.ensure_path(_parent(lock_path))  # first lock in this bucket
                continue
            if not isinstance(error, NodeExistsError):
                raise CoordinationError(f"lock {lock_path}: {error!r}")
            if await _reclaim_own(zk, lock_path, version_path, session):
                continue
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


async def _reclaim_own(zk: ZkSession, lock_path: str, version_path: str, session: int) -> bool:
    """Delete a lock this very session holds from an earlier write whose release never got through.

    Callers hold the service's per-key local lock, so no write of this
    sidecar uses it.  Fenced like every release: if our session expired and
    another writer entered meanwhile, its intent moved the version and the
    delete does not happen.
    """
    lock = await zk.exists(lock_path)
    if lock is None or lock.ephemeralOwner != session:
        return lock is None  # gone meanwhile: try again; someone else's: wait for it
    version = await zk.exists(version_path)
    tx = zk.client.transaction()
    if version is not None:
        tx.check(version_path, version.version)
    tx.delete(lock_path)
    if _failure(await zk.commit(tx, "reclaim")) is None:
        log.warning("%s: released a lock this session still held from an earlier write", lock_path)
    return True


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
