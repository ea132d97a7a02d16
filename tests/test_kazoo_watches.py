"""``removeWatches`` and ``setWatches`` through kazoo (``sidecar/coordination/kazoo_watches.py``).

Against a real ZooKeeper: the server's own list of watches (``wchc``) is the
judge of what a session holds, and a :class:`~harness.TcpProxy` drops the
client's connection while the session survives.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kazoo
import pytest
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NoWatcherError
from kazoo.protocol.states import Callback, EventType, WatchedEvent

from harness import LocalZooKeeper, TcpProxy
from sidecar.coordination import kazoo_watches
from sidecar.coordination.kazoo_watches import WatcherType, remove_watch_async, set_watches_async

WAIT = 10.0


class Recorder:
    """A watch function that records its events (kazoo calls it on its own thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[EventType, str]] = []
        self._cond = threading.Condition()

    def __call__(self, event: WatchedEvent) -> None:
        if event.type == EventType.NONE:
            return  # kazoo's "your watches are gone" on SUSPENDED/LOST
        with self._cond:
            self.events.append((event.type, event.path))
            self._cond.notify_all()

    def wait_for(self, count: int, what: str) -> list[tuple[EventType, str]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.events) >= count, WAIT):
                raise AssertionError(f"{what}: {len(self.events)} of {count} events within {WAIT:g}s: {self.events}")
            return list(self.events)


def delivered(client: KazooClient) -> None:
    """Return once kazoo's callback thread ran everything dispatched so far (events in order)."""
    done = threading.Event()
    client.handler.dispatch_callback(Callback("barrier", done.set, ()))
    assert done.wait(WAIT), "kazoo's callback thread did not reach the barrier"


def watched_paths(zk: LocalZooKeeper, client: KazooClient) -> set[str]:
    """The paths the server holds a watch on for ``client``'s session (``wchc``)."""
    return zk.watched_paths(client.client_id[0])


@contextlib.contextmanager
def started(hosts: str, **kw: Any) -> Iterator[KazooClient]:
    """A connected kazoo client, stopped and closed on the way out."""
    client = KazooClient(hosts=hosts, **kw)
    client.start(WAIT)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def base(zk_server: LocalZooKeeper) -> Iterator[str]:
    with started(zk_server.hosts) as admin:
        path = f"/kw-{uuid.uuid4().hex[:8]}"
        admin.ensure_path(path)
        yield path
        admin.delete(path, recursive=True)


@pytest.fixture
def admin(zk_server: LocalZooKeeper) -> Iterator[KazooClient]:
    with started(zk_server.hosts) as client:
        yield client


