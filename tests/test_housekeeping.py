"""Leader election and housekeeping, against a real ZooKeeper and real sidecar processes.

Where a test needs an interleaving at a step boundary (a write between the
scan and the deletes, a request built while leading and sent after being
deposed), the leader is this test process: its own session, election and
:class:`Housekeeper`, stood for election before any sidecar so that it leads,
driven one step at a time.  Everything else is a sidecar process.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from harness import LocalZooKeeper, TcpProxy
from sidecar.coordination import Layout
from sidecar.coordination.election import Election, NotLeader, current_leader
from sidecar.coordination.housekeeping import Candidate, Housekeeper, HousekeepingSettings
from sidecar.coordination.operations import ensure_layout
from sidecar.coordination.session import ZkSession, ZkState
from sidecar.origins.sqlite import sqlite_path
from tests.conftest import SidecarFactory, cachectl, eventually
from tests.test_coherence import get, get_hit, put
from tests.test_housekeeping_races import _zk_get

pytestmark = pytest.mark.slow

SESSION = 4.0  # the sidecars' zk_session_timeout in these tests


class InProcessLeader:
    """This process as its namespace's leader: a session, an election, a housekeeper it drives."""

    def __init__(self, hosts: str, namespace: str, settings: HousekeepingSettings) -> None:
        self.layout = Layout(f"/zkcache/{namespace}")
        self.zk = ZkSession(hosts, SESSION, on_state=self._on_state)
        self.election = Election(self.zk, self.layout, "test-leader")
        self.keeper = Housekeeper(self.zk, self.layout, self.election, settings, "test-leader")

    def _on_state(self, state: ZkState) -> None:
        self.election.state_changed(state)

    async def start(self) -> None:
        await self.zk.connect(10)
        await ensure_layout(self.zk, self.layout)
        self.election.start()
        await asyncio.wait_for(self.election.wait_leading(), 10)

    async def stop(self) -> None:
        await self.election.stop()
        await self.zk.close(5)


@asynccontextmanager
async def leading(hosts: str, namespace: str, **settings: Any) -> AsyncIterator[InProcessLeader]:
    """A :class:`InProcessLeader` that leads (it stands before any sidecar of the namespace)."""
    leader = InProcessLeader(
        hosts, namespace, HousekeepingSettings(**{"retention": 0.05, "lock_timeout": 1.0, **settings})
    )
    await leader.start()
    try:
        yield leader
    finally:
        await leader.stop()


def seed(sqlite_url: str, key: str, value: bytes) -> None:
    """Put a value in the SQLite origin behind every sidecar's back (a key never written through one)."""
    db = sqlite3.connect(sqlite_path(sqlite_url))
    db.execute(
        "INSERT OR REPLACE INTO kv (key, value, content_type, updated_at) VALUES (?, ?, 'text/plain', 0)", (key, value)
    )
    db.commit()
    db.close()


def etag(headers: Any) -> int:
    return int(headers["ETag"].strip('"'))


