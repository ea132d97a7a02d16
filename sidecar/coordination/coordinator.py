"""The daemon's side of ZooKeeper: watches, membership and session states.

The :class:`Coordinator` turns ZooKeeper into four kinds of calls on an
:class:`Events` listener, always on the event loop:

* ``key_changed(key)``: the key's version znode changed (one-shot data watch);
* ``prefixes_invalidated([prefix, ...])``: new entries in the prefix log;
* ``flush(reason)``: everything must go (epoch bumped, or prefix log
  truncated past what we applied);
* ``state_changed(state)``: the session state moved.

Session policy (documented in the README):

* SUSPENDED: kazoo has dropped every watch; ``ready`` is False.
* LOST: the session expired; nothing is served from the cache, and on the
  next CONNECTED (a new session) the member znode is registered again and
  the cached keys' watches are restored as after a reconnect.
* CONNECTED after SUSPENDED, same session: the watches of cached keys are
  gone; the epoch and prefix-log watches are re-armed (applying what changed
  meanwhile), the cached keys' watches are handed back with ``setWatches``
  relative to the zxid of the first unrepaired loss (the server fires at
  once for every key changed since, and re-arms the rest: a round trip per
  128 KB of paths, not one per key), then ``ready`` becomes True.
* CONNECTED with a new session after LOST: the same, plus the member znode.

Writes and invalidations need only :attr:`Coordinator.writable` (connected,
and answered within the lease), not ``ready``: they work during the restore,
and a write that arrives while disconnected waits for the next connection
(``wait_writable``).

Watches lost at time T stay lost until a setup completes: ``unwatched_since``
is T through any number of reconnects and losses in between, so the grace
during which cached values may still be served counts from the first loss;
likewise the restore's zxid is that of the first loss (a later one would
include replies read on a connection that held no key watches).

A namespace task that fails (a re-arm hit ConnectionLoss, a member znode
write was refused) costs readiness, never the cache: the setup is retried
with the baselines kept, which applies whatever was missed and restores.
Only an invalidate-all or a gap in the prefix log flush; a lost session does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kazoo.protocol.states import EventType, WatchedEvent

from .. import bridge
from ..config import Config, TlsSettings
from ..errors import CoordinationError, NotConnected, ZkAccessDenied
from .election import Election
from .housekeeping import Housekeeper, HousekeepingSettings, absent_version, read_retired
from .kazoo_watches import set_watches_async
from .key_watches import KeyWatches
from .layout import Layout
from .live_config import ConfigWatch
from .lock import UNKNOWN, CasBasis, WriteLock, acquire_write_lock
from .membership import Membership
from .namespace import NamespaceWatches
from .operations import (
    Acknowledgement,
    InvalidationReceipt,
    await_acknowledgement,
    ensure_layout,
    invalidate_key,
    publish_invalidation,
    version_note,
)
from .session import ZkSession, ZkState

__all__ = ["Coordinator", "EventDelivery", "Events", "KeyState", "KeyVersion"]

log = logging.getLogger(__name__)


class KeyVersion(NamedTuple):
    """A key's version, and whether a write of it is in progress (or died midway)."""

    version: int
    writing: bool


class KeyState(NamedTuple):
    """A key as seen by one check that also caught up on namespace invalidations.

    ``lease`` is ``max(version, floor)``: it moves with every write or
    invalidation of the key *and* with every covering prefix or
    invalidate-all, so comparing leases catches all of them.
    """

    version: int  # 0: no version znode
    writing: bool
    floor: int  # newest namespace invalidation covering the key, applied here
    absent: int = 0  # the version of keys with no version znode (housekeeping.absent_version)
    modified_ms: int = 0  # the version znode's mtime (ZooKeeper's clock); 0: none

    @property
    def etag(self) -> int:
        """The key's version as clients see it: an absent key's is ``absent``, never 0 again once retired."""
        return self.version or self.absent

    @property
    def lease(self) -> int:
        """The key's coverage version: what a cache-aside lease is."""
        return max(self.etag, self.floor)


