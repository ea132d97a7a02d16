"""What the sidecar serves when ZooKeeper or the origin fails (README: "Connection states")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time

import aiohttp
import pytest
from kazoo.client import KazooClient
from kazoo.security import ACL, ANYONE_ID_UNSAFE, OPEN_ACL_UNSAFE, Permissions

from harness import LocalZooKeeper, TcpProxy, free_port
from sidecar.coordination import Layout
from sidecar.origins.sqlite import sqlite_path
from tests.conftest import SidecarFactory, eventually, held_origin_put, member_ids
from tests.test_coherence import get, get_hit, put

pytestmark = pytest.mark.slow


def change_origin_behind_the_cache(sqlite_url: str, key: str, value: bytes) -> None:
    db = sqlite3.connect(sqlite_path(sqlite_url))
    db.execute("UPDATE kv SET value = ? WHERE key = ?", (value, key))
    db.commit()
    db.close()


async def problem_of(http: aiohttp.ClientSession, method: str, url: str, **kw: object) -> tuple[int, dict[str, object]]:
    async with http.request(method, url, **kw) as resp:  # type: ignore[arg-type]
        assert resp.headers["Content-Type"] == "application/problem+json"
        return resp.status, await resp.json(content_type=None)


async def test_zookeeper_down_no_grace_reads_bypass_to_origin_and_writes_fail(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    a = sidecars("a", zk=zk_private.hosts, suspended_grace="0s", suspended_reads="origin", lock_timeout="1s")
    b = sidecars("b", zk=zk_private.hosts)
    await put(http, a.url, "k", b"v1")
    await get_hit(http, a.url, "k")

    zk_private.stop()
    await eventually(lambda: not a.is_ready(), what="A noticing ZooKeeper is gone")
    status, problem = await problem_of(http, "GET", a.url + "/readyz")
    assert status == 503 and problem["type"].endswith("zookeeper-unavailable")  # type: ignore[union-attr]

    # Nobody can tell A about writes now: with no grace, A must not serve its
    # cached copy; it reads the origin (uncached) instead.
    change_origin_behind_the_cache(sqlite_url, "k", b"v2")
    status, source, value, headers = await get(http, a.url, "k")
    assert (status, source, value) == (200, "bypass", b"v2")
    assert "ETag" not in headers  # the version is unknown without ZooKeeper
    # A write waits lock_timeout for a connection, then gives up: nothing written.
    started = time.monotonic()
    status, problem = await problem_of(http, "PUT", a.url + "/v1/keys/k", data=b"v3")
    waited = time.monotonic() - started
    assert status == 503 and problem["type"].endswith("zookeeper-unavailable"), problem  # type: ignore[union-attr]
    assert 0.9 <= waited <= 5, f"a write with ZooKeeper down answered after {waited:.2f}s (lock_timeout 1s)"

    # ZooKeeper comes back (same data, within the session timeout): the
    # session survives, kazoo lost every watch, so A re-armed and revalidated
    # its entries instead of flushing them; coherence works again.
    zk_private.start()
    a.wait_ready(20)
    b.wait_ready(20)
    stats = a.stats()
    assert stats["zookeeper"]["sessions"] == 1, "the session should have survived"
    assert stats["revalidation"]["count"] == 1 and stats["revalidation"]["entries"] == 1
    await put(http, b.url, "k", b"v4")
    await eventually(lambda: a.stats()["entries"] == 0, what="A's re-armed watch firing")
    assert (await get(http, a.url, "k"))[2] == b"v4"


async def test_zookeeper_down_hits_are_served_for_the_grace_then_stop(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    grace = 1.5
    a = sidecars("a", zk=zk_private.hosts, suspended_grace=f"{grace}s", zk_session_timeout="6s")
    await put(http, a.url, "k", b"v1")
    await get_hit(http, a.url, "k")
    change_origin_behind_the_cache(sqlite_url, "k", b"v2")

    zk_private.stop()
    await eventually(lambda: not a.is_ready(), what="A noticing ZooKeeper is gone")
    lost_at = time.monotonic()
    status, source, value, _ = await get(http, a.url, "k")
    assert (status, source, value) == (200, "hit", b"v1"), "within the grace the cached value is served"

    async def bypassing() -> bool:
        return (await get(http, a.url, "k"))[1] == "bypass"

    await eventually(bypassing, timeout=grace + 3, what="A stopping to serve cached values")
    assert time.monotonic() - lost_at >= grace - 0.2, "stopped serving hits before the grace ended"
    assert (await get(http, a.url, "k"))[2] == b"v2"


async def test_zookeeper_down_with_fail_policy_answers_503(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a = sidecars("a", zk=zk_private.hosts, suspended_grace="0s", suspended_reads="fail")
    await put(http, a.url, "k", b"v1")
    zk_private.kill()  # a crash this time
    await eventually(lambda: not a.is_ready(), what="A noticing ZooKeeper is gone")
    status, problem = await problem_of(http, "GET", a.url + "/v1/keys/k")
    assert status == 503 and problem["type"].endswith("zookeeper-unavailable")  # type: ignore[union-attr]
    async with http.get(a.url + "/healthz") as resp:
        assert resp.status == 200  # alive: Kubernetes must not restart it for this


async def test_session_expiry_keeps_unchanged_entries_and_reregisters(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """B is frozen past its session timeout while A writes: LOST, then a new
    session, which restores the watches of B's cached keys by zxid: the key
    written meanwhile is dropped, the other is still cached."""
    a = sidecars("a", zk=zk_private.hosts)
    b = sidecars("b", zk=zk_private.hosts, zk_session_timeout="2s")
    await put(http, a.url, "k", b"v1")
    await put(http, a.url, "u", b"u1")
    assert (await get(http, b.url, "k"))[1:3] == ("miss", b"v1")
    assert (await get(http, b.url, "u"))[1:3] == ("miss", b"u1")
    first_session = b.stats()["zookeeper"]["session"]

    b.pause()
    try:
        await put(http, a.url, "k", b"v2")  # B cannot hear about this
        # ZooKeeper expires B's session: its member znode goes.
        ns = str(a.settings["namespace"])
        await eventually(
            lambda: "b" not in member_ids(zk_private.hosts, ns),
            timeout=15,
            interval=0.3,
            what="ZooKeeper expiring B's session",
        )
    finally:
        b.resume()

    # Its very first request after waking: B has not heard from ZooKeeper for
    # longer than its lease, so it must not answer from its (stale) cache.
    status, source, value, _ = await get(http, b.url, "k")
    assert (status, value) == (200, b"v2") and source != "hit", (source, value)

    await eventually(
        lambda: b.stats()["zookeeper"]["sessions"] == 2 and b.is_ready(),
        timeout=15,
        what="B establishing a new session",
    )
    stats = b.stats()
    assert stats["zookeeper"]["session"] != first_session
    assert stats["flushes"] == 0
    assert (await get(http, b.url, "k"))[1:3] == ("miss", b"v2")
    assert (await get(http, b.url, "u"))[1:3] == ("hit", b"u1"), "B lost an entry that did not change"
    assert "b" in member_ids(zk_private.hosts, ns), "B must re-register its member znode"
    assert (await put(http, a.url, "u", b"u2"))[0] == 200  # its restored watch works in the new session

    async def sees_u2() -> bool:
        return (await get(http, b.url, "u"))[2] == b"u2"

    await eventually(sees_u2, what="B dropping u after A's write")


async def test_http_origin_failures_map_to_502_and_504(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/kv"  # nothing listens there
    a = sidecars("a", origin=dead)
    status, problem = await problem_of(http, "GET", a.url + "/v1/keys/k")
    assert status == 502 and problem["type"].endswith("origin-unavailable")  # type: ignore[union-attr]
    status, problem = await problem_of(http, "PUT", a.url + "/v1/keys/k", data=b"v")
    assert status == 502
    assert a.stats()["writes"] == 0

    b = sidecars("b", origin=upstream + "/kv", origin_timeout="0.5s")
    async with http.post(upstream + "/_control/mode/500"):
        pass
    status, problem = await problem_of(http, "GET", b.url + "/v1/keys/k")
    assert status == 502 and "500" in str(problem["detail"])
    async with http.post(upstream + "/_control/mode/hang"):
        pass
    status, problem = await problem_of(http, "GET", b.url + "/v1/keys/k")
    assert status == 504 and problem["type"].endswith("origin-timeout")  # type: ignore[union-attr]
    async with http.post(upstream + "/_control/mode/ok"):
        pass
    assert (await put(http, b.url, "k", b"v"))[0] == 200
    assert (await get(http, b.url, "k"))[2] == b"v"


async def test_hung_zookeeper_under_steady_traffic_stops_hits_within_the_lease(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """kazoo sends no pings while requests flow, so with a hung server and steady
    misses it never reports SUSPENDED. The sidecar's own lease must still stop
    serving cached values within 2/3 of the session timeout (+ grace, here 0)."""
    a = sidecars("a", zk=zk_private.hosts, zk_session_timeout="3s", suspended_grace="0s")
    await put(http, a.url, "k", b"v1")
    await get_hit(http, a.url, "k")
    change_origin_behind_the_cache(sqlite_url, "k", b"v2")

    stop = asyncio.Event()

    async def one_miss(i: int) -> None:
        async with http.get(f"{a.url}/v1/keys/absent-{i}") as resp:
            await resp.read()

    async def steady_misses() -> None:
        # A miss every 0.1 s without waiting for the previous one: kazoo's
        # socket is never idle long enough for it to send a ping.
        misses = []
        for i in range(200):  # bounded: at most 200 requests, ~20 s
            if stop.is_set():
                break
            misses.append(asyncio.create_task(one_miss(i)))
            await asyncio.sleep(0.1)
        await asyncio.gather(*misses)

    traffic = asyncio.create_task(steady_misses())
    zk_private.pause()
    paused_at = time.monotonic()
    try:

        async def not_a_hit() -> bool:
            return (await get(http, a.url, "k"))[1] != "hit"

        await eventually(not_a_hit, timeout=8, what="A to stop serving its cached value")
        assert time.monotonic() - paused_at <= 2 + 1.5, "hits outlived the lease"
        status, source, value, _ = await get(http, a.url, "k")
        assert (status, source, value) == (200, "bypass", b"v2")
        async with http.get(a.url + "/readyz") as resp:
            assert resp.status == 503  # "no answer from ZooKeeper", or SUSPENDED once traffic stopped
    finally:
        stop.set()
        zk_private.resume()
        await traffic
    await eventually(lambda: a.is_ready(), timeout=15, what="A ready again after ZooKeeper resumes")


async def test_partitioned_sidecar_revalidates_on_reconnect_instead_of_flushing(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A reaches ZooKeeper through a proxy the test cuts; B stays connected and
    writes one of A's keys meanwhile. Back in the same session, A drops exactly
    the changed key and keeps the others (no herd of misses)."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="6s", suspended_grace="0s")
        b = sidecars("b")
        keys = [f"r/{i}" for i in range(20)]
        for key in keys:
            await put(http, b.url, key, b"v1")
            await get(http, a.url, key)
        assert a.stats()["entries"] == 20

        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A noticing the partition")
        await put(http, b.url, "r/7", b"v2")  # A cannot hear about this
        proxy.heal()
        a.wait_ready(20)

        stats = a.stats()
        assert stats["zookeeper"]["sessions"] == 1, "same session expected"
        assert stats["revalidation"] == {**stats["revalidation"], "count": 1, "entries": 20, "dropped": 1}
        assert stats["entries"] == 19
        assert (await get(http, a.url, "r/7"))[1:3] == ("miss", b"v2")
        assert (await get(http, a.url, "r/8"))[1:3] == ("hit", b"v1")
        await put(http, b.url, "r/8", b"v3")  # re-armed watches work
        await eventually(lambda: a.stats()["entries"] == 19, what="A's re-armed watch on r/8")
        assert (await get(http, a.url, "r/8"))[2] == b"v3"


async def test_writer_killed_between_origin_write_and_version_bump(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    """A's origin write lands, then A dies before telling the fleet. B held the
    old value: it must not keep serving it (the write's intent was published
    before the origin was touched)."""
    origin = upstream + "/kv"
    a, b = sidecars("a", origin=origin), sidecars("b", origin=origin)
    await put(http, b.url, "doomed", b"old")
    await get_hit(http, b.url, "doomed")
    async with held_origin_put(http, upstream, "doomed") as until_held:
        write = asyncio.create_task(put(http, a.url, "doomed", b"new"))
        await until_held()
        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no version bump will follow
        with contextlib.suppress(aiohttp.ClientError):
            await write

    async def b_serves_new() -> bool:
        return (await get(http, b.url, "doomed"))[2] == b"new"

    await eventually(b_serves_new, timeout=5, what="B serving the origin's value after the writer died")
    status, source, value, _ = await get(http, b.url, "doomed")
    assert (status, value) == (200, b"new") and source != "hit", "B cached a value while a write was unfinished"


async def test_lock_held_elsewhere_times_out_then_its_end_lets_writers_in(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, zk_server: LocalZooKeeper, namespace: str
) -> None:
    a = sidecars("a", lock_timeout="1s")
    b = sidecars("b", lock_timeout="20s")
    await put(http, a.url, "locked", b"before")
    await get_hit(http, a.url, "locked")
    holder = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(holder.start, 10)
    try:
        # Another writer holds the key's lock: its ephemeral znode exists.
        lock_path = Layout(f"/zkcache/{namespace}").lock_path("locked")
        await asyncio.to_thread(holder.create, lock_path, b"someone-else", ephemeral=True, makepath=True)
        status, problem = await problem_of(http, "PUT", a.url + "/v1/keys/locked", data=b"after")
        assert status == 503 and str(problem["type"]).endswith("lock-timeout")
        assert (await get_hit(http, a.url, "locked"))[2] == b"before", "a timed-out write changed something"

        # A writer waiting on the lock gets in as soon as the holder's session ends.
        waiting = asyncio.ensure_future(put(http, b.url, "locked", b"after"))
        await eventually(lambda: b.stats()["writes_in_progress"] == 1, what="B waiting for the lock")
        assert not waiting.done()
        await asyncio.to_thread(holder.stop)
        started = time.monotonic()
        assert (await asyncio.wait_for(waiting, 10))[0] == 200
        assert time.monotonic() - started < 5, "the waiter was not woken by the lock's deletion"
        assert (await get(http, a.url, "locked"))[2] == b"after"
    finally:
        await asyncio.to_thread(holder.stop)
        await asyncio.to_thread(holder.close)


async def test_version_bump_failing_after_the_origin_write(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    """ZooKeeper goes away between A's origin write and its version bump: A answers
    503 invalidation-not-published, keeps retrying, and the fleet converges once
    ZooKeeper is back. B never serves the old value meanwhile (the intent)."""
    origin = upstream + "/kv"
    a = sidecars("a", zk=zk_private.hosts, origin=origin, lock_timeout="2s")
    b = sidecars("b", zk=zk_private.hosts, origin=origin, suspended_grace="0s")
    await put(http, a.url, "bump", b"old")
    await get_hit(http, b.url, "bump")
    async with held_origin_put(http, upstream, "bump") as until_held:
        write = asyncio.create_task(problem_of(http, "PUT", a.url + "/v1/keys/bump", data=b"new"))
        await until_held()
        await asyncio.to_thread(zk_private.stop)
    status, problem = await write
    assert status == 503 and str(problem["type"]).endswith("invalidation-not-published"), problem
    assert (await get(http, b.url, "bump"))[2] == b"new"  # the intent had dropped B's copy

    await asyncio.to_thread(zk_private.start)
    await eventually(lambda: a.is_ready() and b.is_ready(), timeout=20, what="both sidecars back")
    status, _, value, _ = await get_hit(http, b.url, "bump")  # cacheable again: the late bump cleared the intent
    assert (status, value) == (200, b"new")


async def test_concurrent_acknowledged_invalidations_all_complete_and_the_sidecar_stops_cleanly(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Hole 3: acknowledgements waited for each other, so concurrent ?wait=true
    calls timed out (504) and a stop then took the whole shutdown timeout."""
    nodes = [sidecars("a", shutdown_timeout="8s"), sidecars("b"), sidecars("c")]
    await put(http, nodes[0].url, "ack/1", b"v")

    async def invalidate(i: int) -> int:
        body = [{"keys": ["ack/1"]}, {"prefixes": ["ack/"]}, {"all": True}][i % 3]
        url = f"{nodes[i % 3].url}/v1/invalidate?wait=true&timeout=5"
        async with http.post(url, json=body) as resp:
            return resp.status

    statuses = await asyncio.gather(*(invalidate(i) for i in range(13)))
    assert statuses == [200] * 13, statuses
    started = time.monotonic()
    assert nodes[0].stop(timeout=15) == 0, "SIGTERM did not exit cleanly"
    assert time.monotonic() - started < 5, "the stop waited for stuck acknowledgements"


