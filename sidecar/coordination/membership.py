"""Membership and acknowledgements: who is in the fleet, and what each has applied.

Every sidecar keeps an ephemeral znode under ``members/`` (JSON: id, address,
start time, version, origin, session, and ``applied_zxid``).  ``cachectl
invalidate --wait`` and ``POST /v1/invalidate?wait=true`` bump ``ackreq``;
every sidecar watches it and answers by writing into its member znode the
zxid up to which it has applied every invalidation.  The waiter polls the
members (``operations.await_acknowledgement``).

An acknowledgement waits only for the namespace re-arms in flight (the
prefix-log re-reads that events up to that zxid started), never for another
acknowledgement: two of them waiting on each other deadlocked.  A failed
acknowledgement leaves this sidecar named as "not confirmed"; it costs
nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType, WatchedEvent

from .. import bridge
from ..errors import CoordinationError
from .layout import LAYOUT_NAME, Layout
from .session import ZkSession, ZnodeStat

__all__ = ["Membership"]

log = logging.getLogger(__name__)


class Membership:
    """This sidecar's member znode and its answers to acknowledgement requests (the loop only)."""

    def __init__(
        self,
        zk: ZkSession,
        layout: Layout,
        member_id: str,
        info: dict[str, Any],
        *,
        ready: Callable[[], bool],
        rearms: set[asyncio.Task[None]],
    ) -> None:
        self._zk = zk
        self._layout = layout
        self.member_id = member_id
        self._info = info
        self._ready = ready  # serving from a trusted cache: only then confirm
        self._rearms = rearms  # the coordinator's namespace re-arm tasks
        self._tasks: set[asyncio.Task[None]] = set()
        self.applied_zxid = 0  # published in our member znode

    async def watch_requests(self) -> ZnodeStat | None:
        """Watch ``ackreq``; its stat now (the setup confirms up to it)."""
        return await self._zk.exists(self._layout.ackreq, watch=self._request_watch)

    def stop(self) -> None:
        """Cancel acknowledgements in flight."""
        for task in self._tasks:
            task.cancel()

    def _request_watch(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            bridge.post(self._zk.loop, self._spawn)

    def _spawn(self) -> None:
        task = asyncio.ensure_future(self._acknowledge())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The waiter names us as not confirmed; the cache is as good as before.
            log.warning("acknowledging an invalidation failed: %s", task.exception())

    async def _acknowledge(self) -> None:
        """Publish in our member znode the zxid up to which we applied every invalidation.

        The ``exists`` answer (mzxid Z) was sent by ZooKeeper after every
        notification for changes up to Z on this connection; once those events
        are on the loop (``drain_events``) and the prefix-log re-reads they
        started have finished, everything up to Z is applied.  Only re-arm
        tasks are waited for: other acknowledgements are not, or two of them
        would wait for each other.
        """
        stat = await self._zk.exists(self._layout.ackreq, watch=self._request_watch)
        applied = int(stat.mzxid) if stat else 0
        await self._zk.drain_events()
        if self._rearms:
            await asyncio.wait(list(self._rearms))
        if not self._ready():
            return  # not serving from a trusted cache: do not confirm
        self.applied_zxid = max(self.applied_zxid, applied)
        try:
            await self._zk.set(self._layout.member_path(self.member_id), self._member_data())
        except NoNodeError:
            pass  # registration (with the current value) is under way

    def _member_data(self) -> bytes:
        return orjson.dumps(
            dict(
                self._info,
                session=f"0x{self._zk.session_id or 0:x}",
                applied_zxid=self.applied_zxid,
                layout=LAYOUT_NAME.decode(),  # a sidecar of another layout refuses the namespace (ensure_layout)
            )
        )

    async def register(self, applied: ZnodeStat | None) -> None:
        """Create (or take over) our ephemeral member znode, confirming everything up to ``applied``.

        Called by a session setup once the cache is empty or revalidated with
        every watch armed: everything up to the ``ackreq`` version read then
        (``applied``, from :meth:`watch_requests`) is applied.
        """
        self.applied_zxid = max(self.applied_zxid, int(applied.mzxid) if applied else 0)
        path = self._layout.member_path(self.member_id)
        data = self._member_data()
        for _ in range(3):
            try:
                await self._zk.create(path, data, ephemeral=True)
                return
            except NodeExistsError:
                stat = await self._zk.exists(path)
                if stat is not None and stat.ephemeralOwner == self._zk.session_id:
                    await self._zk.set(path, data)  # ours: refresh applied_zxid
                    return
                # A previous life of this member id (a restarted pod) whose
                # session has not expired yet: take the name over.
                log.warning(
                    "member %s exists from session 0x%x; replacing it",
                    self.member_id,
                    stat.ephemeralOwner if stat else 0,
                )
                try:
                    await self._zk.delete(path)
                except NoNodeError:
                    pass
        raise CoordinationError(f"could not register member {self.member_id}")
