"""``cachectl watch``: the namespace's invalidations as they are published.

Three persistent recursive watches (:mod:`sidecar.coordination.persistent_watches`) on what every
sidecar watches: ``versions/`` (a key's version znode created or changed:
kind ``key``), ``prefixes/`` (an entry of the prefix log created: ``prefix``)
and ``epoch`` (changed: ``all``).  ZooKeeper 3.8 sends no zxid with an event,
so each is read once it arrives: the line shows the znode's version (mzxid,
as ``invalidate`` prints it) and its modification time, and what its data
says (``op``, ``by``; an empty version znode is a write's ``intent``).  Two
changes of one key in quick succession may show as one line, with the later
version.

A persistent watch lives as long as the connection: after a reconnect the
watches are added again; the prefix log and the epoch are read to show what
was published meanwhile, keys cannot be (a notice on stderr says so).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click

from sidecar import bridge
from sidecar.coordination import Layout, ZkSession, ZkState
from sidecar.coordination.persistent_watches import WatchedPath, add_watch_async, event_kind

__all__ = ["Event", "Watch"]

_SEEN_PATHS = 10_000  # versions remembered per key path, to drop repeats


@dataclass
class Event:
    """One invalidation, as printed."""

    kind: str  # key, prefix or all
    target: str | None  # the key or the prefix
    version: int
    mtime_ms: int
    note: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None

    @property
    def time(self) -> str:
        """The znode's modification time (ZooKeeper's clock), ISO 8601 in UTC."""
        return datetime.fromtimestamp(self.mtime_ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` line."""
        body: dict[str, Any] = {"time": self.time, "kind": self.kind}
        if self.kind != "all":
            body[self.kind] = self.target
        body["version"] = self.version
        if self.seq is not None:
            body["seq"] = self.seq
        body.update({k: v for k, v in self.note.items() if k in ("op", "by")})
        return body

    def as_text(self) -> str:
        """The line without ``--json``."""
        what = "" if self.kind == "all" else f" {self.target}"
        note = ", ".join(f"{k} {v}" for k, v in self.note.items() if k in ("op", "by"))
        return f"{self.time} {self.kind:<6}{what} version {self.version}" + (f" ({note})" if note else "")


def _note(data: bytes) -> dict[str, Any]:
    if not data:
        return {"op": "intent"}
    try:
        note = json.loads(data)
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