async def test_a_failed_acknowledgement_does_not_flush_the_cache(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    """Hole 7: any failed namespace task flushed everything. Here A cannot write
    its member znode, so its acknowledgement fails: A is named as not having
    confirmed, and keeps its cache (nothing about coherence was lost)."""
    a, b = sidecars("a"), sidecars("b")
    for key in ("keep/1", "keep/2"):
        await put(http, b.url, key, b"v1")
        await get_hit(http, a.url, key)
    layout = Layout(f"/zkcache/{namespace}")
    admin = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(admin.start, 10)
    try:
        read_only = [ACL(Permissions.READ | Permissions.ADMIN, ANYONE_ID_UNSAFE)]  # ADMIN: to undo it
        await asyncio.to_thread(admin.set_acls, layout.member_path("a"), read_only)
        async with http.post(f"{b.url}/v1/invalidate?wait=true&timeout=2", json={"keys": ["other"]}) as resp:
            assert resp.status == 504 and (await resp.json(content_type=None))["not_confirmed"] == ["a"]
        stats = a.stats()
        assert stats["flushes"] == 0 and stats["entries"] == 2, "a failed acknowledgement flushed the cache"
        assert a.is_ready() and (await get(http, a.url, "keep/1"))[1] == "hit"
        await asyncio.to_thread(admin.set_acls, layout.member_path("a"), OPEN_ACL_UNSAFE)
        async with http.post(f"{b.url}/v1/invalidate?wait=true&timeout=5", json={"keys": ["keep/2"]}) as resp:
            assert resp.status == 200
        assert a.stats()["entries"] == 1
    finally:
        await asyncio.to_thread(admin.stop)
        await asyncio.to_thread(admin.close)


async def test_prefix_entries_trimmed_while_cut_off_flush_even_after_an_empty_first_look(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str, sqlite_url: str
) -> None:
    """Hole 9: A's first look at the prefix log found it empty; while A was cut
    off, a prefix entry covering A's key came and was trimmed away. A cannot
    know its prefix, so it must flush rather than keep serving the key."""
    proxy = TcpProxy(zk_server.host, zk_server.port)
    proxy.start()
    admin = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(admin.start, 10)
    try:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="6s", suspended_grace="0s")
        b = sidecars("b")
        await put(http, b.url, "x/1", b"v1")
        await get_hit(http, a.url, "x/1")
        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A noticing the partition")
        change_origin_behind_the_cache(sqlite_url, "x/1", b"v2")
        layout = Layout(f"/zkcache/{namespace}")
        path = await asyncio.to_thread(admin.create, layout.prefix_entry_base("x/"), b"{}", sequence=True)
        await asyncio.to_thread(admin.delete, path)  # trimmed before A saw it
        proxy.heal()
        a.wait_ready(20)
        assert a.stats()["zookeeper"]["sessions"] == 1, "same session expected"
        assert (await get(http, a.url, "x/1"))[2] == b"v2", "A kept a key whose prefix invalidation it never saw"
    finally:
        proxy.stop()
        await asyncio.to_thread(admin.stop)
        await asyncio.to_thread(admin.close)


