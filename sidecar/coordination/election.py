"""Electing one housekeeper per namespace: sequential ephemeral znodes.

Each sidecar keeps one candidate znode ``leader/c-<token>-<seq>`` (ephemeral,
sequential).  The lowest sequence leads; every other candidate watches only
the candidate just before it, so a leader's death wakes one sidecar, not the
whole fleet (ZooKeeper's recipe; Curator's LeaderLatch).  Everything runs on
the event loop: waiting is a watch posted to an :class:`asyncio.Event`, never
a blocked thread (kazoo's ``Election`` blocks one).

When does this sidecar lead?  Only while the session that created its
candidate is connected *and* a listing on the current connection showed its
candidate first.  Any connection loss stops it at once (``state_changed``),
and it resumes only after listing again: a partitioned leader may have been
replaced while it could not hear.

That is not enough on its own: a round already under way can still send a
request after the session expired (kazoo queues requests while it
reconnects and sends them on whatever session comes next).  So every write
a housekeeper makes is a transaction that starts with :meth:`Election.fence`:
``check`` on its own candidate znode.  A candidate exists only while its
session lives and no lower sequence can ever be created again, so the check
passes only for the current leader, in ZooKeeper's own order of operations.

The token in the candidate's name makes the create idempotent across a lost
reply (Curator's "protected" mode): after a connection error the next step
looks for a child with the token before creating another one, so a sidecar
never stands twice and blocks the fleet behind a candidate it does not know.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType, WatchedEvent

from .. import bridge
from ..errors import CoordinationError, ZkAccessDenied
from .layout import Layout
from .session import ZkSession, ZkState

__all__ = ["Election", "NotLeader", "current_leader", "sequence_of"]

log = logging.getLogger(__name__)


class NotLeader(CoordinationError):
    """This sidecar does not lead (any more): a fenced transaction was refused."""


def sequence_of(name: str) -> int:
    """The sequence number ZooKeeper appended to a candidate's name (-1 if foreign)."""
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def _candidates(names: list[str]) -> list[str]:
    return sorted((n for n in names if n.startswith("c-") and sequence_of(n) >= 0), key=sequence_of)


async def current_leader(zk: ZkSession, layout: Layout) -> dict[str, Any] | None:
    """The leading candidate's data (``member_id``, ``session``, ``node``), or ``None`` if nobody stands."""
    try:
        names = _candidates(await zk.get_children(layout.leader))
    except NoNodeError:
        return None
    for name in names:
        try:
            data, stat = await zk.get(f"{layout.leader}/{name}")
        except NoNodeError:
            continue  # left while we listed: the next one leads
        try:
            info = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            info = {}
        info["node"] = name
        info["session"] = f"0x{stat.ephemeralOwner:x}"
        return info
    return None


