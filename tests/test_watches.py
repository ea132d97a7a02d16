"""Watches bounded by the cache (issue #11): a key's watch lives as long as its entry or fill.

Real sidecar processes on a real ZooKeeper; the judge is the server's own
list of the watches each session holds (``wchc``), not the sidecar's count.
"""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest
from kazoo.client import KazooClient

from harness import LocalZooKeeper, SidecarProcess, TcpProxy
from sidecar.coordination import Layout
from tests.conftest import SidecarFactory, eventually, member_ids
from tests.test_coherence import get, get_hit, put

pytestmark = pytest.mark.slow


def key_watches_in_zookeeper(zk: LocalZooKeeper, sidecar: SidecarProcess, namespace: str) -> set[str]:
    """The version znodes the server holds a watch on for ``sidecar``'s session."""
    session = int(sidecar.stats()["zookeeper"]["session"], 16)
    versions = Layout(f"/zkcache/{namespace}").versions + "/"
    return {p for p in zk.watched_paths(session) if p.startswith(versions)}


def version_paths(namespace: str, keys: list[str]) -> set[str]:
    layout = Layout(f"/zkcache/{namespace}")
    return {layout.version_path(k) for k in keys}


async def settled(zk: LocalZooKeeper, sidecar: SidecarProcess, namespace: str, expected: set[str]) -> None:
    """Wait until the server's watches for ``sidecar`` are exactly ``expected`` (removals are pipelined)."""

    def check() -> bool:
        return key_watches_in_zookeeper(zk, sidecar, namespace) == expected

    try:
        await eventually(check, timeout=10, what="the server's key watches")
    except AssertionError:
        held = key_watches_in_zookeeper(zk, sidecar, namespace)
        raise AssertionError(
            f"ZooKeeper holds {len(held)} key watches for the sidecar, expected {len(expected)}: "
            f"{len(held - expected)} extra, e.g. {sorted(held - expected)[:3]}; "
            f"{len(expected - held)} missing, e.g. {sorted(expected - held)[:3]}"
        ) from None