class Watch:
    """Print the namespace's invalidations until ``count`` lines, ``seconds``, or a signal."""

    def __init__(self, layout: Layout, emit: Callable[[Event], None], *, count: int | None, seconds: float | None):
        self.layout = layout
        self.emit = emit
        self.count = count
        self.seconds = seconds
        self.printed = 0
        self.queue: asyncio.Queue[WatchedPath | str] = asyncio.Queue()
        self.stopped = asyncio.Event()
        self.key_versions: OrderedDict[str, int] = OrderedDict()
        self.prefix_seq = -1
        self.epoch_version = 0
        self.lost_at: float | None = None
        self.zk: ZkSession | None = None
        self.ended = False  # closing the session is no connection loss to report

    # -- on the loop, from kazoo's threads -------------------------------------
    def on_state(self, state: ZkState) -> None:
        """ZkSession's state callback: a reconnect re-arms the watches."""
        if self.ended:
            return
        if state is ZkState.CONNECTED:
            if self.lost_at is not None:
                self.queue.put_nowait("rearm")
        elif self.lost_at is None:
            self.lost_at = asyncio.get_running_loop().time()
            click.echo("cachectl: watch: lost the connection to ZooKeeper; reconnecting", err=True)

    def _on_event(self, event: Any) -> None:
        # kazoo's callback thread: hand it to the loop, in order.
        assert self.zk is not None
        bridge.post(self.zk.loop, self.queue.put_nowait, event_kind(event))

    # -- the watch ---------------------------------------------------------------
    async def _arm(self, zk: ZkSession) -> None:
        for path in (self.layout.versions, self.layout.prefixes, self.layout.epoch):
            await zk.call(add_watch_async(zk.client, path, self._on_event), "addWatch")

    async def _positions(self, zk: ZkSession) -> tuple[int, list[tuple[int, str]], Any]:
        names = await zk.get_children(self.layout.prefixes)
        entries = sorted(p for name in names if (p := self.layout.parse_prefix_entry(name)) is not None)
        return max((seq for seq, _ in entries), default=-1), entries, await zk.exists(self.layout.epoch)

    async def run(self, zk: ZkSession) -> None:
        """Arm the watches, say so on stderr, then print events until told to stop."""
        self.zk = zk
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopped.set)
        try:
            await self._arm(zk)
            # Positions after arming: anything published after them arrives as an event.
            self.prefix_seq, _, epoch = await self._positions(zk)
            self.epoch_version = int(epoch.mzxid) if epoch is not None else 0
            click.echo(f"cachectl: watching {self.layout.root} (keys, prefixes, all); Ctrl-C stops", err=True)
            worker = asyncio.ensure_future(self._work(zk))
            stop = asyncio.ensure_future(self.stopped.wait())
            try:
                await asyncio.wait({worker, stop}, timeout=self.seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                worker.cancel()
                stop.cancel()
            if worker.done() and not worker.cancelled():
                worker.result()  # its error, if it failed
        finally:
            self.ended = True
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _work(self, zk: ZkSession) -> None:
        while self.count is None or self.printed < self.count:
            item = await self.queue.get()
            if item == "rearm":
                await self._rearm(zk)
            elif isinstance(item, WatchedPath):
                event = await self._read(zk, item)
                if event is not None:
                    self._print(event)

    def _print(self, event: Event) -> None:
        if self.count is not None and self.printed >= self.count:
            return
        self.emit(event)
        self.printed += 1

    async def _rearm(self, zk: ZkSession) -> None:
        gone = asyncio.get_running_loop().time() - (self.lost_at or 0.0)
        self.lost_at = None
        await self._arm(zk)
        _, entries, epoch = await self._positions(zk)
        missed = [await self._prefix_event(zk, seq, prefix) for seq, prefix in entries if seq > self.prefix_seq]
        for event in missed:
            if event is not None:
                self._print(event)
        if epoch is not None and int(epoch.mzxid) > self.epoch_version:
            event = await self._read_epoch(zk)
            if event is not None:
                self._print(event)
        click.echo(
            f"cachectl: watch: reconnected after {gone:.1f}s; prefixes and all published meanwhile are shown "
            "above, keys invalidated meanwhile are not",
            err=True,
        )

    async def _read(self, zk: ZkSession, item: WatchedPath) -> Event | None:
        layout = self.layout
        if item.kind == "DELETED":
            return None  # a version znode retired, a prefix entry trimmed: not an invalidation
        if item.path == layout.epoch:
            return await self._read_epoch(zk)
        if item.path.startswith(layout.prefixes + "/") and item.kind == "CREATED":
            parsed = layout.parse_prefix_entry(item.path.rpartition("/")[2])
            return None if parsed is None else await self._prefix_event(zk, *parsed)
        key = layout.key_of_version_path(item.path) if item.path.startswith(layout.versions + "/") else None
        if key is None:
            return None
        found = await _get(zk, item.path)
        if found is None:
            return None
        data, stat = found
        version = int(stat.mzxid)
        if self.key_versions.get(item.path, -1) >= version:
            return None  # already shown: two changes read as one
        self.key_versions[item.path] = version
        self.key_versions.move_to_end(item.path)
        if len(self.key_versions) > _SEEN_PATHS:
            self.key_versions.popitem(last=False)
        return Event("key", key, version, int(stat.mtime), _note(data))

    async def _prefix_event(self, zk: ZkSession, seq: int, prefix: str) -> Event | None:
        if seq <= self.prefix_seq:
            return None
        self.prefix_seq = seq
        found = await _get(zk, f"{self.layout.prefix_entry_base(prefix)}{seq:010d}")
        if found is None:
            return None  # trimmed already
        data, stat = found
        return Event("prefix", prefix, int(stat.mzxid), int(stat.mtime), _note(data), seq=seq)

    async def _read_epoch(self, zk: ZkSession) -> Event | None:
        found = await _get(zk, self.layout.epoch)
        if found is None:
            return None
        data, stat = found
        if int(stat.mzxid) <= self.epoch_version or data == b"0":
            return None  # shown already, or the namespace's creation
        self.epoch_version = int(stat.mzxid)
        return Event("all", None, int(stat.mzxid), int(stat.mtime), _note(data))


async def _get(zk: ZkSession, path: str) -> tuple[bytes, Any] | None:
    try:
        return await zk.get(path)
    except Exception as exc:  # NoNodeError, without importing kazoo here
        if type(exc).__name__ == "NoNodeError":
            return None
        raise