class Events(Protocol):
    """What the coordinator tells the cache service; every call is on the loop."""

    def key_changed(self, key: str) -> None: ...

    def prefixes_invalidated(self, prefixes: list[str]) -> None: ...

    def flush(self, reason: str) -> None: ...

    def void_fills(self) -> None:
        """Void every fill in flight, keeping the entries (an invalidation is on its way)."""
        ...

    def state_changed(self, state: ZkState) -> None: ...

    async def restore(self, restore_watches: Callable[[dict[str, int]], Awaitable[None]]) -> None:
        """A new connection (same session, or a new one after LOST): hand back every cached key's watch."""
        ...


class _NoEvents:
    """Until :meth:`Coordinator.attach`: events go nowhere (nothing is cached yet)."""

    def key_changed(self, key: str) -> None:
        pass

    def prefixes_invalidated(self, prefixes: list[str]) -> None:
        pass

    def flush(self, reason: str) -> None:
        pass

    def void_fills(self) -> None:
        pass

    def state_changed(self, state: ZkState) -> None:
        pass

    async def restore(self, restore_watches: Callable[[dict[str, int]], Awaitable[None]]) -> None:
        pass


@dataclass(slots=True)
class EventDelivery:
    """How key watch events travel from kazoo's thread to the cache, on this process's clock.

    ``arrived`` is stamped on kazoo's event thread as the notification comes
    in, ``applied`` on the loop once the entry is dropped; both are
    ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process of the
    machine), so a benchmark can line them up with its own clock.
    """

    count: int = 0
    last_arrived: float = 0.0
    last_applied: float = 0.0
    hop_seconds_total: float = 0.0
    hop_seconds_max: float = 0.0

    def record(self, arrived: float, applied: float) -> None:
        """One event: arrived on kazoo's thread, applied on the loop."""
        hop = applied - arrived
        self.count += 1
        self.last_arrived, self.last_applied = arrived, applied
        self.hop_seconds_total += hop
        self.hop_seconds_max = max(self.hop_seconds_max, hop)


