"""The write protocol's fences (issue #10, holes 4, 5 and 8), on a real ZooKeeper.

Hole 4 needs a reply that was lost with its transaction applied; a test cannot
make ZooKeeper lose one, so it replays the call the way the retry loop does
after such a loss, on the real lock objects, against a real server.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kazoo.client import KazooClient

from harness import LocalZooKeeper, TcpProxy
from sidecar.coordination import Layout, LockLost, ZkSession, version_note
from sidecar.coordination.lock import acquire_write_lock
from sidecar.origins.sqlite import sqlite_path
from tests.conftest import SidecarFactory, eventually, held_origin_put, member_ids
from tests.test_coherence import get, get_hit, put


@pytest.fixture
async def zk(zk_server: LocalZooKeeper) -> AsyncIterator[ZkSession]:
    session = ZkSession(zk_server.hosts, 10.0)
    await session.connect(10)
    yield session
    await session.close(5)


async def test_a_retried_publish_never_deletes_another_writers_lock(
    zk: ZkSession, zk_server: LocalZooKeeper, namespace: str
) -> None:
    """Hole 4: our publish landed but its reply was lost; meanwhile another
    writer took the lock and set its intent. The retry must leave both alone."""
    layout = Layout(f"/zkcache/{namespace}")
    lock = await acquire_write_lock(zk, layout, "k", "a", timeout=5)
    note = version_note("put", "a", "w-1")
    await lock.publish(note)  # applied...
    lock.held = True  # ...but, as far as the writer knows, its reply was lost

    other = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(other.start, 10)
    try:
        tx = other.transaction()
        tx.create(layout.lock_path("k"), b"other", ephemeral=True)
        tx.set_data(layout.version_path("k"), b"")
        await asyncio.to_thread(tx.commit)
        with pytest.raises(LockLost):
            await lock.publish(note)  # the retry
        stat = await asyncio.to_thread(other.exists, layout.lock_path("k"))
        assert stat is not None and stat.ephemeralOwner == other.client_id[0], "the retry deleted another's lock"
        data, _ = await asyncio.to_thread(other.get, layout.version_path("k"))
        assert data == b"", "the retry wrote over another writer's intent"
    finally:
        await asyncio.to_thread(other.stop)
        await asyncio.to_thread(other.close)


async def test_a_retried_publish_whose_reply_was_lost_finds_its_own_note(zk: ZkSession, namespace: str) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    lock = await acquire_write_lock(zk, layout, "k", "a", timeout=5)
    note = version_note("put", "a", "w-2")
    version = await lock.publish(note)
    lock.held = True
    assert await lock.publish(note) == version  # no second bump, no error


async def test_an_invalidation_keeps_a_live_writers_intent(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """Hole 8: an invalidation during A's write ended A's intent (empty data
    became a note) while A's origin write was still pending, so B cached the
    old value again."""
    a = sidecars("a", origin_timeout="20s")
    b = sidecars("b")
    await put(http, a.url, "w", b"old")
    db = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None, timeout=1)
    db.execute("BEGIN IMMEDIATE")  # A's origin write waits on this lock
    try:
        write = asyncio.ensure_future(put(http, a.url, "w", b"new"))
        await eventually(lambda: a.stats()["writes_in_progress"] == 1, what="A's write in progress")
        await asyncio.sleep(0.2)  # A has its lock and intent (2 ms here): now invalidate
        async with http.post(f"{b.url}/v1/invalidate?wait=true", json={"keys": ["w"]}) as resp:
            assert resp.status == 200
        status, _, value, _ = await get(http, b.url, "w")
        assert (status, value) == (200, b"old")  # concurrent with the write: allowed
        assert b.stats()["entries"] == 0, "B cached the key while a write of it was in progress"
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert (await write)[0] == 200
    assert (await get_hit(http, b.url, "w"))[2] == b"new"


async def test_a_lock_left_by_a_failed_publish_is_released_in_the_background(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    """Hole 5: A's publish failed (its link was cut past lock_timeout); its
    session survived, and so did its lock, until A's next write of the key:
    B's writes timed out meanwhile. Now A releases it as soon as it can."""
    origin = upstream + "/kv"
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, origin=origin, zk_session_timeout="9s", lock_timeout="1s")
        b = sidecars("b", origin=origin, lock_timeout="4s")
        await put(http, a.url, "left", b"v1")
        async with held_origin_put(http, upstream, "left") as until_held:
            write = asyncio.ensure_future(put(http, a.url, "left", b"v2"))
            await until_held()
            proxy.cut()
        status, body, _ = await write
        assert status == 503 and body["type"].endswith("invalidation-not-published"), body
        proxy.heal()
        a.wait_ready(20)
        assert a.stats()["zookeeper"]["sessions"] == 1, "same session expected"
        status, body, _ = await put(http, b.url, "left", b"v3")
        assert status == 200, f"B could not write: {body}"
        assert (await get(http, a.url, "left"))[2] == b"v3"


