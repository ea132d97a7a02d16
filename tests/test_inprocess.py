"""The service in this process, against the real ZooKeeper: threading invariants.

* kazoo runs watch callbacks and completions on its own threads; the service
  must only ever be entered on the event loop thread;
* nothing on the request path blocks the loop (no synchronous kazoo call, no
  sqlite call, no sleep): ``blockbuster`` raises on any blocking call made on
  the loop thread while it is active, as in aiohttp's own test suite.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import RawTestServer, TestClient
from blockbuster import BlockBuster, blockbuster_ctx
from kazoo.client import KazooClient

from harness import LocalZooKeeper
from sidecar.app import open_service
from sidecar.cache import Entry
from sidecar.config import load_config
from sidecar.errors import WriteAbandoned
from sidecar.http_api import Api
from sidecar.origins import OriginValue, open_origin
from sidecar.service import CacheService
from tests.conftest import eventually


@pytest.fixture
async def service(zk_server: LocalZooKeeper, namespace: str, tmp_path: Path) -> AsyncIterator[CacheService]:
    cfg = load_config(
        {
            "zk": zk_server.hosts,
            "namespace": namespace,
            "member_id": "inproc",
            "origin": f"sqlite:///{tmp_path / 'o.db'}",
        },
        env={},
    )
    svc = await open_service(cfg)
    svc.start()
    await eventually(lambda: svc.ready, what="service ready")
    yield svc
    await svc.stop()


@pytest.fixture
async def client(service: CacheService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(RawTestServer(Api(service))) as c:
        yield c


@pytest.fixture
def other_client(zk_server: LocalZooKeeper) -> Iterator[KazooClient]:
    """A plain kazoo client standing for another sidecar or an operator."""
    kz = KazooClient(hosts=zk_server.hosts)
    kz.start(10)
    yield kz
    kz.stop()
    kz.close()


@pytest.fixture
def no_blocking() -> Iterator[BlockBuster]:
    """Fail on any blocking call on the loop thread, with two reasoned exceptions."""
    with blockbuster_ctx() as bb:
        # Every kazoo *_async call wakes kazoo's connection thread with a
        # 1-byte send on a local socketpair (kazoo/client.py, _call): the same
        # self-pipe wake-up asyncio's call_soon_threadsafe does. It cannot
        # wait on the network.
        bb.functions["socket.socket.send"].can_block_in("kazoo/client.py", "_call")
        # Log records go synchronously to stderr (under pytest, a file).
        for func in ("io.TextIOWrapper.write", "io.BufferedWriter.write", "os.write"):
            bb.functions[func].can_block_in("logging/__init__.py", "emit")
        yield bb


async def test_watch_events_reach_the_service_on_the_loop_thread(
    service: CacheService, client: TestClient[Any, Any], other_client: KazooClient
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    original = service.events.key_changed

    def spy(key: str) -> None:
        seen.append((key, threading.get_ident()))
        original(key)

    service.events.key_changed = spy  # type: ignore[method-assign]
    assert (await client.put("/v1/keys/t/1", data=b"v1")).status == 200
    await eventually(lambda: "t/1" in service.cache, what="the writer's background refill")
    # Another party bumps the version znode directly, from another thread.
    path = service.coord.layout.version_path("t/1")
    await asyncio.to_thread(other_client.set, path, b"{}")
    await eventually(lambda: any(k == "t/1" for k, _ in seen), what="the watch event")
    assert {thread for _, thread in seen} == {loop_thread}
    assert "t/1" not in service.cache


async def test_state_changes_are_applied_on_the_loop_thread(service: CacheService) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = service.events.state_changed
    service.events.state_changed = lambda s: (seen.append(threading.get_ident()), original(s))  # type: ignore[method-assign,func-returns-value]
    # Dropping the socket from under kazoo makes it SUSPENDED then CONNECTED.
    await asyncio.to_thread(service.coord.zk.client._connection._socket.shutdown, 2)
    await eventually(lambda: len(seen) >= 2 and service.ready, timeout=15, what="suspend and reconnect")
    assert set(seen) == {loop_thread}


async def test_request_path_never_blocks_the_loop(
    service: CacheService, client: TestClient[Any, Any], no_blocking: BlockBuster
) -> None:
    assert (await client.put("/v1/keys/nb", data=b"v1")).status == 200  # lock, origin, bump
    assert (await client.put("/v1/keys/nb", data=b"v2", headers={"If-Match": '"1"'})).status == 412
    await eventually(lambda: "nb" in service.cache, what="the writer's background refill")
    assert (await client.get("/v1/keys/nb")).headers["X-Cache"] == "hit"
    service.cache.invalidate("nb")
    miss = await client.get("/v1/keys/nb")  # watch + origin read
    assert (miss.headers["X-Cache"], await miss.read()) == ("miss", b"v1")
    assert (await client.get("/v1/keys/absent")).status == 404
    assert (await client.get("/v1/keys/nb?consistency=strong")).status == 200  # sync + exists
    assert (await client.post("/v1/invalidate", json={"keys": ["nb"], "prefixes": ["n"], "all": True})).status == 202
    assert (await client.delete("/v1/keys/nb")).status == 204
    assert (await client.get("/v1/stats")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_auth_token_is_required_when_set(zk_server: LocalZooKeeper, namespace: str, tmp_path: Path) -> None:
    cfg = load_config(
        {
            "zk": zk_server.hosts,
            "namespace": namespace,
            "member_id": "auth",
            "auth_token": "s3cret",
            "listen": "0.0.0.0:7070",
            "origin": f"sqlite:///{tmp_path / 'o.db'}",
        },
        env={},
    )
    svc = await open_service(cfg)
    try:
        async with TestClient(RawTestServer(Api(svc))) as c:
            assert (await c.get("/healthz")).status == 200  # probes need no token
            resp = await c.get("/v1/keys/k")
            assert resp.status == 401 and resp.headers["Content-Type"] == "application/problem+json"
            assert (await c.get("/v1/stats", headers={"Authorization": "Bearer wrong"})).status == 401
            assert (await c.get("/v1/stats", headers={"Authorization": "Bearer s3cret"})).status == 200
    finally:
        await svc.stop()


async def test_strong_read_never_serves_an_entry_behind_zookeeper(
    service: CacheService, client: TestClient[Any, Any]
) -> None:
    assert (await client.put("/v1/keys/s", data=b"current")).status == 200
    await eventually(lambda: "s" in service.cache, what="the writer's refill")
    entry = service.cache.get("s")
    assert entry is not None
    # Stand-in for a watch event still in flight: an older value at an older version.
    ticket = service.cache.begin_fill("s")
    assert service.cache.install(ticket, Entry.make("s", b"stale", "text/plain", entry.version - 1))
    service.cache.end_fill(ticket)

    eventual = await client.get("/v1/keys/s")
    assert (eventual.headers["X-Cache"], await eventual.read()) == ("hit", b"stale")
    strong = await client.get("/v1/keys/s?consistency=strong")
    assert (strong.headers["X-Cache"], await strong.read()) == ("miss", b"current")
    assert strong.headers["ETag"] == f'"{entry.version}"'
    again = await client.get("/v1/keys/s?consistency=strong")  # now current: a hit, after one sync
    assert (again.headers["X-Cache"], await again.read()) == ("hit", b"current")
    assert (await client.get("/v1/keys/absent?consistency=strong")).status == 404
    bad = await client.get("/v1/keys/s?consistency=linearizable")
    assert bad.status == 400 and bad.headers["Content-Type"] == "application/problem+json"
    assert service.stats.strong_reads == 3


async def test_writes_report_where_their_time_went(client: TestClient[Any, Any]) -> None:
    resp = await client.put("/v1/keys/timed", data=b"v1")
    assert resp.status == 200
    phases = dict(item.split(";dur=") for item in resp.headers["Server-Timing"].split(", "))
    assert list(phases) == ["check", "lock", "origin", "publish"]
    assert all(float(ms) >= 0 for ms in phases.values())
    assert "Server-Timing" in (await client.delete("/v1/keys/timed")).headers


async def test_a_write_costs_two_zookeeper_round_trips(service: CacheService, client: TestClient[Any, Any]) -> None:
    assert (await client.put("/v1/keys/rt", data=b"v0")).status == 200  # creates the key's znodes
    await eventually(lambda: "rt" in service.cache, what="the writer's background refill")
    zk, root = service.coord.zk, service.coord.layout.root
    background = (service.coord.layout.leader, service.coord.layout.members)
    sent: list[str] = []

    def counting(name: str, method: Any) -> Any:
        async def call(first: Any, *args: Any, **kw: Any) -> Any:
            # Not the heartbeat's exists, nor the housekeeper election's steps
            # (CI once saw its get_children and create land in the window).
            if first != root and not (isinstance(first, str) and first.startswith(background)):
                sent.append(name.removesuffix("_armed"))
            return await method(first, *args, **kw)

        return call

    for name in (
        "commit", "exists", "get", "set", "create", "delete", "ensure_path", "get_children", "call_all"
    ):  # fmt: skip
        setattr(zk, name, counting(name, getattr(zk, name)))
    # Two transactions (lock+intent, publish+release); after the answer, the
    # writer's refill arms its watch like any miss.
    assert (await client.put("/v1/keys/rt", data=b"v1")).status == 200
    await eventually(lambda: "rt" in service.cache, what="the writer's background refill")
    assert sent == ["commit", "commit", "call_all"]  # the refill: the key's exists with `retired`
    etag = (await client.get("/v1/keys/rt")).headers["ETag"]
    sent.clear()
    # A compare-and-set reads the version first (with `retired`, pipelined: one round trip).
    assert (await client.put("/v1/keys/rt", data=b"v2", headers={"If-Match": etag})).status == 200
    await eventually(lambda: "rt" in service.cache, what="the writer's background refill")
    assert sent == ["call_all", "commit", "commit", "call_all"]


async def test_key_events_are_timed_from_kazoos_thread_to_the_drop(
    service: CacheService, client: TestClient[Any, Any], other_client: KazooClient
) -> None:
    assert (await client.put("/v1/keys/ev", data=b"v1")).status == 200
    await eventually(lambda: "ev" in service.cache, what="the writer's background refill")
    before = service.coord.key_events.count
    sent = time.monotonic()
    await asyncio.to_thread(other_client.set, service.coord.layout.version_path("ev"), b'{"op":"test"}')
    await eventually(lambda: "ev" not in service.cache, what="the watch event dropping the entry")
    events = (await (await client.get("/v1/stats")).json())["key_events"]
    assert events["count"] == before + 1
    assert sent < events["last_arrived_monotonic"] <= events["last_applied_monotonic"] < time.monotonic()


# -- stopping while writes wait ----------------------------------------------


async def test_a_lock_reply_that_arrives_after_the_stop_began_leaves_no_intent(
    service: CacheService, other_client: KazooClient
) -> None:
    """Review finding: the lock transaction landed, its reply came only after
    the sidecar began to stop and closed the origin; the write then failed
    on the closed origin and kept its intent as if the origin might have
    changed, leaving the key uncacheable fleet-wide.  It must give the lock
    back with the intent cleared, and touch nothing."""
    await service.put("k1", OriginValue(b"old", "text/plain"))
    zk = service.coord.zk
    real_commit = zk.commit
    landed, deliver = asyncio.Event(), asyncio.Event()

    async def late_lock_reply(transaction: Any, what: str) -> list[Any]:
        result = await real_commit(transaction, what)
        if what == "lock":
            landed.set()
            await deliver.wait()  # the lock is taken; its reply comes when the test says
        return result

    zk.commit = late_lock_reply  # type: ignore[method-assign]
    write = asyncio.ensure_future(service.put("k1", OriginValue(b"new", "text/plain")))
    await asyncio.wait_for(landed.wait(), 10)
    # What CacheService.stop does first, while the session is still open.
    service.refuse_writes()
    await service.origin.close()
    deliver.set()
    outcome = (await asyncio.gather(asyncio.wait_for(write, 10), return_exceptions=True))[0]
    assert isinstance(outcome, WriteAbandoned), repr(outcome)
    layout = service.coord.layout
    data, _ = other_client.get(layout.version_path("k1"))
    assert data != b"", "the intent of a write that never reached the origin was left behind"
    assert other_client.exists(layout.lock_path("k1")) is None
    stored = await open_origin(service.config.origin, 5.0, 1 << 20)
    try:
        got = await stored.get("k1")
    finally:
        await stored.close()
    assert got is not None and got.value == b"old"


async def test_writes_waiting_for_a_connection_answer_as_soon_as_the_stop_begins(
    zk_private: LocalZooKeeper, namespace: str, tmp_path: Path
) -> None:
    """Review finding: writes waiting for ZooKeeper held up the HTTP drain for
    up to lock_timeout and used up the stop's budget; they now answer 503
    write-abandoned when the stop begins."""
    cfg = load_config(
        {
            "zk": zk_private.hosts,
            "namespace": namespace,
            "member_id": "stopping",
            "origin": f"sqlite:///{tmp_path / 'o.db'}",
            "lock_timeout": "30s",
        },
        env={},
    )
    svc = await open_service(cfg)
    svc.start()
    try:
        await eventually(lambda: svc.ready, what="service ready")
        zk_private.stop()
        await eventually(lambda: not svc.coord.writable, what="the service noticing ZooKeeper is gone")
        write = asyncio.ensure_future(svc.put("k1", OriginValue(b"v", "text/plain")))
        await eventually(lambda: len(svc._writes) == 1, what="the write waiting")
        started = time.monotonic()
        svc.refuse_writes()
        outcome = (await asyncio.gather(asyncio.wait_for(write, 5), return_exceptions=True))[0]
        assert isinstance(outcome, WriteAbandoned), repr(outcome)
        assert time.monotonic() - started < 1.0
    finally:
        await svc.stop(timeout=3.0)
