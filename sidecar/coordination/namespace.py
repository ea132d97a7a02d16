"""Namespace-wide invalidations: the epoch (invalidate-all) and the prefix log.

Key invalidations move a key's own version znode; these two do not, so a
reader that compares only the key's version (a lease, a strong read) cannot
see them.  This module keeps what this sidecar has *applied* of both, as
zxids, so that any check of a key can include them:

* :class:`InvalidationFloor` answers "the zxid of the newest epoch or prefix
  invalidation covering this key that was applied here": a lease is
  ``max(key version, floor)``, and any covering invalidation moves it;
* :class:`PrefixLog` turns successive reads of ``prefixes/`` into the entries
  that are new since the last read, and tells when entries were created and
  trimmed away unseen in between (then only a flush is safe);
* :class:`NamespaceWatches` arms the watches, applies what they report through
  the coordinator's :class:`~sidecar.coordination.coordinator.Events`, and
  catches up on demand (:meth:`NamespaceWatches.catch_up`) when a strong read
  or a fill saw ZooKeeper ahead of what was applied.

Pure classes first (no I/O; unit-tested in ``tests/test_namespace.py``), the
watcher last.  Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kazoo.protocol.states import EventType, WatchedEvent

from .. import bridge
from .housekeeping import absent_version
from .layout import Layout
from .session import ZkSession

__all__ = ["InvalidationFloor", "NamespaceWatches", "PrefixLog", "PrefixLogAdvance"]

log = logging.getLogger(__name__)

# Distinct prefixes remembered with their zxid; past this the oldest half is
# folded into one floor that covers every key (conservative: leases and fills
# that would have been fine are refused once, never the other way round).
_MAX_PREFIXES = 4096


class InvalidationFloor:
    """Zxids of the namespace invalidations applied here, per covered key.

    Not safe for concurrent access: the loop only.
    """

    def __init__(self, max_prefixes: int = _MAX_PREFIXES) -> None:
        self._max = max_prefixes
        self.reset()

    def reset(self) -> None:
        """Forget every zxid (ZooKeeper's history went back: they belong to another one)."""
        self.epoch = 0
        self._everything = 0  # folded prefixes: covers every key
        self._prefixes: dict[str, int] = {}

    def apply_epoch(self, zxid: int) -> None:
        """An invalidate-all at ``zxid`` was applied."""
        self.epoch = max(self.epoch, zxid)

    def apply_prefixes(self, prefixes: Iterable[str], zxid: int) -> None:
        """Prefix invalidations read at ``zxid`` (an upper bound of their own zxids) were applied."""
        for prefix in prefixes:
            self._prefixes.pop(prefix, None)  # re-insert: dict order is age order
            self._prefixes[prefix] = max(zxid, self._prefixes.get(prefix, 0))
        if len(self._prefixes) > self._max:
            doomed = list(self._prefixes)[: len(self._prefixes) // 2]
            for prefix in doomed:
                self._everything = max(self._everything, self._prefixes.pop(prefix))

    def floor(self, key: str) -> int:
        """The newest applied namespace invalidation covering ``key`` (0: none)."""
        newest = max(self.epoch, self._everything)
        for prefix, zxid in self._prefixes.items():
            if zxid > newest and key.startswith(prefix):
                newest = zxid
        return newest


@dataclass(frozen=True, slots=True)
class PrefixLogAdvance:
    """What a new read of the prefix log adds to the previous one."""

    prefixes: list[str] = field(default_factory=list)  # new entries, oldest first
    gap: bool = False  # entries were created and trimmed unseen: flush
    stale: bool = False  # this read is older than one already applied: ignore it


class PrefixLog:
    """The last read of ``prefixes/``, and what each new read adds to it.

    ZooKeeper counts every child created or deleted in the parent's
    ``cversion``.  Between two reads, entries created and still there (``f``),
    entries seen before and now gone (``o``) and entries created *and* trimmed
    in between (``x``, invisible) add up to ``f + o + 2x``; ``x > 0`` means
    prefixes were invalidated that this sidecar can never learn: a gap.
    This needs no assumption about sequence numbers or about who trims.
    """

    def __init__(self) -> None:
        self._names: frozenset[str] | None = None
        self._cversion = -1
        self.pzxid = 0  # the parent's pzxid at the last read applied

    @property
    def has_baseline(self) -> bool:
        """True once a read was taken as the baseline."""
        return self._names is not None

    def reset(self) -> None:
        """Forget the baseline (a new session: the cache is empty anyway)."""
        self._names, self._cversion, self.pzxid = None, -1, 0

    def behind(self, names: Iterable[str], cversion: int) -> bool:
        """A read older than the baseline (or of another history): :meth:`advance` would call it stale."""
        if self._names is None:
            return False
        return cversion < self._cversion or (cversion == self._cversion and frozenset(names) != self._names)

    def advance(self, names: Iterable[str], cversion: int, pzxid: int) -> PrefixLogAdvance:
        """Take a new read of the log (children's names, the parent's cversion and pzxid)."""
        current = frozenset(names)
        if self._names is None:
            self._names, self._cversion, self.pzxid = current, cversion, pzxid
            return PrefixLogAdvance()
        if self.behind(current, cversion):
            return PrefixLogAdvance(stale=True)
        fresh = current - self._names
        gone = self._names - current
        hidden = cversion - self._cversion - len(fresh) - len(gone)
        self._names, self._cversion, self.pzxid = current, cversion, max(self.pzxid, pzxid)
        entries = sorted(parsed for name in fresh if (parsed := Layout.parse_prefix_entry(name)) is not None)
        prefixes = [prefix for _, prefix in entries]
        return PrefixLogAdvance(prefixes, gap=hidden != 0)


class NamespaceEvents(Protocol):
    """What namespace invalidations do to the cache (the coordinator's Events, in part)."""

    def prefixes_invalidated(self, prefixes: list[str]) -> None: ...

    def flush(self, reason: str) -> None: ...

    def void_fills(self) -> None: ...


class NamespaceWatches:
    """The epoch and prefix-log watches of one sidecar, and what it applied of them."""

    def __init__(
        self,
        zk: ZkSession,
        layout: Layout,
        events: NamespaceEvents,
        spawn: Callable[[Any], None],
    ) -> None:
        self._zk = zk
        self._layout = layout
        self._events = events
        self._spawn = spawn  # tasks the coordinator tracks (failures handled there)
        self.floor = InvalidationFloor()
        self.prefix_log = PrefixLog()
        self._epoch_mzxid: int | None = None
        # The version of keys with no version znode, as applied here (see
        # housekeeping.py): ETags of cached absent keys are rendered with it.
        self.retired = 0

    def attach(self, events: NamespaceEvents) -> None:
        """Send what the watches report to ``events``."""
        self._events = events

    def new_session(self) -> None:
        """Nothing is cached (the first session, or a flush): what ZooKeeper says now is the baseline."""
        self._epoch_mzxid = None
        self.prefix_log.reset()

    def rebase(self, reason: str) -> None:
        """ZooKeeper's history went back (restored from an older state): flush and start over.

        The baselines, and the zxids of the floor, belong to a history the
        server no longer has: compared with the new one, they would hide
        its invalidations.
        """
        self._events.flush(reason)
        self.new_session()
        self.floor.reset()
        self.retired = 0

    async def arm(self, *, new_session: bool = False) -> bool:
        """Arm both watches, applying whatever changed since the baselines.

        ``new_session``: the first setup of a session after LOST, which may
        have reached a server whose history is older than what was applied
        here (a prefix log read behind the baseline): then :meth:`rebase`.
        Returns True if it rebased.
        """
        rebased = False
        if new_session and self._epoch_mzxid is not None:
            stat = await self._zk.exists(self._layout.epoch)
            if (int(stat.mzxid) if stat else 0) < self._epoch_mzxid:
                self.rebase("the epoch is behind what this sidecar applied: ZooKeeper's history went back")
                rebased = True
        await self.arm_epoch()
        if await self.arm_prefixes(rebase_if_behind=new_session and not rebased):
            rebased = True
            await self.arm_epoch()  # the new history's epoch: the baseline, and the floor again
        await self.arm_retired()
        return rebased

    def catch_up_retired(self, absent: int) -> None:
        """An absent version read from ZooKeeper (it only grows)."""
        self.retired = max(self.retired, absent)

    async def catch_up(self, epoch_mzxid: int, prefixes_pzxid: int, retired: int = 0) -> None:
        """Apply what ZooKeeper shows beyond what was applied here (a strong read saw it first)."""
        self.catch_up_retired(retired)
        if self._epoch_mzxid is not None and epoch_mzxid != self._epoch_mzxid:
            await self.arm_epoch()
        if prefixes_pzxid > self.prefix_log.pzxid:
            await self.arm_prefixes()

    # -- epoch --------------------------------------------------------------
    def _epoch_watch(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            bridge.post(self._zk.loop, self._on_epoch_event)

    def _on_epoch_event(self) -> None:
        self._events.flush("invalidate-all (epoch changed)")
        self._spawn(self.arm_epoch())

    async def arm_epoch(self) -> None:
        """Watch the epoch; flush if it moved since the last look."""
        stat = await self._zk.exists(self._layout.epoch, watch=self._epoch_watch)
        mzxid = int(stat.mzxid) if stat else 0
        if self._epoch_mzxid is not None and mzxid != self._epoch_mzxid:
            # After an epoch event this always holds, and the second flush is
            # deliberate: fills begun between the event and this re-arm had no
            # epoch watch to void them. It also catches a change missed while
            # the connection was down (same-session reconnect).
            self._events.flush("invalidate-all (epoch changed; watch re-armed)")
        self._epoch_mzxid = mzxid
        self.floor.apply_epoch(mzxid)

    # -- retired: the version of absent keys -----------------------------------
    def _retired_watch(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            bridge.post(self._zk.loop, self._on_retired_event)

    def _on_retired_event(self) -> None:
        self._spawn(self.arm_retired())

    async def arm_retired(self) -> None:
        """Watch ``retired``; take its absent version.

        Nothing is dropped when it moves: an entry of an absent key was
        watched all along (its ``exists`` watch fires on a creation), so only
        its ETag moves.  What a sidecar away meanwhile may have missed is
        ``Coordinator.restore_watches``'s to check.
        """
        stat = await self._zk.exists(self._layout.retired, watch=self._retired_watch)
        self.retired = max(self.retired, absent_version(stat))

    # -- prefix log ---------------------------------------------------------
    def _prefix_watch(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            bridge.post(self._zk.loop, self._on_prefix_event)

    def _on_prefix_event(self) -> None:
        # Which prefixes is known only after re-reading the log (a round
        # trip); a fill that began before the new entry must not install
        # meanwhile, so every fill in flight is voided now.
        self._events.void_fills()
        self._spawn(self.arm_prefixes())

    async def arm_prefixes(self, *, rebase_if_behind: bool = False) -> bool:
        """Watch the prefix log; apply entries new since the last read (flush on a gap).

        ``rebase_if_behind``: a read behind the baseline means another
        history (:meth:`arm`), not an older read overtaken by a newer one.
        Returns True if it rebased.
        """
        names, stat = await self._zk.get_children_stat(self._layout.prefixes, watch=self._prefix_watch)
        rebased = rebase_if_behind and self.prefix_log.behind(names, int(stat.cversion))
        if rebased:
            self.rebase("the prefix log is behind what this sidecar applied: ZooKeeper's history went back")
        first = not self.prefix_log.has_baseline
        advance = self.prefix_log.advance(names, int(stat.cversion), int(stat.pzxid))
        if first:
            # A new session's baseline: entries in it were never applied here,
            # and a lease handed out before (another session, another life of
            # this sidecar) may predate them. Refuse every such lease once.
            self.floor.apply_epoch(int(stat.pzxid))
            return rebased
        if advance.stale:
            return rebased
        if advance.gap:
            self._events.flush("prefix log entries were trimmed before this sidecar saw them")
            self.floor.apply_epoch(int(stat.pzxid))  # every key: as an invalidate-all
        elif advance.prefixes:
            self._events.prefixes_invalidated(advance.prefixes)
            self.floor.apply_prefixes(advance.prefixes, int(stat.pzxid))
        return rebased

    async def wait_idle(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        """Wait for re-arm ``tasks`` (their errors are the coordinator's to handle)."""
        pending = list(tasks)
        if pending:
            await asyncio.wait(pending)
