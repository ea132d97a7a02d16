"""A persistent recursive watch (ZooKeeper 3.6+ ``addWatch``), which kazoo 2.11 lacks.

Built like :mod:`.kazoo_watches` (whose :func:`check_kazoo` guards the same
kazoo internals): the request goes through kazoo's ordinary queue
(``KazooClient._call``), and kazoo's registry is changed in ``serialize()``,
on kazoo's connection thread, before the server can fire anything for the
watch.  ``cachectl watch`` is its one user so far; it lives here because
only ``sidecar/coordination`` imports kazoo.

* ``AddWatchRequest {ustring path; int mode}``, opcode 106; the reply body is
  an ``ErrorResponse`` (an int) that nothing reads.  Mode 1,
  ``PERSISTENT_RECURSIVE``: NodeCreated, NodeDataChanged and NodeDeleted for
  the path and every znode below it, for as long as the connection lives,
  never removed by firing.
* kazoo finds a watch's functions with ``client._data_watchers.pop(path)``
  for the znode that changed, so it would drop events for the znodes below
  the watched path.  The registry becomes a :class:`_PersistentRegistry`,
  whose ``pop`` also returns the persistent watchers of every watched
  ancestor (and keeps them).
* A persistent watch lives as long as the *connection* (kazoo sends no
  ``setWatches`` on a reconnect, and a lost session replaces the registry):
  the caller adds it again after every reconnect and says what it may have
  missed meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import int_struct, write_string

from .kazoo_watches import check_kazoo

__all__ = ["PERSISTENT_RECURSIVE", "WatchedPath", "add_watch_async", "event_kind"]

PERSISTENT_RECURSIVE = 1
Watcher = Callable[[Any], None]


class _PersistentRegistry(defaultdict[str, set[Watcher]]):
    """kazoo's ``_data_watchers`` (``defaultdict(set)``), plus watchers of whole subtrees that never fire out."""

    def __init__(self, existing: defaultdict[str, set[Watcher]]) -> None:
        super().__init__(set, existing)
        self.subtrees: dict[str, set[Watcher]] = {}

    def pop(self, path: str, *default: Any) -> Any:
        once = super().pop(path, *default) if default else super().pop(path)
        keep = [w for root, ws in self.subtrees.items() if path == root or path.startswith(root + "/") for w in ws]
        if not keep:
            return once
        return {*(once or ()), *keep}


class _AddWatch:
    type = 106

    def __init__(self, client: KazooClient, path: str, mode: int, watcher: Watcher) -> None:
        self.client = client
        self.path = path
        self.mode = mode
        self.watcher = None  # kazoo registers a request's `watcher` on success: never for this one
        self._local = watcher

    def serialize(self) -> bytes:
        # On kazoo's connection thread, just before the bytes go out.
        registry = self.client._data_watchers
        if not isinstance(registry, _PersistentRegistry):
            registry = self.client._data_watchers = _PersistentRegistry(registry)
        registry.subtrees.setdefault(self.path, set()).add(self._local)
        out: bytes = write_string(self.path) + int_struct.pack(self.mode)
        return out

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True

    def __repr__(self) -> str:
        return f"AddWatch(path={self.path!r}, mode={self.mode})"


def add_watch_async(client: KazooClient, path: str, watcher: Watcher, *, mode: int = PERSISTENT_RECURSIVE) -> Any:
    """Watch ``path`` and everything below it on this connection; returns kazoo's async result.

    ``watcher`` gets kazoo's ``WatchedEvent`` (type CREATED, CHANGED or
    DELETED; the path of the znode that changed) on kazoo's callback thread.
    """
    check_kazoo(client)
    result = client.handler.async_result()
    client._call(_AddWatch(client, _prefix_root(client.chroot, path), mode, watcher), result)
    return result


class WatchedPath:
    """What one watch event was: its kind (``CREATED``...) and the znode's path."""

    __slots__ = ("kind", "path")

    def __init__(self, kind: str, path: str) -> None:
        self.kind, self.path = kind, path


def event_kind(event: Any) -> WatchedPath:
    """The kind and path of a kazoo ``WatchedEvent``, without the caller importing kazoo."""
    return WatchedPath(str(event.type), str(event.path))
