"""Races found by the hostile review of the housekeeping change (issue #12), each a test.

Real ZooKeeper, real kazoo, real sidecar processes; where a test needs one
step between two of a request's own (a retirement between an If-Match read
and its lock), the sidecar under test runs in this process and the step is
interposed at that boundary.  Each failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import RawTestServer, TestClient
from kazoo.client import KazooClient

from harness import LocalZooKeeper, TcpProxy
from sidecar.app import open_service
from sidecar.config import load_config
from sidecar.coordination import Layout, ZkSession
from sidecar.coordination.election import Election, NotLeader
from sidecar.coordination.lock import acquire_write_lock
from sidecar.errors import CoordinationError
from sidecar.http_api import Api
from sidecar.origins.sqlite import sqlite_path
from sidecar.service import CacheService
from tests.conftest import SidecarFactory, eventually, held_origin_put
from tests.test_coherence import get, put
from tests.test_write_fencing import _expire_a_during_its_origin_write

pytestmark = pytest.mark.slow


def _zk_get(hosts: str, path: str) -> tuple[bytes, Any]:
    client = KazooClient(hosts=hosts)
    client.start(10)
    try:
        return client.get(path)  # type: ignore[no-any-return]
    finally:
        client.stop()
        client.close()


def _zk_exists(hosts: str, path: str) -> bool:
    client = KazooClient(hosts=hosts)
    client.start(10)
    try:
        return client.exists(path) is not None
    finally:
        client.stop()
        client.close()


# -- an intent kept on purpose is never repaired ------------------------------------------
@contextlib.asynccontextmanager
async def _write_left_in_flight(http: aiohttp.ClientSession, upstream: str, url: str, key: str) -> AsyncIterator[None]:
    """``key`` written (v0), then a write of v1 that the upstream holds before storing it: the
    sidecar at ``url`` answers 504 and keeps the intent on purpose (its outcome is unknown).
    The upstream stores v1, late, when the block ends."""
    assert (await put(http, url, key, b"v0"))[0] == 200
    async with held_origin_put(http, upstream, key, before=True) as until_held:
        status, _, _ = await put(http, url, key, b"v1")
        await until_held()
        assert status == 504  # the upstream has not applied it; it will, late
        yield


async def test_an_intent_kept_because_the_origin_write_timed_out_is_never_repaired(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str, zk_server: LocalZooKeeper
) -> None:
    """The writer answered 504 and kept the intent: the upstream may still apply the PUT.

    Before the fix the housekeeper closed that intent after lock_timeout, b
    cached the old value, and the late PUT then landed with nobody to bump
    the key: b served the old value for good.
    """
    common = {"origin": upstream + "/kv", "origin_timeout": "1s", "lock_timeout": "2s", "housekeeping_interval": "0.2s"}
    a, b = sidecars("a", **common), sidecars("b", **common)
    layout = Layout(f"/zkcache/{namespace}")
    async with _write_left_in_flight(http, upstream, a.url, "k"):
        answered = time.time()
        assert await asyncio.to_thread(_zk_exists, zk_server.hosts, layout.uncertain_path("k")), "no marker"

        def a_round_well_after_the_intent_would_be_dead() -> bool:
            for proc in (a, b):
                hk = proc.stats()["housekeeping"]
                if hk["leader"] and (hk["last_round"] or {}).get("finished_at", 0) > answered + 2 * 2.0 + 0.5:
                    return True
            return False

        await eventually(a_round_well_after_the_intent_would_be_dead, timeout=15, what="rounds past lock_timeout")
        data, _ = await asyncio.to_thread(_zk_get, zk_server.hosts, layout.version_path("k"))
        assert data == b"", f"the kept intent was closed: {data!r}"
        for _ in range(2):
            assert (await get(http, b.url, "k"))[1] == "miss", "b cached a key whose write's outcome is unknown"
    # Released: the upstream stores v1 now, and b (which never cached k) reads it.
    await eventually(lambda: _value(http, b.url, "k", b"v1"), what="b reading the late write")


async def _value(http: aiohttp.ClientSession, base: str, key: str, expected: bytes) -> bool:
    return (await get(http, base, key))[2] == expected


# -- in-process service (to interpose between two steps of one request) ---------------------
@pytest.fixture
async def service(zk_server: LocalZooKeeper, namespace: str, tmp_path: Path) -> AsyncIterator[CacheService]:
    cfg = load_config(
        {
            "zk": zk_server.hosts,
            "namespace": namespace,
            "member_id": "inproc",
            "origin": f"sqlite:///{tmp_path / 'origin.db'}",
            "zk_session_timeout": "4s",
            "version_retention": "0.05s",
            "housekeeping_interval": "1h",  # rounds are driven by the test
        },
        env={},
    )
    svc = await open_service(cfg)
    svc.start()
    await eventually(lambda: svc.ready and svc.coord.election.leading, timeout=15, what="service ready and leading")
    yield svc
    await svc.stop()


@pytest.fixture
async def client(service: CacheService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(RawTestServer(Api(service))) as c:
        yield c


async def _retire(service: CacheService, key: str) -> None:
    keeper, layout = service.coord.housekeeper, service.coord.layout

    async def gone() -> bool:
        await keeper.retire((await keeper.scan()).retire)
        return await service.coord.zk.exists(layout.version_path(key)) is None

    await eventually(gone, what=f"{key}'s version znode retired")


# -- R2: If-Match passes on a re-created version znode (data-version ABA) ---------------------
async def test_if_match_with_a_stale_etag_never_overwrites_a_write_made_after_a_retirement(
    service: CacheService,
    client: TestClient[Any, Any],
    sidecars: SidecarFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    b = sidecars("b", origin=f"sqlite:///{tmp_path / 'origin.db'}", housekeeping_interval="1h")
    resp = await client.put("/v1/keys/k", data=b"v0")
    assert resp.status == 200
    stale = resp.headers["ETag"]
    real = service.coord.read_version_for_cas
    between: dict[str, Any] = {}

    async def read_then_interleave(key: str) -> Any:
        result = await real(key)  # (mzxid, data version) of the znode the client's ETag names
        # Between this read and the lock transaction: the housekeeper retires
        # the znode, then b writes the key (create: data version 0, publish: 1).
        await _retire(service, key)
        status, body, _ = await put(http, b.url, key, b"from-b")
        between["b"] = (status, body.get("version"))
        return result

    service.coord.read_version_for_cas = read_then_interleave  # type: ignore[method-assign]
    resp = await client.put("/v1/keys/k", data=b"lost update", headers={"If-Match": stale})
    service.coord.read_version_for_cas = real  # type: ignore[method-assign]
    assert between["b"][0] == 200
    assert resp.status == 412, (
        f"If-Match {stale} (the version before the retirement) was accepted ({resp.status}) over b's write "
        f"{between['b'][1]}: b's acknowledged write is lost"
    )


# -- R3: an invalidation racing a retirement answers 500 -------------------------------------
async def test_an_invalidation_racing_a_retirement_is_not_an_internal_error(
    service: CacheService, client: TestClient[Any, Any]
) -> None:
    assert (await client.put("/v1/keys/old", data=b"v")).status == 200
    zk = service.coord.zk
    path = service.coord.layout.version_path("old")
    real_exists = zk.exists
    fired = False

    async def exists_then_retire(p: str, watch: Any = None) -> Any:
        nonlocal fired
        stat = await real_exists(p, watch)
        if p == path and watch is None and stat is not None and not fired:
            fired = True  # invalidate_key read the stat; the housekeeper deletes it now
            zk.exists = real_exists  # type: ignore[method-assign]
            await _retire(service, "old")
        return stat

    zk.exists = exists_then_retire  # type: ignore[method-assign]
    try:
        resp = await client.post("/v1/invalidate", json={"keys": ["old"]})
    finally:
        zk.exists = real_exists  # type: ignore[method-assign]
    assert fired
    assert resp.status == 202, f"invalidate answered {resp.status}: {await resp.text()}"


# -- R4: a housekeeping_rate under 200 stops every round (and prefix-log trimming) ---------------
def _keys_in_one_top_bucket(n: int) -> list[str]:
    """n keys whose version znodes share the first bucket level and differ in the second."""
    found: dict[str, str] = {}
    i = 0
    while len(found) < n:
        key = f"k{i}"
        digest = hashlib.blake2b(key.encode(), digest_size=2).hexdigest()
        if digest[:2] == "00" and digest[2:] not in found:
            found[digest[2:]] = key
        i += 1
    return list(found.values())


async def test_a_housekeeper_with_a_rate_under_200_still_trims_the_prefix_log(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, zk_server: LocalZooKeeper, namespace: str
) -> None:
    a = sidecars("a", housekeeping_rate="100", housekeeping_interval="0.2s")
    for key in _keys_in_one_top_bucket(120):  # 120 second-level buckets under versions/00
        assert (await put(http, a.url, key, b"v"))[0] == 200
    for start in range(0, 1100, 100):
        async with http.post(
            a.url + "/v1/invalidate", json={"prefixes": [f"p{i}/" for i in range(start, start + 100)]}
        ) as r:
            assert r.status == 202
    client = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(client.start, 10)
    try:

        async def trimmed() -> bool:
            names = await asyncio.to_thread(client.get_children, f"/zkcache/{namespace}/prefixes")
            return len(names) <= 1000

        await eventually(trimmed, timeout=15, what="the prefix log trimmed by a housekeeper with a rate of 100/s")
    finally:
        await asyncio.to_thread(client.stop)
        await asyncio.to_thread(client.close)
    assert a.stats()["housekeeping"]["round_failures"] == 0


# -- R5: the probe calls a write that lands between its two reads a stale hit ---------------------
async def test_the_probe_does_not_call_a_hit_stale_because_of_a_write_during_its_check(
    zk_server: LocalZooKeeper,
    namespace: str,
    tmp_path: Path,
    sidecars: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    url = f"sqlite:///{tmp_path / 'origin.db'}"
    cfg = load_config(
        {"zk": zk_server.hosts, "namespace": namespace, "member_id": "probe", "origin": url,
         "consistency_probe_rate": "1"},
        env={},
    )  # fmt: skip
    svc = await open_service(cfg)
    svc.start()
    b = sidecars("b", origin=url)
    try:
        await eventually(lambda: svc.ready, what="ready")
        async with TestClient(RawTestServer(Api(svc))) as c:
            assert (await put(http, b.url, "k", b"v1"))[0] == 200
            await c.get("/v1/keys/k")  # miss: fills v1
            probe = svc.reads.probe
            assert probe is not None
            inner = probe._origin

            class WriteLandsDuringTheCheck:
                async def get(self, key: str) -> Any:
                    # The probe has read ZooKeeper (v1 current); b's write lands now.
                    assert (await put(http, b.url, "k", b"v2"))[0] == 200
                    return await inner.get(key)

            probe._origin = WriteLandsDuringTheCheck()  # type: ignore[assignment]
            resp = await c.get("/v1/keys/k")
            assert resp.headers["X-Cache"] == "hit" and await resp.read() == b"v1"  # served before b's write
            await eventually(lambda: not probe._tasks, what="the check done")
            assert probe.counts.disagreed == 0, (
                f"a hit served before a write was counted as disagreed (ZkCacheInconsistent fires): {probe.counts}"
            )
    finally:
        await svc.stop()


# -- R6: a miss renders an absent key's ETag from the local copy of `retired` -------------------
async def test_a_conditional_get_never_304s_a_value_that_changed_across_a_retirement(
    service: CacheService, client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """The window is one round trip (the `retired` re-read after its watch event); the
    delay below only widens it so the test is deterministic."""
    db = sqlite3.connect(sqlite_path(service.config.origin))
    db.execute(
        "INSERT OR REPLACE INTO kv (key, value, content_type, updated_at) VALUES ('k', x'6f6c64', 'text/plain', 0)"
    )
    db.commit()
    db.close()
    resp = await client.get("/v1/keys/k")
    assert await resp.read() == b"old"
    before = resp.headers["ETag"]  # the absent version: k has no version znode
    assert (await client.put("/v1/keys/k", data=b"new")).status == 200
    ns = service.coord.namespace
    real = ns.arm_retired

    async def slow_rearm() -> None:
        await asyncio.sleep(0.5)  # stands for the round trip of the re-read
        await real()

    ns.arm_retired = slow_rearm  # type: ignore[method-assign]
    await _retire(service, "k")
    resp = await client.get("/v1/keys/k", headers={"If-None-Match": before})
    assert resp.status == 200, (
        f"If-None-Match {before} (the ETag of 'old', before k was written and retired) answered "
        f"{resp.status} {resp.headers.get('ETag')}: the client keeps 'old' while the origin has 'new'"
    )


# -- second review ------------------------------------------------------------------------
def _common(upstream: str, **extra: str) -> dict[str, str]:
    return {"origin": upstream + "/kv", "origin_timeout": "1s", "lock_timeout": "1s", "housekeeping_interval": "0.2s",
            **extra}  # fmt: skip


async def _rounds_after(procs: list[Any], moment: float) -> bool:
    for proc in procs:
        hk = proc.stats()["housekeeping"]
        if hk["leader"] and (hk["last_round"] or {}).get("finished_at", 0) > moment:
            return True
    return False


async def test_an_intent_kept_by_a_writer_whose_session_expired_midway_is_never_repaired(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str
) -> None:
    """A's session expired during its origin write: its release never ran under its lock, so only a
    marker placed with the lock itself (an origin that applies writes late) can keep the leader off."""
    layout = Layout(f"/zkcache/{namespace}")
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        b = sidecars("b", **_common(upstream))  # leads
        a = sidecars("a", zk=proxy.address, zk_session_timeout="4s", **_common(upstream, origin_timeout="2s"))
        assert (await put(http, b.url, "k", b"v0"))[0] == 200
        async with held_origin_put(http, upstream, "k", before=True) as until_held:
            write = asyncio.ensure_future(put(http, a.url, "k", b"v1"))
            await until_held()
            await _expire_a_during_its_origin_write(http, a, proxy, zk_server.hosts, namespace)
            status, body, _ = await write
            assert status == 504, body
            proxy.heal()
            await asyncio.to_thread(a.wait_ready, 20)
            answered = time.time()
            await eventually(
                lambda: _rounds_after([b], answered + 2.5), timeout=15, what="b's rounds past lock_timeout"
            )
            data, _ = await asyncio.to_thread(_zk_get, zk_server.hosts, layout.version_path("k"))
            assert data == b"", f"the intent of a write whose outcome is unknown was closed: {data!r}"
            for _ in range(2):
                assert (await get(http, b.url, "k"))[1] == "miss"
    await eventually(lambda: _value(http, b.url, "k", b"v1"), what="b reading the late write")


async def test_a_refused_if_none_match_write_never_ends_an_intent_kept_on_purpose(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str
) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    a = sidecars("a", **_common(upstream))
    async with _write_left_in_flight(http, upstream, a.url, "k"):
        status, _, _ = await put(http, a.url, "k", b"other", **{"If-None-Match": "*"})
        assert status == 412  # the origin still has v0
        data, _ = await asyncio.to_thread(_zk_get, zk_server.hosts, layout.version_path("k"))
        assert data == b"", f"a refused If-None-Match write ended the kept intent: {data!r}"
        assert await asyncio.to_thread(_zk_exists, zk_server.hosts, layout.uncertain_path("k"))
        for _ in range(2):
            assert (await get(http, a.url, "k"))[1] == "miss"
    await eventually(lambda: _value(http, a.url, "k", b"v1"), what="a reading the late write")


async def test_an_invalidation_ends_a_kept_intent_with_its_marker_so_a_later_dead_intent_is_repaired(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, namespace: str
) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    a = sidecars("a", **_common(upstream))
    async with _write_left_in_flight(http, upstream, a.url, "k"):
        pass
    # The operator checked the origin and releases the key, as cachectl doctor advises.
    async with http.post(a.url + "/v1/invalidate", json={"keys": ["k"]}) as resp:
        assert resp.status == 202
    assert not await asyncio.to_thread(_zk_exists, zk_server.hosts, layout.uncertain_path("k")), "marker left"
    # Then a writer dies midway (its lock goes with its session; nothing kept it on purpose).
    dead = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(dead.start, 10)
    tx = dead.transaction()
    tx.create(layout.lock_path("k"), b"dead", ephemeral=True)
    tx.set_data(layout.version_path("k"), b"")
    assert not any(isinstance(r, Exception) for r in await asyncio.to_thread(tx.commit))
    await asyncio.to_thread(dead.stop)
    await asyncio.to_thread(dead.close)

    async def repaired() -> bool:
        data, _ = await asyncio.to_thread(_zk_get, zk_server.hosts, layout.version_path("k"))
        return data != b""

    await eventually(repaired, timeout=10, what="the dead writer's intent repaired")


async def test_a_candidate_deleted_under_the_leader_never_passes_the_fence_while_another_leads(
    zk_server: LocalZooKeeper, namespace: str
) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    za, zb = ZkSession(zk_server.hosts, 10.0), ZkSession(zk_server.hosts, 10.0)
    await za.connect(10)
    await zb.connect(10)
    await za.ensure_path(layout.leader)
    ea, eb = Election(za, layout, "a"), Election(zb, layout, "b")
    ea.start()
    await eventually(lambda: ea.leading, what="a leading")
    eb.start()
    await eventually(lambda: eb.node is not None, what="b standing")
    first = ea.node
    assert first is not None
    passed: list[Any] = []
    real_children = za.get_children

    async def children_then_try_a_fenced_write(path: str, *args: Any, **kwargs: Any) -> Any:
        # a's election lists the candidates after standing again: the window.
        if ea.node not in (None, first):
            try:
                tx = za.client.transaction()
                ea.fence(tx)
                tx.set_data(layout.leader, b'{"stale": "a"}')
                results = await za.commit(tx, "probe")
                if not any(isinstance(r, Exception) for r in results):
                    passed.append((ea.node, eb.node, f"b leading: {eb.leading}"))
            except NotLeader:
                pass
        return await real_children(path, *args, **kwargs)

    za.get_children = children_then_try_a_fenced_write  # type: ignore[method-assign]
    try:
        await za.delete(first)  # an operator removes the leader's candidate; its session lives on
        await eventually(lambda: eb.leading, what="b leading")
        await eventually(lambda: ea.node not in (None, first), what="a standing again")
        await eventually(lambda: not ea.leading and eb.leading, what="a following b")
    finally:
        await ea.stop()
        await eb.stop()
        await za.close(5)
        await zb.close(5)
    assert not passed, f"a's fenced write committed while b led (a's node, b's node): {passed}"


async def test_a_release_never_deletes_a_lock_another_writer_took_after_our_session_expired(
    zk_server: LocalZooKeeper, namespace: str
) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    lock_path = layout.lock_path("k")
    other = KazooClient(hosts=zk_server.hosts)
    await asyncio.to_thread(other.start, 10)
    b_session = other.client_id[0]
    try:
        with TcpProxy(zk_server.host, zk_server.port) as proxy:
            za = ZkSession(proxy.address, 4.0)
            await za.connect(10)
            lock = await acquire_write_lock(za, layout, "k", "a", timeout=5)
            first_session = lock.session
            real_exists = za.exists
            fired = False

            async def exists_then_expire(path: str, watch: Any = None) -> Any:
                nonlocal fired
                if path == layout.version_path("k") and not fired:
                    fired = True  # abandon checked the lock was ours; it reads the version now
                    proxy.cut()

                    async def a_expired() -> bool:
                        return await asyncio.to_thread(other.exists, lock_path) is None

                    await eventually(a_expired, timeout=20, what="a's session expired")
                    await asyncio.to_thread(other.create, lock_path, b"b", ephemeral=True)  # b's lock, no intent
                    proxy.heal()
                    await eventually(
                        lambda: za.session_id not in (None, first_session), timeout=20, what="a's new session"
                    )
                return await real_exists(path, watch)

            za.exists = exists_then_expire  # type: ignore[method-assign]
            with contextlib.suppress(CoordinationError):
                await lock.abandon(None)
            assert fired
            stat = await asyncio.to_thread(other.exists, lock_path)
            await za.close(5)
    finally:
        await asyncio.to_thread(other.stop)
        await asyncio.to_thread(other.close)
    assert stat is not None and stat.ephemeralOwner == b_session, (
        "a's release, sent on a's next session, deleted the lock b took after a's session expired"
    )