def leaders(*procs: Any) -> list[str]:
    """Names of the sidecars that say they lead (a stopped or frozen one says nothing)."""
    found = []
    for proc in procs:
        try:
            if proc.stats()["housekeeping"]["leader"]:
                found.append(proc.name)
        except OSError:
            pass
    return found


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(base + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {base}/metrics")


# -- election ---------------------------------------------------------------
async def test_one_sidecar_leads_and_a_killed_leader_is_replaced_within_a_session_timeout(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    procs = [sidecars(name, housekeeping_interval="0.2s") for name in ("a", "b", "c")]
    first = await eventually(lambda: leaders(*procs), what="a leader among three sidecars")
    assert len(first) == 1, first
    old = next(p for p in procs if p.name == first[0])
    # Operators see it: members marks it, /metrics and /v1/stats say it.
    run = cachectl(zk_server.hosts, namespace, "members", "--json")
    assert run.returncode == 0, run.stderr
    assert [m["member_id"] for m in orjson.loads(run.stdout) if m.get("leader")] == [old.name]
    assert "(leader)" in cachectl(zk_server.hosts, namespace, "members").stdout
    for proc in procs:
        assert await metric(http, proc.url, "zkcache_leader") == (1.0 if proc is old else 0.0)
    await eventually(lambda: old.stats()["housekeeping"]["rounds"] > 0, what="the leader's first round")

    old.kill()  # its session (and candidate) lives on until ZooKeeper expires it
    killed = time.monotonic()
    rest = [p for p in procs if p is not old]

    async def new_leader_acted() -> list[str]:
        names = leaders(*rest)
        return [n for n in names if next(p for p in rest if p.name == n).stats()["housekeeping"]["rounds"] > 0]

    # Expiry is detected on ZooKeeper's tick: allow one tick and the round.
    successor = await eventually(new_leader_acted, timeout=SESSION + 3, what="a new leader's first round")
    took = time.monotonic() - killed
    assert len(successor) == 1, successor
    assert took < SESSION + 2.5, f"a new leader acted {took:.1f}s after the kill (session timeout {SESSION:g}s)"
    assert len(leaders(*rest)) == 1


async def test_a_partitioned_leader_stops_leading_and_no_two_lead_at_once(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str
) -> None:
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a = sidecars("a", zk=proxy.address, housekeeping_interval="0.2s")
        await eventually(lambda: leaders(a) == ["a"], what="a, alone, leading")
        b, c = sidecars("b", housekeeping_interval="0.2s"), sidecars("c", housekeeping_interval="0.2s")
        seen: list[list[str]] = []

        def sample() -> list[str]:
            now = leaders(a, b, c)
            seen.append(now)
            return now

        proxy.cut()
        # a stops at once (it cannot know whether it still leads); the others
        # wait for its session to expire.
        await eventually(lambda: "a" not in sample(), timeout=SESSION, what="a to stop leading when cut off")
        new = await eventually(lambda: [n for n in sample() if n != "a"], timeout=SESSION + 3, what="a new leader")
        proxy.heal()
        await eventually(lambda: a.stats()["zookeeper"]["sessions"] >= 2, timeout=10, what="a's new session")
        for _ in range(20):
            sample()
        assert all(len(s) <= 1 for s in seen), f"two leaders at once: {[s for s in seen if len(s) > 1]}"
        assert sample() == new, "the old leader took over again after its session expired"


async def test_a_deposed_leaders_late_delete_is_refused_by_zookeeper(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        async with leading(proxy.address, namespace) as old:
            b = sidecars("b", housekeeping_interval="0.2s")
            status, body, _ = await put(http, b.url, "k", b"v")
            assert status == 200
            path = old.layout.version_path("k")
            stat = await old.zk.exists(path)
            assert stat is not None
            # Built while leading, sent after being deposed: what kazoo does
            # with a request queued while it reconnects.
            late = old.zk.client.transaction()
            old.election.fence(late)
            late.delete(path, stat.version)
            proxy.cut()
            await eventually(lambda: not old.election.leading, timeout=SESSION, what="the old leader standing down")
            await eventually(lambda: leaders(b) == ["b"], timeout=SESSION + 3, what="b leading after the expiry")
            proxy.heal()
            await old.zk.wait_connected(10)
            results = await old.zk.commit(late, "late delete")
            assert isinstance(results[0], NoNodeError), results  # the fence: its candidate died with its session
            survivor = await old.zk.exists(path)
            assert survivor is not None, "the deposed leader's delete went through"
            assert survivor.mzxid == body["version"]
            # And its housekeeper knows, before sending anything.
            with pytest.raises(NotLeader):
                await old.keeper.retire([Candidate(path, stat.version, stat.czxid)])
            with pytest.raises(NotLeader):
                await old.keeper.scan()


# -- retention ------------------------------------------------------------------
async def test_retention_deletes_old_versions_never_one_written_since_the_scan(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    async with leading(zk_server.hosts, namespace) as leader:
        a, b = sidecars("a"), sidecars("b")
        versions = {}
        for key in ("k1", "k2", "k3"):
            status, body, _ = await put(http, a.url, key, key.encode())
            assert status == 200
            versions[key] = body["version"]
        await get_hit(http, b.url, "k1")

        async def due() -> Any:
            plan = await leader.keeper.scan()
            return plan if {c.path for c in plan.retire} >= {leader.layout.version_path(k) for k in versions} else None

        plan = await eventually(due, what="the three version znodes due for retirement")
        status, body, _ = await put(http, a.url, "k2", b"k2 again")  # lands between the scan and the deletes
        assert status == 200
        retired, skipped = await leader.keeper.retire(plan.retire)
        assert (retired, skipped) == (2, 1)
        assert await leader.zk.exists(leader.layout.version_path("k1")) is None
        kept = await leader.zk.exists(leader.layout.version_path("k2"))
        assert kept is not None and kept.mzxid == body["version"], "a key written after the scan was retired"
        # b held k1: its watch fired on the deletion, so its next read is a miss.
        await eventually(lambda: b.stats()["entries"] == 0, what="b dropping k1")
        status, source, value, headers = await get(http, b.url, "k1")
        assert (status, source, value) == (200, "miss", b"k1")
        assert etag(headers) > versions["k3"], "an absent key's version after a retirement must pass every earlier one"


async def test_versions_never_repeat_across_retirement_for_if_match_leases_and_strong_reads(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """0 (never written), v (written), then retired: the absent version must not be 0 again."""
    async with leading(zk_server.hosts, namespace) as leader:
        a = sidecars("a", fills="allow")
        seed(sqlite_url, "k", b"old")
        status, source, _, headers = await get(http, a.url, "k")
        assert (status, source, etag(headers)) == (200, "miss", 0)
        # A cache-aside lease handed out before the first write.
        async with http.get(a.url + "/v1/keys/lease-me?fill=true") as resp:
            assert resp.status == 404
            lease_before = etag(resp.headers)  # the prefix log's baseline, as for any key never written
        for key in ("k", "lease-me"):
            assert (await put(http, a.url, key, b"new"))[0] == 200

        async def retired_both() -> bool:
            plan = await leader.keeper.scan()
            await leader.keeper.retire(plan.retire)
            return all([await leader.zk.exists(leader.layout.version_path(k)) is None for k in ("k", "lease-me")])

        await eventually(retired_both, what="both version znodes retired")
        status, _, value, headers = await get(http, a.url, "k")
        after = etag(headers)
        assert (status, value) == (200, b"new") and after > 0
        # If-Match with the version from before the first write: refused.
        async with http.put(a.url + "/v1/keys/k", data=b"lost update", headers={"If-Match": '"0"'}) as resp:
            assert resp.status == 412, "If-Match from before the write matched after its retirement"
        # A lease from before the write: refused (it would install the value read before it).
        async with http.put(
            a.url + "/v1/keys/lease-me?fill=true", data=b"stale", headers={"If-Match": f'"{lease_before}"'}
        ) as resp:
            assert resp.status == 412, "a lease from before the write was accepted after its retirement"
        # Strong reads hand out the same absent version, and If-Match with it works.
        status, _, value, headers = await get(http, a.url, "k", params={"consistency": "strong"})
        assert (status, value, etag(headers)) == (200, b"new", after)
        async with http.put(a.url + "/v1/keys/k", data=b"newer", headers={"If-Match": f'"{after}"'}) as resp:
            assert resp.status == 200
            assert etag(resp.headers) > after


async def test_a_sidecar_away_while_a_key_was_created_and_retired_drops_its_absent_entry(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """An exists watch restored by setWatches fires nothing for a znode created and deleted meanwhile."""
    async with leading(zk_server.hosts, namespace) as leader:
        with TcpProxy(zk_server.host, zk_server.port) as proxy:
            a = sidecars("a")
            b = sidecars("b", zk=proxy.address, zk_session_timeout="8s")
            seed(sqlite_url, "k", b"before")
            await get_hit(http, b.url, "k")  # cached with no version znode: an exists watch
            revalidations = b.stats()["revalidation"]["count"]
            proxy.cut()
            await eventually(lambda: not b.is_ready(), what="b noticing the cut")
            assert (await put(http, a.url, "k", b"after"))[0] == 200

            async def retired() -> bool:
                await leader.keeper.retire((await leader.keeper.scan()).retire)
                return await leader.zk.exists(leader.layout.version_path("k")) is None

            await eventually(retired, what="k's version znode retired while b is away")
            proxy.heal()
            await eventually(
                lambda: b.is_ready() and b.stats()["revalidation"]["count"] > revalidations,
                timeout=15,
                what="b reconnected and restored",
            )
            status, source, value, _ = await get(http, b.url, "k")
            assert (status, value) == (200, b"after"), f"b served {value!r} ({source}) after the key was rewritten"


# -- intents of dead writers ------------------------------------------------------
async def test_a_dead_writers_intent_is_repaired_and_a_live_one_is_not(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    layout = Layout(f"/zkcache/{namespace}")
    a = sidecars("a", lock_timeout="1s", housekeeping_interval="0.3s")
    assert (await put(http, a.url, "dead", b"v1"))[0] == 200
    assert (await put(http, a.url, "live", b"v1"))[0] == 200

    # Two writers take their locks with their intents, as lock.py does; one dies.
    def writer(key: str) -> KazooClient:
        client = KazooClient(hosts=zk_server.hosts, timeout=SESSION)
        client.start(10)
        tx = client.transaction()
        tx.create(layout.lock_path(key), b"{}", ephemeral=True)
        tx.set_data(layout.version_path(key), b"")
        assert not any(isinstance(r, Exception) for r in tx.commit())
        return client

    dead, live = writer("dead"), writer("live")
    try:
        dead.stop()
        dead.close()  # its lock goes with its session; its intent stays
        await eventually(lambda: get_hit_or_none(http, a.url, "dead"), timeout=10, what="the dead intent repaired")
        data, _ = live.get(layout.version_path("live"))
        assert data == b"", "a live writer's intent was closed"
        assert (await get(http, a.url, "live"))[1] == "miss"
        assert (await get(http, a.url, "live"))[1] == "miss", "a key in a live intent was cached"
        stats = a.stats()["housekeeping"]
        assert stats["totals"]["repaired"] >= 1 and stats["last_round"]["oldest_intent_seconds"] > 1
    finally:
        live.stop()
        live.close()
    note, _ = await asyncio.to_thread(_zk_get, zk_server.hosts, layout.version_path("dead"))
    assert orjson.loads(note)["op"] == "repair"


async def get_hit_or_none(http: aiohttp.ClientSession, base: str, key: str) -> bool:
    await get(http, base, key)
    return (await get(http, base, key))[1] == "hit"


async def test_the_prefix_log_is_trimmed_by_the_leader(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    async with leading(zk_server.hosts, namespace) as leader:
        a = sidecars("a")
        for start in range(0, 1100, 100):
            body = {"prefixes": [f"p{i}/" for i in range(start, start + 100)]}
            async with http.post(a.url + "/v1/invalidate", json=body) as resp:
                assert resp.status == 202
        assert len(await leader.zk.get_children(leader.layout.prefixes)) == 1100
        assert await leader.keeper.trim_prefix_log() == 100
        names = await leader.zk.get_children(leader.layout.prefixes)
        assert len(names) == 1000 and min(int(n.rpartition("~")[2]) for n in names) == 100
        assert a.is_ready(), "a sidecar that had applied every entry must not flush or stall"
        assert (await current_leader(leader.zk, leader.layout) or {}).get("member_id") == "test-leader"


# -- layout -------------------------------------------------------------------------
async def test_a_namespace_used_by_sidecars_of_an_older_layout_is_refused(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    """An older sidecar (three-hex-digit buckets, no layout in its member znode) is live: never join it."""
    layout = Layout(f"/zkcache/{namespace}")
    old = KazooClient(hosts=zk_server.hosts, timeout=SESSION)
    await asyncio.to_thread(old.start, 10)
    try:
        await asyncio.to_thread(old.create, layout.member_path("old-1"), b'{"member_id": "old-1"}', ephemeral=True,
                                makepath=True)  # fmt: skip
        a = sidecars("a", wait_ready=False)
        await eventually(lambda: "older layout" in a.log_tail(200), timeout=10, what="a refusing the namespace")
        async with http.get(a.url + "/readyz") as resp:
            assert resp.status == 503
            assert "older layout" in (await resp.json(content_type=None))["detail"]
    finally:
        await asyncio.to_thread(old.stop)
        await asyncio.to_thread(old.close)
    # The older sidecar gone, the namespace is free: a lays it out and serves.
    await eventually(a.is_ready, timeout=10, what="a ready once the older sidecar left")