async def test_a_second_loss_during_revalidation_does_not_restart_the_grace(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Hole 10: the grace counted from the latest loss, so entries never
    re-checked since the first loss were served again after a second one."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s", suspended_grace="2s")
        b = sidecars("b")
        await put(http, b.url, "g/1", b"v1")
        await get_hit(http, a.url, "g/1")
        proxy.cut()

        async def past_grace() -> bool:
            return (await get(http, a.url, "g/1"))[1] == "bypass"

        await eventually(past_grace, what="A's grace running out")
        await put(http, b.url, "g/1", b"v2")  # A cannot hear about this
        proxy.heal()
        proxy.delay(0.4)  # after heal (which resets it): the setup is still under way below

        await eventually(a.setting_up, timeout=15, what="A reconnected and setting up")
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing the link again")
        _, source, value, _ = await get(http, a.url, "g/1")
        assert source != "hit", f"served {value!r} from an entry not re-checked since the first loss"


async def test_a_miss_in_flight_when_the_link_drops_reads_the_origin(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Hole 11: with suspended_reads = origin, a miss whose exists was lost
    with the connection answered 503 instead of reading the origin."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s", suspended_reads="origin")
        b = sidecars("b")
        await put(http, b.url, "m/1", b"v1")
        proxy.blackhole()  # the exists below goes out and is never answered
        read = asyncio.ensure_future(get(http, a.url, "m/1"))
        await eventually(lambda: a.stats()["fills_in_flight"] == 1, what="A's miss waiting on ZooKeeper")
        proxy.cut()  # now the connection drops under it
        status, source, value, _ = await asyncio.wait_for(read, 10)
        assert (status, source, value) == (200, "bypass", b"v1")