class Coordinator:
    """Watches, locks, versions and membership for one sidecar."""

    def __init__(
        self,
        *,
        hosts: str,
        root: str,
        session_timeout: float,
        member_id: str,
        member_info: dict[str, Any],
        events: Events | None = None,
        auth: str | None = None,
        tls: TlsSettings | None = None,
        housekeeping: HousekeepingSettings | None = None,
    ) -> None:
        self.layout = Layout(root)
        self.member_id = member_id
        # kazoo declares a silent connection dead after 2/3 of the session
        # timeout; we hold ourselves to the same bound with our own clock,
        # because kazoo never pings while requests keep the socket busy.
        self.lease = session_timeout * 2 / 3
        self._heartbeat_interval = session_timeout / 3
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._events: Events = events or _NoEvents()
        self.zk = ZkSession(hosts, session_timeout, auth=auth, tls=tls, on_state=self._on_state)
        self._diagnosis_task: asyncio.Task[None] | None = None
        # Why no server answers as configured (TLS, plaintext, refused), while not connected.
        self.connect_problem: str | None = None
        self.ready = False
        # Bumped on every session state change: a write that saw it move
        # while holding the lock may have lost the lock (kazoo lock docs).
        self.state_generation = 0
        self.sessions = 0  # distinct sessions established so far
        self._session_id: int | None = None
        self._was_connected = False
        self._setup_task: asyncio.Task[None] | None = None
        self._setup_error: str | None = None  # why the last setup failed (for /readyz)
        # Namespace re-arms (epoch, prefix log) and acknowledgements are kept
        # apart: an acknowledgement waits for the re-arms, never for another
        # acknowledgement (two of them waiting on each other deadlocked).
        self._rearm_tasks: set[asyncio.Task[None]] = set()
        self.namespace = NamespaceWatches(self.zk, self.layout, self._events, self._spawn)
        self.live_config = ConfigWatch(self.zk, self.layout.config, self._spawn)
        self.membership = Membership(
            self.zk, self.layout, member_id, member_info, ready=lambda: self.ready, rearms=self._rearm_tasks
        )
        # monotonic time since which key watches may be missing (None: every
        # cached key is watched). Set at the first loss, cleared only when a
        # setup completes, so later losses do not restart the grace.
        self.unwatched_since: float | None = time.monotonic()
        # The zxid up to which this sidecar received every key event before
        # its first loss not yet repaired (None: nothing to restore).
        self._restore_zxid: int | None = None
        self.key_events = EventDelivery()
        # Key watches we may hold; the cache reports vacated keys through
        # `release_watch`, so they stay bounded by what it holds.
        self.key_watches = KeyWatches(self.zk, self.layout.version_path, self._version_watch)
        # Every sidecar stands; the one elected keeps the namespace small.
        self.election = Election(self.zk, self.layout, member_id)
        self.housekeeper = Housekeeper(
            self.zk,
            self.layout,
            self.election,
            housekeeping or HousekeepingSettings(retention=86400.0, lock_timeout=10.0),
            member_id,
        )

    @classmethod
    def from_config(cls, config: Config, origin_name: str, software_version: str) -> Coordinator:
        """The coordinator of a sidecar with these settings (events: :meth:`attach`)."""
        return cls(
            hosts=config.zk,
            root=config.namespace_root,
            session_timeout=config.zk_session_timeout,
            member_id=config.member_id,
            member_info={
                "member_id": config.member_id,
                "address": str(config.listen),
                "started_at": time.time(),
                "version": software_version,
                "origin": origin_name,
            },
            auth=config.zk_auth,
            tls=config.zk_tls_settings,
            housekeeping=HousekeepingSettings(
                retention=config.version_retention,
                lock_timeout=config.lock_timeout,
                interval=config.housekeeping_interval,
                rate=config.housekeeping_rate,
            ),
        )

    def attach(self, events: Events) -> None:
        """Send ZooKeeper's events to ``events`` (before :meth:`start`)."""
        self._events = events
        self.namespace.attach(events)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Begin connecting; ``ready`` turns True once the session is set up."""
        self.zk.start()
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat())
        self._diagnosis_task = asyncio.ensure_future(self._diagnose_while_disconnected())
        self.election.start()
        self.housekeeper.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Leave the fleet: close the session (the member znode goes with it)."""
        self.ready = False
        for task in [self._setup_task, *self._rearm_tasks]:
            if task is not None:
                task.cancel()
        # The loops, cancelled until they end (bridge.cancel_and_wait says why).
        for loop_task in (self._heartbeat_task, self._diagnosis_task):
            if loop_task is not None:
                await bridge.cancel_and_wait(loop_task)
        await self.housekeeper.stop()
        await self.election.stop()
        self.membership.stop()
        await self.zk.close(timeout)

    @property
    def state(self) -> ZkState:
        """The current session state."""
        return self.zk.state

    async def _diagnose_while_disconnected(self, first: float = 2.0, every: float = 10.0) -> None:
        # kazoo retries a refused TLS handshake (or any failed connection)
        # forever and says only "connection dropped": after a short wait,
        # probe the servers ourselves so /readyz and the log can say why.
        await asyncio.sleep(first)
        while True:
            if self.zk.state is ZkState.CONNECTED:
                self.connect_problem = None
            else:
                problem = await self.zk.diagnose()
                if self.state is ZkState.CONNECTED:  # (a property: read again after the await)
                    problem = None  # connected while probing: the answer is stale
                elif problem and problem != self.connect_problem:
                    log.error("cannot reach ZooKeeper: %s", problem)
                self.connect_problem = problem
            await asyncio.sleep(every if self.connect_problem is None else every / 2)

    def silence(self) -> float:
        """Seconds since the server last answered anything on this session."""
        return time.monotonic() - self.zk.last_heard

    @property
    def usable(self) -> bool:
        """Ready, and the server answered within the lease: watches can be trusted."""
        return self.ready and self.silence() <= self.lease

    @property
    def writable(self) -> bool:
        """Connected, and the server answered within the lease: the session, and every lock it holds, is alive.

        Writes and invalidations need this, not :attr:`ready`: a lock is an
        ephemeral znode of the session and every step of a write is a
        conditional transaction, so nothing in them depends on this
        sidecar's watches being restored.
        """
        return self.state is ZkState.CONNECTED and self.silence() <= self.lease

    async def wait_writable(self, timeout: float, purpose: str) -> None:
        """Return once :attr:`writable`, waiting up to ``timeout`` seconds; else raise :class:`NotConnected`.

        A write that arrives while kazoo reconnects (a server restarting in
        an ensemble, a brief partition) waits for the new connection instead
        of failing.  A connection that has answered nothing yet (after an
        outage longer than the lease) is probed with one round trip.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.writable:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NotConnected(f"{purpose}: {self.describe_state()} (waited {timeout:g}s)")
            try:
                if self.state is not ZkState.CONNECTED:
                    await self.zk.wait_connected(remaining)
                elif self.zk.last_heard < self.zk.connected_at:
                    await asyncio.wait_for(self.zk.exists(self.layout.root), remaining)
                else:
                    # Heard on this connection, silent since: kazoo drops it
                    # within the same bound, then we wait for the next one.
                    await asyncio.sleep(min(remaining, 0.05))
            except ZkAccessDenied:
                raise
            except (CoordinationError, TimeoutError):
                pass  # not yet: look again

    async def _heartbeat(self) -> None:
        # Keeps last_heard fresh on an idle sidecar and exposes a dead link
        # on a busy one (kazoo's own pings stop while requests flow).
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            if self.ready:
                try:
                    await self.zk.exists(self.layout.root)
                except Exception as exc:  # the lease expiring is the signal
                    log.debug("heartbeat failed: %s", exc)

    # -- key operations (request path; all async, none blocks the loop) ------
    async def watch_version(self, key: str) -> KeyVersion:
        """Arm the one-shot data watch on ``key``'s version znode; return its state.

        Version 0 when the key has never been written (an ``exists`` watch
        still fires when the znode is created).
        """
        self.require_usable()
        client = self.zk.client
        armed = client.exists_async(self.layout.version_path(key), watch=self._version_watch)
        self.key_watches.arming([key], armed)
        # `retired` in the same round trip: the ETag of an absent key is the
        # absent version, which must be no older than this read (a lagging
        # copy could answer a conditional GET with 304 across a retirement).
        stat, retired = await self.zk.call_all((armed, "exists"), (client.exists_async(self.layout.retired), "exists"))
        if stat is None:
            self.namespace.catch_up_retired(absent_version(retired))
            return KeyVersion(0, False)
        return KeyVersion(int(stat.mzxid), stat.dataLength == 0)

    async def restore_watches(self, versions: dict[str, int]) -> None:
        """Re-arm the watches of cached keys (key -> cached version) after a reconnect, in one go.

        ``setWatches`` relative to the zxid of the first loss not yet
        repaired: every change of a watched key up to it was notified on the
        lost connection (ZooKeeper sends a watch event before any reply with
        a later zxid); for every change after it the server fires now
        (NodeDataChanged, NodeDeleted; NodeCreated for keys cached at
        version 0, watched with an exist watch), before its reply.  Returns
        once those events are on the loop, so changed keys are dropped by then.
        """
        zxid = self._restore_zxid
        if zxid is None or not versions:
            return  # no connection lost since the last setup: the server still holds them
        path = self.layout.version_path
        data = [k for k in versions if versions[k]]
        exist = [k for k in versions if not versions[k]]
        results = set_watches_async(
            self.zk.client,
            zxid,
            data=[path(k) for k in data],
            exist=[path(k) for k in exist],
            watcher=self._version_watch,
        )
        # The batches go out back to back and are answered in order: the last
        # reply ends the arm of every key.
        self.key_watches.arming(versions, results[-1])
        await self.zk.call_all(*((result, "setWatches") for result in results))
        await self.zk.drain_events()
        if exist:
            # Read after the setWatches: a key created after `zxid` and
            # retired before them fired nothing, and its retirement bumped
            # `retired` first (housekeeping.py). Which keys is unknown here.
            absent, max_czxid = await read_retired(self.zk, self.layout)
            self.namespace.catch_up_retired(absent)
            if max_czxid > zxid:
                log.warning(
                    "version znodes created while this sidecar was away were retired meanwhile; "
                    "dropping its %d entries of keys that had none",
                    len(exist),
                )
                for key in exist:
                    self._events.key_changed(key)

    async def key_state(self, key: str, *, watch: bool = False, strong: bool = False) -> KeyState:
        """The key's version and its namespace floor, caught up with ZooKeeper.

        One pipelined round trip: [``sync``,] ``exists`` on the key (with its
        watch if ``watch``), ``exists`` on the epoch and on the prefix log.
        ZooKeeper answers a session's requests in order, so with ``strong``
        everything is read after the server caught up with the leader.  If
        the epoch or the prefix log moved past what this sidecar applied (a
        notification still on its way), it is applied here first, so the
        floor (and the cache) reflect every namespace invalidation committed
        before the reads.
        """
        self.require_usable()
        client, layout = self.zk.client, self.layout
        path = layout.version_path(key)
        calls = [(client.sync_async(path), "sync")] if strong else []
        armed = client.exists_async(path, watch=self._version_watch if watch else None)
        if watch:
            self.key_watches.arming([key], armed)
        calls += [
            (armed, "exists"),
            (client.exists_async(layout.epoch), "exists"),
            (client.exists_async(layout.prefixes), "exists"),
            (client.exists_async(layout.retired), "exists"),
        ]
        stat, epoch, prefixes, retired = (await self.zk.call_all(*calls))[-4:]
        absent = absent_version(retired)
        await self.namespace.catch_up(int(epoch.mzxid) if epoch else 0, int(prefixes.pzxid) if prefixes else 0, absent)
        version, writing = (int(stat.mzxid), stat.dataLength == 0) if stat else (0, False)
        return KeyState(version, writing, self.namespace.floor.floor(key), absent, int(stat.mtime) if stat else 0)

    def release_watch(self, key: str) -> None:
        """The cache holds nothing for ``key`` any more: remove its watch (``KeyWatches.vacated``)."""
        self.key_watches.vacated(key)

    async def read_version(self, key: str) -> int:
        """The key's current version as clients see it (its ETag), without a watch."""
        return (await self.read_version_for_cas(key)).etag

    def etag(self, version: int) -> int:
        """The ETag of a cached or filled ``version``: an absent key's (0) is the absent version applied here."""
        return version or self.namespace.retired

    def note(self, op: str, write_id: str = "") -> bytes:
        """A version znode's data for ``op`` by this member (see ``operations.version_note``)."""
        return version_note(op, self.member_id, write_id)

    async def read_version_for_cas(self, key: str) -> CasBasis:
        """What an If-Match write compares and then locks on (see ``lock.CasBasis``).

        One pipelined round trip with ``retired``: an absent key's ETag is
        the absent version, so one handed out before a retirement never
        matches after it.
        """
        self.require_writable()
        client = self.zk.client
        stat, retired = await self.zk.call_all(
            (client.exists_async(self.layout.version_path(key)), "exists"),
            (client.exists_async(self.layout.retired), "exists"),
        )
        retired_version = int(retired.version) if retired is not None else -1
        if stat is not None:
            return CasBasis(int(stat.mzxid), int(stat.version), int(stat.czxid), retired_version)
        absent = absent_version(retired)
        self.namespace.catch_up_retired(absent)
        return CasBasis(absent, -1, 0, retired_version)

    async def lock_for_write(
        self,
        key: str,
        timeout: float,
        expected: CasBasis | None = None,
        *,
        intent: bool = True,
        mark: bool = False,
        wanted: Callable[[], bool] = lambda: True,
    ) -> tuple[WriteLock, int]:
        """Take ``key``'s write lock with its intent bump (see ``lock``); also a token for :meth:`check_lock`.

        The token is the state generation from *before* the request: any
        session state change since then (which may mean the ephemeral lock
        node is gone) makes :meth:`check_lock` fail.  Raises ``LockTimeout``,
        ``VersionConflict`` (the key moved since ``expected`` was read) or
        ``CoordinationError`` (the lock may then be held: see
        :meth:`adopt_lock`).
        """
        self.require_writable()
        generation = self.state_generation
        lock = await acquire_write_lock(
            self.zk, self.layout, key, self.member_id, timeout, expected, intent=intent, mark=mark, wanted=wanted
        )
        return lock, generation

    async def invalidate(self, key: str) -> int:
        """Bump ``key``'s version (keeping a live writer's intent): see ``operations.invalidate_key``."""
        return await invalidate_key(self.zk, self.layout, key, self.member_id)

    def adopt_lock(self, key: str, session: int | None, *, intent: bool = True, mark: bool = False) -> WriteLock:
        """``key``'s lock as this session may hold it after a lock transaction of unknown outcome.

        ``intent`` and ``mark``: what that transaction would have done (``lock_for_write``).
        """
        layout = self.layout
        return WriteLock(
            self.zk,
            layout.lock_path(key),
            layout.version_path(key),
            intent_version=None,
            session=session,
            marker_path=layout.uncertain_path(key) if mark else None,
            marker=UNKNOWN if mark else None,
            sets_intent=intent,
        )

    def check_lock(self, generation: int) -> None:
        """Raise unless the session is writable and unchanged since ``generation``.

        Without fencing tokens at the origin this narrows, but cannot close,
        the window in which a lock lost to session expiry is still used.
        """
        if generation != self.state_generation or not self.writable:
            raise CoordinationError("the ZooKeeper session moved while holding the lock; nothing was written")

    async def publish(self, keys: list[str], prefixes: list[str], everything: bool) -> InvalidationReceipt:
        """Publish a fleet-wide invalidation (see ``operations.publish_invalidation``)."""
        self.require_writable()
        return await publish_invalidation(
            self.zk, self.layout, keys=keys, prefixes=prefixes, everything=everything, by=self.member_id
        )

    def describe_state(self) -> str:
        """One line for operators: why the sidecar is or is not ready."""
        if self.ready and self.silence() > self.lease:
            return f"no answer from ZooKeeper for {self.silence():.1f}s (lease {self.lease:g}s)"
        if self.ready:
            return "ZooKeeper session connected"
        if self.state is ZkState.CONNECTED and self._setup_error:
            return f"ZooKeeper session connected; setting up failed: {self._setup_error}"
        if self.state is ZkState.CONNECTED:
            return "ZooKeeper session connected; arming namespace watches"
        if self.connect_problem:
            return f"ZooKeeper session is {self.state.value}: {self.connect_problem}"
        return f"ZooKeeper session is {self.state.value}"

    async def await_acknowledgement(self, zxid: int, timeout: float) -> Acknowledgement:
        """Wait until every live member applied everything up to ``zxid`` (bounded)."""
        self.require_usable()
        return await await_acknowledgement(self.zk, self.layout, zxid, timeout)

    def require_usable(self, purpose: str = "") -> None:
        """Raise :class:`NotConnected` (saying why, and for what) unless :attr:`usable`."""
        if not self.usable:
            state = self.describe_state()
            raise NotConnected(f"{purpose}: {state}" if purpose else state)

    def require_writable(self, purpose: str = "") -> None:
        """Raise :class:`NotConnected` (saying why, and for what) unless :attr:`writable`."""
        if not self.writable:
            state = self.describe_state()
            raise NotConnected(f"{purpose}: {state}" if purpose else state)

    # -- watches (kazoo threads -> loop) ------------------------------------
    def _version_watch(self, event: WatchedEvent) -> None:
        # kazoo thread. EventType.NONE (path None) is kazoo dropping watches on
        # SUSPENDED/LOST: the state listener handles that, not the key.
        if event.type != EventType.NONE and event.path:
            bridge.post(self.zk.loop, self._on_version_event, event.path, time.monotonic())

    def _on_version_event(self, path: str, arrived: float) -> None:
        key = self.layout.key_of_version_path(path)
        if key is not None:
            self.key_watches.fired(key)  # first: dropping the entry must not remove a watch that is gone
            self._events.key_changed(key)
            self.key_events.record(arrived, time.monotonic())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._rearm_tasks.add(task)
        task.add_done_callback(self._rearm_done)

    def _rearm_done(self, task: asyncio.Task[None]) -> None:
        self._rearm_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A namespace watch may be missing: stop serving from the cache and
        # set the session up again with the baselines kept, which applies
        # whatever was missed and revalidates every entry. The cache itself
        # is still coherent up to the failure: flushing it would throw away
        # what revalidation exists to keep.
        log.warning("re-arming a namespace watch failed (%s); not ready until re-armed", task.exception())
        self._not_ready()
        # A prefix invalidation may have arrived that we could not read: no
        # grace for what we cache until the setup below has applied it.
        self.unwatched_since = float("-inf")
        # A setup under way may have read the namespace before the failed
        # re-arm's change: start it over, or it could turn ready without it.
        if self._setup_task is not None:
            self._setup_task.cancel()
        self._setup_task = asyncio.ensure_future(self._retry_setup())

    def _history_went_back(self, reason: str | None) -> None:
        # Flushed (by the namespace, or here with `reason`): nothing to restore,
        # and our applied zxid belongs to the other history too.
        if reason is not None:
            self.namespace.rebase(reason)
        self._restore_zxid = None
        self.membership.applied_zxid = 0

    def _not_ready(self) -> None:
        self.ready = False
        if self.unwatched_since is None:
            # Watches are trusted only while ZooKeeper answered within the
            # lease (see `usable`): a loss noticed late (a frozen process, a
            # stalled loop) began no later than that, and the grace with it.
            self.unwatched_since = min(time.monotonic(), self.zk.last_heard + self.lease)

    # -- session states -----------------------------------------------------
    def _on_state(self, state: ZkState) -> None:
        # On the loop (ZkSession posts it). Order matters: fills are voided
        # before anything else can run.
        self.state_generation += 1
        self.election.state_changed(state)
        self._not_ready()
        if state is ZkState.CONNECTED:
            self.connect_problem = None
            self.key_watches.connected()
        else:
            self.key_watches.connection_lost()  # before any flush below reports vacated keys
            if self._restore_zxid is None:
                self._restore_zxid = self.zk.loss_zxid
        if self._setup_task is not None:
            self._setup_task.cancel()
            self._setup_task = None
        if state is ZkState.LOST:
            # The cache is kept for the new session to restore, but no grace
            # any more: the session may have died long before we heard of it
            # (a frozen process), and writes acknowledged since never waited for us.
            self.unwatched_since = float("-inf")
        self._events.state_changed(state)
        if state is ZkState.CONNECTED:
            self._setup_task = asyncio.ensure_future(self._setup_session())

    async def _setup_session(self) -> None:
        try:
            await ensure_layout(self.zk, self.layout)
            new_session = self.zk.session_id != self._session_id
            if not self._was_connected:
                # The first session: nothing is cached, and what the epoch and
                # the prefix log say now is the baseline.
                self.namespace.new_session()
            elif new_session and self._restore_zxid is not None and self.zk.client.last_zxid < self._restore_zxid:
                # A new session (kazoo connects it with no zxid seen) answered
                # from a history older than what we saw: restored from a
                # backup, or a lagging server. Nothing kept can be trusted.
                self._history_went_back("ZooKeeper answers from before what this sidecar saw")
            # A later connection, in this session or a new one (after LOST):
            # the baselines stay, so an invalidate-all or prefix entries
            # published while we were away are applied here.
            if await self.namespace.arm(new_session=new_session and self._was_connected):
                self._history_went_back(None)
            # Live settings first read (or read again after a loss) before serving.
            await self.live_config.arm()
            ackreq = await self.membership.watch_requests()
            if self._was_connected:
                # kazoo dropped every watch with the connection and does not
                # restore them: hand them back before serving.  ZooKeeper
                # checks them against the zxid, not the session, so a new
                # session keeps the unchanged entries too.
                await self._events.restore(self.restore_watches)
            # Prefix-log re-reads that events during the setup started must be
            # applied before we confirm anything (kazoo's ordering makes them
            # land first anyway; this does not depend on it).
            await self.namespace.wait_idle(self._rearm_tasks)
            # Empty or just restored, with every watch armed: everything up
            # to the ackreq version read above is applied.
            await self.membership.register(applied=ackreq)
            # register is a write: a server that was behind has caught up to
            # it, and sent the events that owed us before its reply.
            await self.zk.drain_events()
            self._session_id = self.zk.session_id
            if new_session:
                self.sessions += 1
            self._was_connected = True
            self.ready = True
            self.unwatched_since = None
            self._restore_zxid = None
            self._setup_error = None
            log.info("ready: member %s in %s", self.member_id, self.layout.root)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("session setup failed (%s); retrying", exc)
            self._setup_error = str(exc)
            self._setup_task = asyncio.ensure_future(self._retry_setup())

    async def _retry_setup(self) -> None:
        await asyncio.sleep(0.5)
        if self.state is ZkState.CONNECTED and not self.ready:
            await self._setup_session()