class Election:
    """This sidecar's candidacy in its namespace's election (the loop only)."""

    def __init__(self, zk: ZkSession, layout: Layout, member_id: str) -> None:
        self._zk = zk
        self._layout = layout
        self._member_id = member_id
        self.node: str | None = None  # our candidate's path
        self._node_session: int | None = None  # the session that created it
        self._token = ""  # the name part of a create whose reply may be lost
        self._verified: str | None = None  # our candidate that a listing on this connection showed first
        self._announced = False  # `leading` as last announced (log, waiters, terms)
        self._wake = asyncio.Event()
        self._leading_changed = asyncio.Event()
        self.terms = 0  # times this sidecar became leader
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        """True while this sidecar leads, as far as it can know (writes are fenced anyway)."""
        return (
            self._verified is not None
            and self._verified == self.node
            and self._zk.state is ZkState.CONNECTED
            and self._zk.session_id == self._node_session
        )

    def fence(self, transaction: Any) -> None:
        """Make ``transaction`` fail unless this sidecar still leads: add it as the first operation.

        The check is on the candidate that a listing showed first, never on
        a newer one of ours (after an operator deleted the old one, another
        sidecar may lead while our new candidate exists).  Raises
        :class:`NotLeader` at once if this sidecar knows it does not lead.
        """
        verified = self._verified
        if verified is None or not self.leading:
            raise NotLeader("this sidecar does not lead its namespace")
        transaction.check(verified, -1)  # -1: any version; fails once the znode is gone

    def start(self) -> None:
        """Stand for election in the background (for as long as the sidecar runs)."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop standing; the candidate goes with the session when it closes."""
        self._set_verified(False)
        if self._task is not None:
            await bridge.cancel_and_wait(self._task)

    def state_changed(self, state: ZkState) -> None:
        """The session's state moved (on the loop): stop leading until a new listing shows us first."""
        if state is ZkState.LOST:
            self.node = None  # expired with the session
        self._set_verified(False)
        self._wake.set()

    async def wait_leading(self) -> None:
        """Return once this sidecar leads."""
        while not self.leading:
            self._leading_changed.clear()
            await self._leading_changed.wait()

    async def wait_not_leading(self) -> None:
        """Return once this sidecar no longer leads."""
        while self.leading:
            self._leading_changed.clear()
            await self._leading_changed.wait()

    def _set_verified(self, verified: bool) -> None:
        # Compared with what was last announced, not with `leading` before the
        # call: by the time a loss reaches us the session's state has moved.
        self._verified = self.node if verified else None
        now = self.leading
        if now != self._announced:
            self._announced = now
            if now:
                self.terms += 1
                log.info("leading namespace %s as %s", self._layout.root, self.node)
            else:
                log.info("no longer leading namespace %s", self._layout.root)
            self._leading_changed.set()

    # -- the candidate's loop -----------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._zk.wait_connected(3600)
                self._wake.clear()
                await self._step()
            except asyncio.CancelledError:
                raise
            except ZkAccessDenied as exc:
                log.error("election: %s", exc)
                await asyncio.sleep(5)
            except Exception as exc:  # connection trouble: look again on the next connection
                log.debug("election step failed: %s", exc)
                self._set_verified(False)
                await asyncio.sleep(0.2)

    async def _step(self) -> None:
        session = self._zk.session_id
        if session is None:
            return
        if self.node is not None and self._node_session != session:
            self.node = None  # a candidate of an expired session: gone, or about to be
            self._set_verified(False)
        names = _candidates(await self._zk.get_children(self._layout.leader))
        if self.node is None:
            self._set_verified(False)
            self.node = await self._adopt_or_create(names, session)
            names = _candidates(await self._zk.get_children(self._layout.leader))
        ours = self.node.rpartition("/")[2]
        if ours not in names:
            self.node = None  # deleted under us (by an operator, or expiry): stand again
            self._set_verified(False)
            return
        index = names.index(ours)
        if index == 0:
            # First on this connection: lead until the connection drops or our
            # candidate goes (the watch on it says so).
            if await self._zk.exists(self.node, watch=self._watch) is None:
                self.node = None
                self._set_verified(False)
                return
            self._set_verified(True)
        else:
            self._set_verified(False)
            predecessor = f"{self._layout.leader}/{names[index - 1]}"
            if await self._zk.exists(predecessor, watch=self._watch) is None:
                return  # gone meanwhile: list again now
        await self._wake.wait()

    async def _adopt_or_create(self, names: list[str], session: int) -> str:
        if self._token:
            # A create of ours may have landed without its reply reaching us.
            for name in names:
                if name.startswith(f"c-{self._token}-"):
                    path = f"{self._layout.leader}/{name}"
                    stat = await self._zk.exists(path)
                    if stat is not None and stat.ephemeralOwner == session:
                        self._node_session = session
                        return path
        self._token = uuid.uuid4().hex[:16]
        data = orjson.dumps({"member_id": self._member_id, "session": f"0x{session:x}"})
        path, _ = await self._zk.create(
            f"{self._layout.leader}/c-{self._token}-", data, ephemeral=True, sequence=True, makepath=True
        )
        self._node_session = session
        return path

    def _watch(self, event: WatchedEvent) -> None:
        # kazoo's thread: our candidate or our predecessor changed (or the
        # connection dropped, which state_changed handles too).
        if event.type in (EventType.DELETED, EventType.NONE, EventType.CHANGED, EventType.CREATED):
            bridge.post(self._zk.loop, self._wake.set)
