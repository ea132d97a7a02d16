"""The namespace's config znode, watched: settings changed at run time (``cachectl config``).

``<namespace>/config`` holds a JSON object of live settings (see
``config.LIVE_SETTINGS``).  Every sidecar watches it (an ``exists`` watch
while it is absent, which fires on its creation) and hands each version it
reads to the service, which checks it as a whole and applies it or keeps its
settings (``service.CacheService.apply_live_config``).  Reads are serialized,
so a version is never applied after a newer one.  A reconnect reads it again
(the session setup re-arms it), so a change made while a sidecar was away
reaches it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType, WatchedEvent

from .. import bridge
from .session import ZkSession

__all__ = ["ConfigWatch"]

# (data, version): data None when the znode does not exist; version is its mzxid (0 if absent).
ConfigListener = Callable[[bytes | None, int], None]


class ConfigWatch:
    """One sidecar's watch on its namespace's config znode."""

    def __init__(self, zk: ZkSession, path: str, spawn: Callable[[object], None]) -> None:
        self._zk = zk
        self.path = path
        self._spawn = spawn  # re-arms run as coordinator tasks: a failure sets the session up again
        self._serial = asyncio.Lock()
        self.listener: ConfigListener = _ignore

    def _watch(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            bridge.post(self._zk.loop, self._rearm)

    def _rearm(self) -> None:
        self._spawn(self.arm())

    async def arm(self) -> None:
        """Read the znode with a watch set and hand what it holds to the listener."""
        async with self._serial:
            stat = await self._zk.exists(self.path, watch=self._watch)
            data: bytes | None = None
            version = 0
            if stat is not None:
                try:
                    data, stat = await self._zk.get(self.path, watch=self._watch)
                    version = int(stat.mzxid)
                except NoNodeError:  # deleted in between: the exists watch above reports it
                    data = None
            self.listener(data, version)


def _ignore(data: bytes | None, version: int) -> None:
    pass