async def _expire_a_during_its_origin_write(
    http: aiohttp.ClientSession, a: Any, proxy: TcpProxy, zk_hosts: str, namespace: str
) -> None:
    proxy.cut()
    await eventually(
        lambda: "a" not in member_ids(zk_hosts, namespace), timeout=20, what="A's session expiring while cut off"
    )


async def test_a_writer_that_lost_its_lock_still_tells_the_fleet(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str
) -> None:
    """Review finding: A's session expired during its origin write; B wrote
    and published; A's origin write then landed last. A cannot publish under
    its lock any more (B's note is there), but the origin now holds A's value:
    the fleet must still be told, or C serves B's value forever."""
    origin = upstream + "/kv"
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, origin=origin, zk_session_timeout="4s", lock_timeout="1s")
        b, c = sidecars("b", origin=origin), sidecars("c", origin=origin)
        await put(http, b.url, "k", b"v0")
        async with held_origin_put(http, upstream, "k", before=True) as until_held:
            write = asyncio.ensure_future(put(http, a.url, "k", b"from-a"))
            await until_held()
            await _expire_a_during_its_origin_write(http, a, proxy, zk_server.hosts, namespace)
            assert (await put(http, b.url, "k", b"from-b"))[0] == 200
            assert (await get_hit(http, c.url, "k"))[2] == b"from-b"
        status, body, _ = await write  # released: the origin now holds A's value
        assert status == 503, body
        proxy.heal()

        async def c_serves_the_origin() -> bool:
            return (await get(http, c.url, "k"))[2] == b"from-a"

        await eventually(c_serves_the_origin, timeout=20, what="C serving the value the origin holds")


async def test_an_expired_writer_never_deletes_a_lock_taken_without_intent(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str
) -> None:
    """Review finding: after A's session expired, B took the lock for an
    If-None-Match write (lock alone, no intent yet). A's retried publish went
    out on A's new session, passed the fence (the version had not moved) and
    deleted B's lock."""
    origin = upstream + "/kv"
    proxy = TcpProxy(zk_server.host, zk_server.port)
    proxy.start()
    admin = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(admin.start, 10)
    try:
        a = sidecars("a", zk=proxy.address, origin=origin, zk_session_timeout="4s", lock_timeout="1s")
        b = sidecars("b", origin=origin)
        lock_path = Layout(f"/zkcache/{namespace}").lock_path("n")
        async with held_origin_put(http, upstream, "n", before=True) as until_held:
            write = asyncio.ensure_future(put(http, a.url, "n", b"from-a"))
            await until_held()
            await _expire_a_during_its_origin_write(http, a, proxy, zk_server.hosts, namespace)
            async with http.post(f"{upstream}/_control/hold/n"):  # B's If-None-Match read waits
                pass
            b_write = asyncio.ensure_future(put(http, b.url, "n", b"from-b", **{"If-None-Match": "*"}))

            async def b_reading() -> bool:
                async with http.get(f"{upstream}/_control/held/n") as resp:
                    return bool((await resp.json())["held"])

            await eventually(b_reading, what="B holding the lock and reading the origin")
            b_lock = await asyncio.to_thread(admin.exists, lock_path)
            assert b_lock is not None
        await write
        proxy.heal()
        a.wait_ready(20)
        await eventually(lambda: a.stats()["locks_being_released"] == 0, timeout=10, what="A's janitor done")
        still = await asyncio.to_thread(admin.exists, lock_path)
        assert still is not None and still.ephemeralOwner == b_lock.ephemeralOwner, "A deleted B's lock"
        async with http.post(f"{upstream}/_control/release/n"):
            pass
        # B read the origin before A's late write landed: both orders are
        # possible without a fencing token at the origin (README, Limits).
        assert (await b_write)[0] in (200, 412)
    finally:
        proxy.stop()
        await asyncio.to_thread(admin.stop)
        await asyncio.to_thread(admin.close)


async def test_a_lock_this_session_still_holds_is_reclaimed_by_its_next_write(zk: ZkSession, namespace: str) -> None:
    """Review finding: when the janitor gives up (a long outage) the lock stays
    with the live session, and every writer, this sidecar included, timed out
    on the key. The session's next write of the key reclaims it."""
    layout = Layout(f"/zkcache/{namespace}")
    leftover = await acquire_write_lock(zk, layout, "r", "a", timeout=5)
    assert leftover.held  # its release never got through
    again = await acquire_write_lock(zk, layout, "r", "a", timeout=1)
    await again.publish(version_note("put", "a", "w-3"))
    assert await zk.exists(layout.lock_path("r")) is None