@pytest.fixture
def proxied(zk_server: LocalZooKeeper) -> Iterator[tuple[KazooClient, TcpProxy]]:
    """A client whose link can be cut and healed (20 s session: it survives)."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy, started(proxy.address, timeout=20) as client:
        yield client, proxy
        proxy.heal()


def reconnect(client: KazooClient, proxy: TcpProxy, while_away: Callable[[], None] = lambda: None) -> None:
    """Drop the connection (kazoo forgets every watch), run ``while_away``, reconnect to the same session."""
    states: list[str] = []
    suspended, connected = threading.Event(), threading.Event()

    def listener(state: str) -> None:
        states.append(state)
        (suspended if state == KazooState.SUSPENDED else connected).set()

    session = client.client_id[0]
    client.add_listener(listener)
    try:
        proxy.cut()
        assert suspended.wait(WAIT), f"kazoo did not notice the cut: {states}"
        while_away()
        proxy.heal()
        assert connected.wait(WAIT), f"kazoo did not reconnect: {states}"
    finally:
        client.remove_listener(listener)
    assert client.client_id[0] == session, "the session was expected to survive"


# -- the guard ---------------------------------------------------------------


def test_the_installed_kazoo_is_one_whose_internals_the_extension_knows(admin: KazooClient) -> None:
    """Fails loudly when kazoo changes: a new version must be checked and added to SUPPORTED_KAZOO."""
    kazoo_watches.check_kazoo(admin)
    assert isinstance(admin._data_watchers, dict) and isinstance(admin._child_watchers, dict)


def test_an_unknown_kazoo_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kazoo.version, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"kazoo 9\.9\.9 is not one of"):
        kazoo_watches.check_kazoo()


# -- removeWatches -------------------------------------------------------------


def test_remove_watch_drops_it_in_the_server_and_in_kazoo(
    zk_server: LocalZooKeeper, admin: KazooClient, base: str
) -> None:
    with started(zk_server.hosts) as client:
        watch = Recorder()
        present, absent, kept = f"{base}/present", f"{base}/absent", f"{base}/kept"
        admin.create(present, b"1")
        admin.create(kept, b"1")
        assert client.exists(present, watch=watch) is not None
        assert client.exists(absent, watch=watch) is None  # an exist watch on a missing znode
        client.exists(kept, watch=watch)
        assert watched_paths(zk_server, client) == {present, absent, kept}

        remove_watch_async(client, present, watcher=watch).get(WAIT)
        remove_watch_async(client, absent, watcher=watch).get(WAIT)
        assert watched_paths(zk_server, client) == {kept}
        assert set(client._data_watchers) == {kept}, "kazoo still holds the removed watch functions"

        admin.set(present, b"2")
        admin.create(absent, b"1")
        admin.set(kept, b"2")
        assert watch.wait_for(1, "the kept watch firing") == [(EventType.CHANGED, kept)]
        delivered(client)
        assert watch.events == [(EventType.CHANGED, kept)], "a removed watch fired"

        with pytest.raises(NoWatcherError):  # nothing left to remove: the server says so
            remove_watch_async(client, present, watcher=watch).get(WAIT)


def test_remove_child_watch_leaves_the_data_watch(zk_server: LocalZooKeeper, admin: KazooClient, base: str) -> None:
    with started(zk_server.hosts) as client:
        data, children = Recorder(), Recorder()
        node = f"{base}/node"
        admin.create(node, b"1")
        client.exists(node, watch=data)
        client.get_children(node, watch=children)
        remove_watch_async(client, node, kind=WatcherType.CHILDREN, watcher=children).get(WAIT)
        assert node not in client._child_watchers and data in client._data_watchers[node]
        admin.create(f"{node}/child")
        admin.set(node, b"2")
        assert data.wait_for(1, "the data watch firing") == [(EventType.CHANGED, node)]
        delivered(client)
        assert children.events == []


# -- setWatches ---------------------------------------------------------------


def test_set_watches_fires_exactly_what_changed_while_away_and_rearms_the_rest(
    zk_server: LocalZooKeeper, admin: KazooClient, base: str, proxied: tuple[KazooClient, TcpProxy]
) -> None:
    client, proxy = proxied
    watch, child_watch = Recorder(), Recorder()
    changed, deleted, unchanged = f"{base}/changed", f"{base}/deleted", f"{base}/unchanged"
    created, still_absent, parent = f"{base}/created", f"{base}/absent", f"{base}/parent"
    for path in (changed, deleted, unchanged, parent):
        admin.create(path, b"1")
    for path in (changed, deleted, unchanged):
        assert client.exists(path, watch=watch) is not None
    for path in (created, still_absent):
        assert client.exists(path, watch=watch) is None
    client.get_children(parent, watch=child_watch)
    relative = kazoo_watches.last_zxid(client)  # every event up to here was read

    def while_away() -> None:
        admin.set(changed, b"2")
        admin.delete(deleted)
        admin.create(created, b"1")
        admin.create(f"{parent}/kid")

    reconnect(client, proxy, while_away)
    delivered(client)
    assert watch.events == [] and watched_paths(zk_server, client) == set(), "kazoo kept watches over a reconnect?"

    results = set_watches_async(
        client,
        relative,
        data=[changed, deleted, unchanged],
        exist=[created, still_absent],
        child=[parent],
        watcher=watch,
        child_watcher=child_watch,
    )
    for result in results:
        result.get(WAIT)
    delivered(client)  # events come before the reply: all of them are in by now
    assert sorted(watch.events) == sorted(
        [(EventType.CHANGED, changed), (EventType.DELETED, deleted), (EventType.CREATED, created)]
    )
    assert child_watch.events == [(EventType.CHILD, parent)]
    # The others are armed again, in the server and in kazoo:
    assert watched_paths(zk_server, client) == {unchanged, still_absent}
    admin.set(unchanged, b"2")
    admin.create(still_absent, b"1")
    events = watch.wait_for(5, "the re-armed watches firing")
    assert sorted(events[3:]) == sorted([(EventType.CHANGED, unchanged), (EventType.CREATED, still_absent)])


def test_set_watches_with_a_current_zxid_fires_nothing(
    zk_server: LocalZooKeeper, admin: KazooClient, base: str, proxied: tuple[KazooClient, TcpProxy]
) -> None:
    """Data watches sent as data watches: an unchanged znode does not fire (kazoo 2.3 sent them as exist watches)."""
    client, proxy = proxied
    watch = Recorder()
    paths = [f"{base}/n{i}" for i in range(20)]
    for path in paths:
        admin.create(path, b"1")
        client.exists(path, watch=watch)
    relative = kazoo_watches.last_zxid(client)
    reconnect(client, proxy)
    for result in set_watches_async(client, relative, data=paths, watcher=watch):
        result.get(WAIT)
    delivered(client)
    assert watch.events == []
    assert watched_paths(zk_server, client) == set(paths)


def test_set_watches_in_a_new_session_restores_by_zxid(
    zk_server: LocalZooKeeper, admin: KazooClient, base: str
) -> None:
    """The server compares paths with the zxid, not with the session: a new session can restore too."""
    old = KazooClient(hosts=zk_server.hosts)
    old.start(WAIT)
    kept, changed = f"{base}/kept", f"{base}/changed"
    admin.create(kept, b"1")
    admin.create(changed, b"1")
    old.exists(kept)
    old.exists(changed)
    relative = kazoo_watches.last_zxid(old)
    old.stop()
    old.close()
    admin.set(changed, b"2")

    with started(zk_server.hosts) as new:
        watch = Recorder()
        for result in set_watches_async(new, relative, data=[kept, changed], watcher=watch):
            result.get(WAIT)
        delivered(new)
        assert watch.events == [(EventType.CHANGED, changed)]
        assert watched_paths(zk_server, new) == {kept}


def test_set_watches_splits_large_sets_into_batches_under_the_limit(
    zk_server: LocalZooKeeper, admin: KazooClient, base: str
) -> None:
    with started(zk_server.hosts) as client:
        watch = Recorder()
        # 3,000 paths of about 110 bytes: about 340 KB in all, three batches of 128 KB.
        paths = [f"{base}/{'x' * 90}{i:06d}" for i in range(3000)]
        relative = kazoo_watches.last_zxid(client)
        results = set_watches_async(client, relative, exist=paths, watcher=watch)
        assert len(results) == 3
        for result in results:
            result.get(WAIT)
        assert len(watched_paths(zk_server, client)) == 3000
        admin.create(paths[-1], b"1")  # the last batch's last path
        assert watch.wait_for(1, "a watch from the last batch") == [(EventType.CREATED, paths[-1])]


def test_batches_respect_the_byte_limit_and_keep_every_path_once() -> None:
    kinds = ([f"/d{i}" for i in range(50)], [f"/e{i}" for i in range(50)], [f"/c{i}" for i in range(7)])
    batches = list(kazoo_watches._batches(kinds, 200))
    for batch in batches:
        size = 8 + 3 * 4 + sum(4 + len(p) for kind in batch for p in kind)
        assert size <= 200
    for k in range(3):
        assert [p for batch in batches for p in batch[k]] == kinds[k]
