"""Two ZooKeeper watch requests kazoo lacks: ``removeWatches`` and ``setWatches``.

This module extends kazoo at its protocol layer and depends on nothing else
in this project, so it could be offered upstream as it is.

* ``removeWatches`` (opcode 18, ZooKeeper 3.5+): drop this session's data
  (or child) watch on one path, in the server and in kazoo's registry, so a
  client holds only the watches it still needs.
* ``setWatches`` (opcode 101): after a reconnect, hand the server the
  watches this client held, with ``relativeZxid``.  For each data watch the
  server fires NodeDataChanged (or NodeDeleted) at once if the znode changed
  after that zxid; for each exist watch it fires NodeCreated if the znode
  now exists; child watches likewise; it re-registers the rest
  (``DataTree.setWatches``).  One round trip per batch restores thousands of
  watches, instead of one request per path.  The server checks paths against
  the zxid, not against the session, so it also works in a new session.

Why not as kazoo 2.3 did (pull request #305, reverted in #450): it sent
SetWatches with the special xid -8 inside the connect handshake and read the
reply synchronously, so a watch event that the server sends *before* that
reply raised "xids do not match"; and it sent data watches as exist watches
(which fire NodeCreated for every existing znode).  Here both requests go
through kazoo's ordinary request queue with ordinary xids: the server answers
them like any request (``ReplyHeader(cxid, ...)``), events read before the
reply take kazoo's normal event path, and the three watch kinds stay apart.

kazoo internals relied on (checked by :func:`check_kazoo`, and by a test
that fails loudly when they change):

* ``KazooClient._call(request, async_result)`` queues any object with
  ``type``, ``serialize()`` and ``deserialize(buffer, offset)``; the
  connection thread calls ``serialize()`` right before writing the bytes,
  and ``deserialize`` on a successful reply;
* watch functions live in ``client._data_watchers`` / ``_child_watchers``
  (``defaultdict(set)`` keyed by the chrooted path), which only the
  connection thread mutates (events pop them; SUSPENDED/LOST replace them).

So the registry is changed inside ``serialize()``, on the connection thread:
no lock is needed, and the watch functions are registered before the server
can fire anything for them on this connection.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import kazoo
from kazoo.client import KazooClient
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import int_struct, long_struct, write_string

__all__ = [
    "SET_WATCHES_BATCH_BYTES",
    "SUPPORTED_KAZOO",
    "WatcherType",
    "check_kazoo",
    "last_zxid",
    "remove_watch_async",
    "set_watches_async",
]

# The kazoo releases whose internals this module was checked against.
SUPPORTED_KAZOO = ("2.10.0", "2.11.0")
# ZooKeeper's Java client sends SetWatches in batches of at most 128 KB
# (ClientCnxn.SET_WATCHES_MAX_LENGTH); the server's jute.maxbuffer is 1 MB.
SET_WATCHES_BATCH_BYTES = 128 * 1024

Watcher = Callable[[Any], None]


class WatcherType(enum.IntEnum):
    """``Watcher.WatcherType`` in ZooKeeper's Java API."""

    CHILDREN = 1
    DATA = 2
    ANY = 3


def check_kazoo(client: KazooClient | None = None) -> None:
    """Raise ``RuntimeError`` if kazoo is not a version whose internals this module knows."""
    if kazoo.version.__version__ not in SUPPORTED_KAZOO:
        raise RuntimeError(
            f"kazoo {kazoo.version.__version__} is not one of {SUPPORTED_KAZOO}: check "
            "sidecar/coordination/kazoo_watches.py against its protocol layer before allowing it"
        )
    if client is not None:
        for name in ("_call", "_data_watchers", "_child_watchers", "chroot"):
            if not hasattr(client, name):
                raise RuntimeError(f"kazoo's KazooClient has no {name}: kazoo_watches.py needs updating")
        for name in ("_data_watchers", "_child_watchers"):
            registry = getattr(client, name)
            if not isinstance(registry, defaultdict) or registry.default_factory is not set:
                raise RuntimeError(f"kazoo's KazooClient.{name} is not a defaultdict(set)")


class _RemoveWatches:
    """``RemoveWatchesRequest {ustring path; int type}``; the reply has no body.

    Also drops ``watcher`` from kazoo's registry when the request is sent,
    so that an event racing the removal does not call it either.
    """

    type = 18

    def __init__(self, client: KazooClient, path: str, kind: WatcherType, watcher: Watcher | None) -> None:
        self.client = client
        self.path = path
        self.kind = kind
        self.watcher = None  # kazoo registers a request's `watcher` on success: never for this one
        self._local = watcher

    def serialize(self) -> bytes:
        # On kazoo's connection thread, just before the bytes go out.
        if self._local is not None:
            registries = []
            if self.kind in (WatcherType.DATA, WatcherType.ANY):
                registries.append(self.client._data_watchers)
            if self.kind in (WatcherType.CHILDREN, WatcherType.ANY):
                registries.append(self.client._child_watchers)
            for registry in registries:
                watchers = registry.get(self.path)
                if watchers is not None:
                    watchers.discard(self._local)
                    if not watchers:
                        del registry[self.path]
        out: bytes = write_string(self.path) + int_struct.pack(int(self.kind))
        return out

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True

    def __repr__(self) -> str:
        return f"RemoveWatches(path={self.path!r}, type={self.kind.name})"