async def test_reads_of_absent_keys_leave_no_watches(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    a = sidecars("a")
    for batch in range(4):
        replies = await asyncio.gather(*(get(http, a.url, f"absent/{batch}-{i}") for i in range(50)))
        assert {status for status, *_ in replies} == {404}
    await settled(zk_server, a, namespace, set())
    assert a.stats()["zookeeper"]["key_watches"] == 0


async def test_evicted_entries_give_up_their_watches_and_cached_ones_keep_them(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    a, b = sidecars("a", max_entries="20"), sidecars("b")
    keys = [f"lru/{i:03d}" for i in range(100)]
    for key in keys:
        assert (await put(http, b.url, key, b"v1"))[0] == 200
    for key in keys:  # in order: the last 20 stay cached
        assert (await get(http, a.url, key))[0] == 200
    cached = keys[-20:]
    assert a.stats()["entries"] == 20
    await settled(zk_server, a, namespace, version_paths(namespace, cached))

    # The watches kept are the ones that work: a write through B reaches A.
    for key in cached:
        assert (await put(http, b.url, key, b"v2"))[0] == 200
    for key in cached:
        await sees(http, a, key, b"v2")
    # Re-reading an evicted key arms its watch again, and it works.
    await get_hit(http, a.url, keys[0])
    assert version_paths(namespace, [keys[0]]) <= key_watches_in_zookeeper(zk_server, a, namespace)
    assert (await put(http, b.url, keys[0], b"v2"))[0] == 200
    await sees(http, a, keys[0], b"v2")


async def sees(http: aiohttp.ClientSession, sidecar: SidecarProcess, key: str, value: bytes) -> None:
    async def check() -> bool:
        return (await get(http, sidecar.url, key))[2] == value

    await eventually(check, what=f"{sidecar.name} serving {value!r} for {key} (its watch fired)")


async def test_invalidate_all_and_prefix_invalidations_remove_the_watches(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    a = sidecars("a")
    keys = [f"p/{i}" for i in range(10)] + [f"q/{i}" for i in range(10)]
    for key in keys:
        assert (await put(http, a.url, key, b"v"))[0] == 200
    for key in keys:
        await get_hit(http, a.url, key)
    await settled(zk_server, a, namespace, version_paths(namespace, keys))
    async with http.post(a.url + "/v1/invalidate?wait=true", json={"prefixes": ["p/"]}) as resp:
        assert resp.status == 200
    await settled(zk_server, a, namespace, version_paths(namespace, keys[10:]))
    async with http.post(a.url + "/v1/invalidate?wait=true", json={"all": True}) as resp:
        assert resp.status == 200
    await settled(zk_server, a, namespace, set())


async def test_a_lease_that_is_never_filled_leaves_no_watch(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    a = sidecars("a", origin="none")
    for i in range(30):
        status, _, _, headers = await get(http, a.url, f"lease/{i}")
        assert status == 404 and "ETag" in headers  # a lease
    await settled(zk_server, a, namespace, set())
    # A fill under the lease still works (it arms its own watch) and is watched.
    status, _, _, headers = await get(http, a.url, "lease/0")
    async with http.put(
        a.url + "/v1/keys/lease/0?fill=true", data=b"filled", headers={"If-Match": headers["ETag"]}
    ) as resp:
        assert resp.status == 200
    await settled(zk_server, a, namespace, version_paths(namespace, ["lease/0"]))


def packets_received(zk: LocalZooKeeper) -> int:
    return int(zk.mntr()["zk_packets_received"])


async def only_if_cached(http: aiohttp.ClientSession, sidecar: SidecarProcess, key: str) -> tuple[int, bytes]:
    status, _, value, _ = await get(http, sidecar.url, key, headers={"Cache-Control": "only-if-cached"})
    return status, value


async def test_a_reconnect_restores_every_watch_in_one_go_and_drops_exactly_what_changed(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    """Same session, new connection: setWatches, not one exists per cached key.

    500 keys cached on A; 10 change while A is cut off.  After the heal A
    serves the 490 others from its cache (watched again: a later write still
    reaches it) and the 10 from the origin, and ZooKeeper received a few
    dozen packets for all of it, not 500.
    """
    with TcpProxy(zk_private.host, zk_private.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="20s")
        b = sidecars("b", zk=zk_private.hosts)
        keys = [f"r/{i:03d}" for i in range(500)]
        for batch in range(0, len(keys), 50):
            replies = await asyncio.gather(*(put(http, b.url, k, b"v1") for k in keys[batch : batch + 50]))
            assert {r[0] for r in replies} == {200}
        for batch in range(0, len(keys), 50):
            await asyncio.gather(*(get(http, a.url, k) for k in keys[batch : batch + 50]))
        assert a.stats()["entries"] == 500
        changed, kept = keys[:10], keys[10:]

        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A noticing the cut")
        for key in changed:
            assert (await put(http, b.url, key, b"v2"))[0] == 200
        before = packets_received(zk_private)
        proxy.heal()
        a.wait_ready(20)
        sent = packets_received(zk_private) - before
        assert a.stats()["zookeeper"]["sessions"] == 1, "the session was expected to survive"

        for key in changed:
            assert (await only_if_cached(http, a, key))[0] == 504, f"A kept {key}, changed while it was away"
            assert (await get(http, a.url, key))[2] == b"v2"
        for key in kept:
            assert await only_if_cached(http, a, key) == (200, b"v1"), f"A lost {key}, which did not change"
        assert sent < 60, f"ZooKeeper received {sent} packets while A reconnected with 500 cached keys"
        await settled(zk_private, a, namespace, version_paths(namespace, keys))
        assert (await put(http, b.url, kept[-1], b"v3"))[0] == 200  # the restored watch works
        await sees(http, a, kept[-1], b"v3")


async def test_a_second_loss_during_the_restore_still_drops_what_changed_before_it(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The restore counts from the first loss: a change made during the first
    cut must still be found after a second cut that interrupted the restore
    (the second connection's replies carry zxids past that change)."""
    with TcpProxy(zk_private.host, zk_private.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="20s")
        b = sidecars("b", zk=zk_private.hosts)
        for key in ("s/1", "s/2", "s/3"):
            assert (await put(http, b.url, key, b"v1"))[0] == 200
            await get_hit(http, a.url, key)
        proxy.cut()
        await eventually(lambda: not a.is_ready(), what="A noticing the first cut")
        assert (await put(http, b.url, "s/1", b"v2"))[0] == 200  # during the first cut
        proxy.heal()
        proxy.delay(0.3)  # after heal (which resets it): the setup takes several slow round trips

        await eventually(a.setting_up, timeout=15, what="A reconnected and setting up")
        await asyncio.sleep(0.7)  # a few of the setup's round trips (with their zxids) are through
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing the link again")
        assert (await put(http, b.url, "s/2", b"v2"))[0] == 200  # during the second cut
        proxy.heal()
        a.wait_ready(20)
        assert a.stats()["zookeeper"]["sessions"] == 1, "the session was expected to survive"
        assert (await only_if_cached(http, a, "s/1"))[0] == 504, "A kept s/1, changed during the first cut"
        assert (await only_if_cached(http, a, "s/2"))[0] == 504, "A kept s/2, changed during the second cut"
        assert await only_if_cached(http, a, "s/3") == (200, b"v1")


async def test_after_a_session_expiry_the_new_session_keeps_exactly_the_unchanged_entries(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    """A partition longer than the session timeout: A's session expires while
    B writes some keys and invalidates a prefix (acknowledged: A is no longer
    a member).  A's new session restores its watches by zxid and applies the
    prefix log from the baseline it kept: it drops exactly what changed,
    keeps the rest, and refuses a lease it handed out before the expiry."""
    with TcpProxy(zk_private.host, zk_private.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="2s", fills="allow")
        b = sidecars("b", zk=zk_private.hosts)
        keys = [f"e/{i:03d}" for i in range(200)] + [f"pfx/{i}" for i in range(5)]
        for key in keys:
            assert (await put(http, b.url, key, b"v1"))[0] == 200
        for key in keys:
            assert (await get(http, a.url, key))[0] == 200
        assert a.stats()["entries"] == len(keys)
        status, _, _, headers = await get(http, a.url, "pfx/lease?fill=true")  # a cache-aside lease
        assert status == 404
        lease = headers["ETag"]
        first_session = a.stats()["zookeeper"]["session"]

        proxy.cut()
        await eventually(
            lambda: "a" not in member_ids(zk_private.hosts, namespace),
            timeout=15,
            interval=0.2,
            what="ZooKeeper expiring A's session",
        )
        changed = keys[:7]
        for key in changed:
            assert (await put(http, b.url, key, b"v2"))[0] == 200
        async with http.post(b.url + "/v1/invalidate?wait=true", json={"prefixes": ["pfx/"]}) as resp:
            assert resp.status == 200  # A is not a member any more: not waited for
        proxy.heal()
        await eventually(
            lambda: a.stats()["zookeeper"]["sessions"] == 2 and a.is_ready(), timeout=20, what="A's new session"
        )
        assert a.stats()["zookeeper"]["session"] != first_session
        for key in changed + [k for k in keys if k.startswith("pfx/")]:
            assert (await only_if_cached(http, a, key))[0] == 504, f"A kept {key}, changed or invalidated meanwhile"
        kept = [k for k in keys[7:] if not k.startswith("pfx/")]
        for key in kept:
            assert await only_if_cached(http, a, key) == (200, b"v1"), f"A lost {key}, which did not change"
        assert a.stats()["flushes"] == 0
        async with http.put(a.url + "/v1/keys/pfx/lease?fill=true", data=b"old", headers={"If-Match": lease}) as resp:
            assert resp.status == 412, "a lease from before the expiry survived a prefix invalidation"
        await settled(zk_private, a, namespace, version_paths(namespace, kept))
        assert (await put(http, b.url, kept[0], b"v3"))[0] == 200  # restored in the new session, and working
        await sees(http, a, kept[0], b"v3")


async def test_a_sidecar_frozen_past_its_session_serves_nothing_cached_from_before_even_if_its_new_session_flaps(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession, namespace: str
) -> None:
    """A frozen process hears of its loss only when it wakes, and the grace
    would count from then; but its session died long before, and writes were
    acknowledged without it.  After LOST no grace is left: a flap of the new
    session during its setup must not serve the entry cached before."""
    with TcpProxy(zk_private.host, zk_private.port) as proxy:
        a = sidecars("a", zk=proxy.address, zk_session_timeout="9s")  # grace: 3 s
        b = sidecars("b", zk=zk_private.hosts)
        assert (await put(http, b.url, "k", b"v1"))[0] == 200
        await get_hit(http, a.url, "k")
        first = a.stats()["zookeeper"]["session"]
        a.pause()
        try:
            await eventually(
                lambda: "a" not in member_ids(zk_private.hosts, namespace),
                timeout=30,
                interval=0.3,
                what="ZooKeeper expiring A's session",
            )
            assert (await put(http, b.url, "k", b"v2"))[0] == 200  # acknowledged: A is not a member
            proxy.delay(0.15)  # the new session's setup takes several slow round trips
        finally:
            a.resume()

        await eventually(
            lambda: a.setting_up(other_than_session=first), timeout=20, what="A's new session connected, not ready"
        )
        await asyncio.sleep(0.5)  # a reply or two of the new session: A has heard from ZooKeeper again
        proxy.cut()
        await eventually(lambda: a.stats()["zookeeper"]["state"] == "suspended", what="A losing the link again")
        status, value = await only_if_cached(http, a, "k")
        assert status == 504, f"A served {value!r} from its cache, after B's acknowledged write of v2"


async def test_after_zookeeper_lost_its_data_invalidations_still_reach_the_sidecars(
    zk_private: LocalZooKeeper, sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """ZooKeeper comes back empty (a wiped volume; a restore from an old
    backup): every session is LOST, and the namespace's znodes start a new
    history, behind the baselines the sidecars kept.  Compared with those,
    new prefix invalidations would look old and be ignored: the sidecars
    must start over (flush, new baselines)."""
    a = sidecars("a", zk=zk_private.hosts)
    b = sidecars("b", zk=zk_private.hosts)
    for i in range(5):  # some history in the prefix log
        async with http.post(b.url + "/v1/invalidate", json={"prefixes": [f"x{i}/"]}) as resp:
            assert resp.status == 202
    first = a.stats()["zookeeper"]["session"]
    zk_private.stop()
    shutil.rmtree(zk_private.data_dir / "data" / "version-2", ignore_errors=True)
    zk_private.start()
    admin = KazooClient(hosts=zk_private.hosts)
    await asyncio.to_thread(admin.start, 10)
    try:
        await asyncio.to_thread(admin.ensure_path, "/scratch")

        async def both_back() -> bool:
            # kazoo will not reconnect to a server behind the zxid it saw: push the new history past it.
            for _ in range(50):
                await asyncio.to_thread(admin.set, "/scratch", b"x")
            return a.is_ready() and b.is_ready()

        await eventually(both_back, timeout=60, interval=0.05, what="both sidecars in new sessions")
    finally:
        await asyncio.to_thread(admin.stop)
        await asyncio.to_thread(admin.close)
    assert a.stats()["zookeeper"]["session"] != first
    assert (await put(http, b.url, "p/1", b"v1"))[0] == 200
    await get_hit(http, a.url, "p/1")
    async with http.post(b.url + "/v1/invalidate?wait=true", json={"prefixes": ["p/"]}) as resp:
        assert resp.status == 200
    status, value = await only_if_cached(http, a, "p/1")
    assert status == 504, f"A still serves {value!r} after an acknowledged prefix invalidation"