async def test_a_fill_in_flight_when_a_prefix_invalidation_arrives_is_never_installed(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    """Which prefixes a prefix-log event names is known only after re-reading
    the log, a round trip later.  A fill that read the origin before the
    invalidation and ends within that round trip must not be installed: the
    event itself voids every fill in flight.

    B's link has one second of latency each way, so B hears of the event one
    second after it was published and applies it two seconds after that; the
    fill ends in between.
    """
    origin = upstream + "/kv"
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", origin=origin)
        b = sidecars("b", origin=origin, zk=proxy.address, zk_session_timeout="30s")
        await put(http, a.url, "pv/1", b"v1")
        await get_hit(http, a.url, "pv/1")  # A's post-write refill is done: only B reads below
        proxy.delay(1.0)
        async with http.post(f"{upstream}/_control/hold/pv/1"):
            pass
        reader = asyncio.create_task(get(http, b.url, "pv/1"))  # a miss: watch armed, origin read held (v1)

        async def held() -> bool:
            async with http.get(f"{upstream}/_control/held/pv/1") as resp:
                return bool((await resp.json())["held"] == 1)

        await eventually(held, timeout=15, what="B's origin read being held")
        async with http.put(f"{origin}/pv/1", data=b"v2"):  # another application, behind the caches
            pass
        applied = b.stats()["invalidations_received"]
        published = time.monotonic()
        async with http.post(a.url + "/v1/invalidate", json={"prefixes": ["pv/"]}) as resp:
            assert resp.status == 202
        await asyncio.sleep(max(0.0, published + 1.5 - time.monotonic()))  # B has the event, not the entries
        async with http.post(f"{upstream}/_control/release/pv/1"):
            pass
        status, source, value, _ = await reader
        assert (status, source, value) == (200, "miss", b"v1")  # it began before the invalidation: allowed
        status, source, value, _ = await get(http, b.url, "pv/1", headers={"Cache-Control": "only-if-cached"})
        assert b.stats()["invalidations_received"] == applied, (
            "B applied the prefix entry already: the test's timing did not hold (a loaded machine?)"
        )
        assert status == 504, f"B installed {value!r}, read before the prefix invalidation it had been told of"


# -- writes during recovery ------------------------------------------------
# A write needs a live session (its lock is an ephemeral znode of it, every
# step is a conditional transaction), not a restored cache: it works as soon
# as ZooKeeper answers, and waits up to lock_timeout for that.


async def test_writes_work_while_the_watches_are_being_restored(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A sidecar that reconnected and is still setting up takes writes; the
    fleet sees them, and so does the writer: it dropped its own entry, so a
    second loss within the first loss's grace does not bring the old value
    back, and once ready it serves the new one and keeps the other entries."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        # A long grace, so that it still runs after the second cut below.
        a = sidecars("a", zk=proxy.address, zk_session_timeout="24s", suspended_grace="8s")
        b = sidecars("b")
        for i in range(20):
            await put(http, b.url, f"r/{i}", b"v1")
            await get_hit(http, a.url, f"r/{i}")
        await get_hit(http, b.url, "r/0")
        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A losing its link")
        proxy.heal()
        proxy.delay(0.2)  # after heal (which resets it): A's setup takes several round trips

        await eventually(a.setting_up, timeout=15, what="A reconnected and setting up")
        async with http.put(a.url + "/v1/keys/r/0", data=b"v2") as resp:
            body = await resp.text()
            assert resp.status == 200, f"a write through a sidecar setting up: {resp.status} {body}"
            version = resp.headers["ETag"]

        proxy.cut()  # a second loss, within the first one's grace: A may serve what it has cached
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing its link again")
        status, source, value, _ = await get(http, a.url, "r/0")
        assert (status, value) == (200, b"v2"), f"A acknowledged v2, then served {source} {value!r}"
        assert (await get(http, a.url, "r/1"))[1] == "hit", "within the grace A should still serve r/1"

        async def b_serves_it() -> bool:
            status, _, value, headers = await get(http, b.url, "r/0")
            return (status, value, headers.get("ETag")) == (200, b"v2", version)

        await eventually(b_serves_it, what="B serving A's write")
        proxy.heal()
        a.wait_ready(30)
        assert (await get(http, a.url, "r/0"))[2] == b"v2"
        for i in range(1, 20):
            assert (await get(http, a.url, f"r/{i}"))[1] == "hit", f"r/{i} should have survived the restore"


async def test_a_write_waits_for_the_reconnect_instead_of_failing(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A write that arrives while the connection is down (a server restarting
    in an ensemble, a brief partition) waits for the reconnect, up to
    lock_timeout, instead of answering 503 at once."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s", lock_timeout="10s")
        b = sidecars("b")
        await put(http, a.url, "w/1", b"v1")
        await get_hit(http, b.url, "w/1")
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing its link")
        write = asyncio.ensure_future(put(http, a.url, "w/1", b"v2"))
        await eventually(lambda: a.stats()["writes_in_progress"] == 1, what="A's write waiting")
        assert not write.done(), f"answered while the link was down: {write.result() if write.done() else ''}"
        proxy.heal()
        status, body, _ = await asyncio.wait_for(write, 15)
        assert status == 200, f"the write that waited for the reconnect: {status} {body}"

        async def b_serves_it() -> bool:
            return (await get(http, b.url, "w/1"))[2] == b"v2"

        await eventually(b_serves_it, what="B serving the write A made once reconnected")


async def test_a_write_whose_client_went_away_before_it_took_the_lock_is_dropped(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """Review finding: a client gives up on a PUT through A while A waits for
    a connection, and writes through B instead (200).  A's write had done
    nothing yet; when A reconnects it must not run, or it would overwrite
    the acknowledged value."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s", lock_timeout="10s")
        b = sidecars("b")
        assert (await put(http, b.url, "k", b"v0"))[0] == 200
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing its link")
        with pytest.raises(TimeoutError):
            async with http.put(a.url + "/v1/keys/k", data=b"abandoned", timeout=aiohttp.ClientTimeout(total=1)):
                pass
        status, body, _ = await put(http, b.url, "k", b"acknowledged")
        assert status == 200, body
        proxy.heal()
        await eventually(lambda: a.stats()["writes_in_progress"] == 0, timeout=15, what="A's write ending")
        a.wait_ready(20)
        db = sqlite3.connect(sqlite_path(sqlite_url))
        (stored,) = db.execute("SELECT value FROM kv WHERE key = ?", ("k",)).fetchone()
        db.close()
        assert stored == b"acknowledged", f"a write abandoned by its client landed after a later one: {stored!r}"
        _, _, value, _ = await get(http, b.url, "k", params={"consistency": "strong"})
        assert value == b"acknowledged"


async def test_sigterm_answers_writes_waiting_for_a_connection_and_exits_in_time(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Review finding: a write waiting for ZooKeeper held the HTTP drain up
    (aiohttp waits its shutdown timeout twice) and the client got a cut
    connection.  Now it answers 503 write-abandoned as the stop begins, and
    the process exits within shutdown_timeout."""
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s", lock_timeout="30s", shutdown_timeout="4s")
        await put(http, a.url, "s/1", b"v1")
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing its link")
        write = asyncio.ensure_future(problem_of(http, "PUT", a.url + "/v1/keys/s/1", data=b"v2"))
        await eventually(lambda: a.stats()["writes_in_progress"] == 1, what="A's write waiting")
        assert a.proc is not None
        started = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        status, problem = await asyncio.wait_for(write, 10)
        assert status == 503 and str(problem["type"]).endswith("write-abandoned"), problem
        assert time.monotonic() - started < 1.5, "the waiting write was answered only after the drain"
        code = await asyncio.to_thread(a.proc.wait, 10)
        assert code == 0 and time.monotonic() - started < 4.5, f"exit {code} after {time.monotonic() - started:.1f}s"


async def test_while_it_sets_up_again_a_sidecar_serves_hits_only_within_the_grace(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Until its watches are restored, a reconnected sidecar serves what it
    cached for the grace counted from the first loss (as when disconnected),
    instead of sending every read to the origin; past the grace, no hit."""
    grace = 4.0
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="12s", suspended_grace=f"{grace:g}s")
        b = sidecars("b")
        await put(http, b.url, "g/1", b"v1")
        await get_hit(http, a.url, "g/1")
        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A losing its link")
        lost_at = time.monotonic()
        proxy.heal()
        proxy.delay(0.5)  # after heal (which resets it): A's setup takes many seconds
        await eventually(a.setting_up, timeout=10, what="A reconnected and setting up")
        assert time.monotonic() - lost_at < grace - 0.5, "A took too long to reconnect for this test"
        status, source, value, _ = await get(http, a.url, "g/1")
        assert (status, source, value) == (200, "hit", b"v1"), "within the grace, a sidecar setting up serves hits"

        await asyncio.sleep(max(0.0, lost_at + grace + 0.2 - time.monotonic()))
        _, source, _, _ = await get(http, a.url, "g/1")
        assert a.setting_up(), "A finished its setup before the grace ran out; the check below means nothing"
        assert source == "bypass", f"past the grace, a sidecar still setting up served a {source}"


async def test_a_loss_noticed_late_still_bounds_hits_by_the_last_answer(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A frozen process notices its lost connection only when it wakes.  Its
    watches were gone since ZooKeeper last answered, so whatever state it is
    in next (here: connected again and setting up, which serves hits within
    the grace), no hit may come later than lease + grace after that answer
    (at most one session timeout, as the README says)."""
    session, grace = 15.0, 5.0
    lease = session * 2 / 3
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout=f"{session:g}s", suspended_grace=f"{grace:g}s")
        b = sidecars("b")
        for key in ("f/changed", "f/same"):
            await put(http, b.url, key, b"v1")
            await get_hit(http, a.url, key)
        await get(http, a.url, "f/absent")  # a miss: ZooKeeper answers A just now
        heard = time.monotonic()
        a.pause()
        proxy.cut()  # nothing B does reaches A now
        await put(http, b.url, "f/changed", b"v2")
        await asyncio.sleep(heard + lease + 2.0 - time.monotonic())  # frozen past the lease, not past the session
        proxy.heal()
        proxy.delay(0.5)  # A's setup takes many seconds
        a.resume()
        await eventually(a.setting_up, timeout=5, what="A reconnected in the same session, setting up")
        assert (await get(http, a.url, "f/same"))[1] == "hit", "within lease + grace of the last answer: hits"
        await asyncio.sleep(max(0.0, heard + lease + grace + 0.5 - time.monotonic()))
        _, source, value, _ = await get(http, a.url, "f/changed")
        assert a.setting_up(), "A finished its setup early; the check below means nothing"
        assert value == b"v2", f"{source} {value!r} more than lease + grace after A last heard from ZooKeeper"