def remove_watch_async(
    client: KazooClient, path: str, *, kind: WatcherType = WatcherType.DATA, watcher: Watcher | None = None
) -> Any:
    """Remove this session's ``kind`` watch on ``path``; returns kazoo's async result.

    ``watcher``: the function registered for that watch, dropped from
    kazoo's registry as the request is sent.  The result raises
    ``NoWatcherError`` if the server held no such watch (it fired already,
    or the connection that held it is gone).

    ZooKeeper keeps one watch per path and connection, whatever the number
    of calls that set it: the caller must not remove a watch that something
    else on this client still relies on.
    """
    request = _RemoveWatches(client, _prefix_root(client.chroot, path), kind, watcher)
    result = client.handler.async_result()
    client._call(request, result)
    return result


class _SetWatches:
    """``SetWatches {long relativeZxid; vector<ustring> data, exist, child}``; the reply has no body.

    Registers ``watcher`` for every path in kazoo's registry when the request
    is sent, before the server can fire anything for them.
    """

    type = 101

    def __init__(
        self,
        client: KazooClient,
        relative_zxid: int,
        data: Sequence[str],
        exist: Sequence[str],
        child: Sequence[str],
        watcher: Watcher,
        child_watcher: Watcher | None,
    ) -> None:
        self.client = client
        self.relative_zxid = relative_zxid
        self.data, self.exist, self.child = data, exist, child
        self.watcher = None  # see _RemoveWatches
        self._local = watcher
        self._child_local = child_watcher or watcher

    def serialize(self) -> bytes:
        # On kazoo's connection thread, just before the bytes go out.
        client = self.client
        for path in (*self.data, *self.exist):
            client._data_watchers[path].add(self._local)
        for path in self.child:
            client._child_watchers[path].add(self._child_local)
        out = bytearray(long_struct.pack(self.relative_zxid))
        for paths in (self.data, self.exist, self.child):
            out += int_struct.pack(len(paths))
            for path in paths:
                out += write_string(path)
        return bytes(out)

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"SetWatches(relativeZxid={self.relative_zxid}, data={len(self.data)}, "
            f"exist={len(self.exist)}, child={len(self.child)})"
        )


def _batches(
    kinds: tuple[list[str], list[str], list[str]], limit: int
) -> Iterable[tuple[list[str], list[str], list[str]]]:
    # Greedy: fill a batch with data, then exist, then child paths until the
    # next path would pass `limit` bytes (each path costs 4 + its UTF-8 bytes).
    batch: tuple[list[str], list[str], list[str]] = ([], [], [])
    size = long_struct.size + 3 * int_struct.size
    for kind, paths in enumerate(kinds):
        for path in paths:
            cost = int_struct.size + len(path.encode("utf-8"))
            if size + cost > limit and any(batch):
                yield batch
                batch, size = ([], [], []), long_struct.size + 3 * int_struct.size
            batch[kind].append(path)
            size += cost
    if any(batch):
        yield batch


def set_watches_async(
    client: KazooClient,
    relative_zxid: int,
    *,
    data: Iterable[str] = (),
    exist: Iterable[str] = (),
    child: Iterable[str] = (),
    watcher: Watcher,
    child_watcher: Watcher | None = None,
    batch_bytes: int = SET_WATCHES_BATCH_BYTES,
) -> list[Any]:
    """Restore watches after a reconnect (or in a new session): one request per batch.

    ``data``: paths that existed when watched (NodeDataChanged or NodeDeleted
    fires if the znode changed after ``relative_zxid``); ``exist``: paths
    that did not exist (NodeCreated fires if one does now); ``child``: child
    watches.  ``relative_zxid`` must be a zxid up to which every event for
    these watches was received: the zxid of the last *reply* read before the
    connection was lost (events carry no zxid).  ``watcher`` (and
    ``child_watcher``) are registered in kazoo for every path.  Returns one
    async result per batch; when each has succeeded, every event the server
    owed for its paths has been read (the server sends them before the reply).
    """
    root = client.chroot
    kinds = tuple([_prefix_root(root, p) for p in paths] for paths in (data, exist, child))
    results = []
    for batch in _batches(kinds, batch_bytes):  # type: ignore[arg-type]
        request = _SetWatches(client, relative_zxid, *batch, watcher=watcher, child_watcher=child_watcher)
        result = client.handler.async_result()
        client._call(request, result)
        results.append(result)
    return results


def last_zxid(client: KazooClient) -> int:
    """The zxid of the last reply kazoo read (``relativeZxid`` for :func:`set_watches_async`)."""
    return int(client.last_zxid)
