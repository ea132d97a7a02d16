"""Live settings through the namespace's config znode, with three real sidecars and the real CLI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from kazoo.client import KazooClient

from harness import LocalZooKeeper, SidecarProcess
from sidecar.config import load_config
from sidecar.coordination import Layout, ZkSession, update_live_config
from sidecar.origins import NoOrigin
from sidecar.service import CacheService
from tests.conftest import SidecarFactory, cachectl, eventually

pytestmark = pytest.mark.slow


async def _stats(http: aiohttp.ClientSession, sc: SidecarProcess) -> dict[str, Any]:
    async with http.get(f"{sc.url}/v1/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def _effective(http: aiohttp.ClientSession, scs: list[SidecarProcess], name: str) -> list[Any]:
    return [(await _stats(http, sc))["config"]["effective"][name] for sc in scs]


async def test_a_change_reaches_every_sidecar_live_and_smaller_bounds_evict_the_least_recent(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    a, b, c = (sidecars(n, ttl="5s") for n in "abc")
    for i in range(10):
        async with http.put(f"{a.url}/v1/keys/k{i}", data=b"v") as resp:
            assert resp.status < 300
    for i in range(10):  # k0 is read first: the least recently used
        async with http.get(f"{a.url}/v1/keys/k{i}") as resp:
            assert resp.status == 200
    before = (await _stats(http, a))["zookeeper"]
    run = cachectl(zk_server.hosts, namespace, "config", "set", "max_entries=4", "ttl=1h", "log_level=debug")
    assert run.returncode == 0, run.stderr
    assert "max_entries: (unset) -> 4" in run.stdout and "ttl: (unset) -> 1h" in run.stdout

    async def everywhere(name: str, value: Any) -> bool:
        return await _effective(http, [a, b, c], name) == [value] * 3

    await eventually(lambda: everywhere("max_entries", 4), what="max_entries 4 on all three sidecars")
    assert await everywhere("ttl", 3600.0), "the znode wins over the ttl flag"
    stats = await _stats(http, a)
    assert stats["entries"] == 4 and stats["config"]["status"] == "ok"
    after = stats["zookeeper"]
    assert (after["session"], after["sessions"]) == (before["session"], before["sessions"]), "restarted or reconnected"
    for i in range(6, 10):  # the four most recently used stayed, and are still served from the cache
        async with http.get(f"{a.url}/v1/keys/k{i}") as resp:
            assert resp.headers["X-Cache"] == "hit", f"k{i} was dropped"

    run = cachectl(zk_server.hosts, namespace, "config", "set", "--unset", "ttl", "--unset", "max_entries")
    assert run.returncode == 0, run.stderr
    await eventually(lambda: everywhere("ttl", 5.0), what="each sidecar's own ttl flag back after --unset")
    assert await everywhere("max_entries", 100_000)
    get = cachectl(zk_server.hosts, namespace, "config", "get", "--json")
    assert json.loads(get.stdout)["settings"] == {"log_level": "debug"}


async def test_an_invalid_change_reaches_no_sidecar(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    scs = [sidecars(n) for n in "abc"]
    refused = cachectl(zk_server.hosts, namespace, "config", "set", "max_entries=0")
    assert refused.returncode == 2 and "setting 'max_entries'" in refused.stderr, refused
    assert refused.stderr.count("\n") == 1, "one line"
    # Each value parses, but the whole does not hold: max_bytes below max_value_bytes (1 MiB).
    # cachectl cannot know each sidecar's other settings; every sidecar refuses it.
    run = cachectl(zk_server.hosts, namespace, "config", "set", "max_bytes=64KiB", "ttl=30s")
    assert run.returncode == 0, run.stderr

    async def refused_everywhere() -> bool:
        for sc in scs:
            async with http.get(f"{sc.url}/readyz") as resp:
                body = await resp.json()
                if resp.status != 200 or body["config"]["status"] != "invalid":
                    return False
        return True

    await eventually(refused_everywhere, what="every sidecar refusing the config (and staying ready)")
    async with http.get(f"{scs[0].url}/readyz") as resp:
        assert "max_value_bytes" in (await resp.json())["config"]["error"]
    async with http.get(f"{scs[0].url}/metrics") as resp:
        assert "zkcache_config_valid 0.0" in await resp.text()
    assert await _effective(http, scs, "ttl") == [0.0] * 3, "no part of a refused config applies"
    assert await _effective(http, scs, "max_bytes") == [256 * 1024**2] * 3

    fixed = cachectl(zk_server.hosts, namespace, "config", "set", "max_bytes=64MiB")
    assert fixed.returncode == 0, fixed.stderr

    async def applied() -> bool:
        return await _effective(http, scs, "ttl") == [30.0] * 3

    await eventually(applied, what="the corrected config applied everywhere")
    async with http.get(f"{scs[0].url}/metrics") as resp:
        assert "zkcache_config_valid 1.0" in await resp.text()


async def test_concurrent_config_changes_lose_neither(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str
) -> None:
    sidecars("a")  # the namespace exists once a sidecar joined it
    layout = Layout(f"/zkcache/{namespace}")
    changes = {
        "ttl": "1m",
        "max_entries": "5000",
        "log_level": "warning",
        "suspended_reads": "fail",
        "consistency_probe_rate": "0.01",
        "consistency_probe_window": "2s",
    }
    sessions = [ZkSession(zk_server.hosts, 10) for _ in changes]
    await asyncio.gather(*(s.connect(10) for s in sessions))
    try:
        # Every writer reads the same version first: all but one lose the conditional write, and must merge.
        results = await asyncio.gather(
            *(update_live_config(s, layout, {k: v}, []) for s, (k, v) in zip(sessions, changes.items(), strict=True))
        )
        assert all(r.version is not None for r in results)
        final, _ = json.loads(cachectl(zk_server.hosts, namespace, "config", "get", "--json").stdout).values()
        assert final == changes, "a concurrent change was lost"
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    # The same through the real CLI: three operators at once.
    again = {"ttl": "2m", "max_entries": "6000", "log_level": "error"}
    runs = await asyncio.gather(
        *(
            asyncio.to_thread(cachectl, zk_server.hosts, namespace, "config", "set", f"{k}={v}")
            for k, v in again.items()
        )
    )
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    final, _ = json.loads(cachectl(zk_server.hosts, namespace, "config", "get", "--json").stdout).values()
    assert final == {**changes, **again}


def test_config_refuses_a_namespace_nobody_joined(zk_server: LocalZooKeeper, namespace: str) -> None:
    run = cachectl(zk_server.hosts, namespace, "config", "set", "ttl=1m")
    assert run.returncode == 1 and "does not exist" in run.stderr, run
    client = KazooClient(hosts=zk_server.hosts)
    client.start(10)
    try:
        assert client.exists(f"/zkcache/{namespace}") is None, "config set created the namespace"
    finally:
        client.stop()
        client.close()


def test_config_diff_writes_nothing(sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str) -> None:
    sidecars("a")
    run = cachectl(zk_server.hosts, namespace, "config", "diff", "ttl=2m", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["changes"] == [{"setting": "ttl", "before": None, "after": "2m"}]
    assert "no live settings" in cachectl(zk_server.hosts, namespace, "config", "get").stdout
    bad = cachectl(zk_server.hosts, namespace, "config", "set", "listen=0.0.0.0:80")
    assert bad.returncode == 2 and "not a live setting" in bad.stderr


async def test_a_live_max_bytes_beyond_the_containers_memory_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart checks max_bytes against the pod's memory limit; a live change skips the chart,
    so the sidecar checks it against its cgroup's limit itself."""
    import sidecar.service

    monkeypatch.setattr(sidecar.service, "container_memory_limit", lambda: 320 * 1024**2)
    cfg = load_config({"zk": "127.0.0.1:1", "origin": "none", "member_id": "m"}, env={})
    svc = CacheService(cfg, NoOrigin())
    svc.apply_live_config(b'{"max_bytes": "256MiB", "ttl": "1m"}', 7)
    assert svc.live_config.error is not None and "memory limit of at least 384 MiB" in svc.live_config.error
    assert svc.config.ttl == 0.0 and svc.config.max_bytes == cfg.max_bytes, "nothing of it applies"
    svc.apply_live_config(b'{"max_bytes": "192MiB", "ttl": "1m"}', 8)
    assert svc.live_config.error is None and svc.config.max_bytes == 192 * 1024**2 and svc.config.ttl == 60.0


def test_cachectl_repairs_a_hand_edited_config_znode(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str
) -> None:
    sidecars("a")
    path = f"/zkcache/{namespace}/config"
    client = KazooClient(hosts=zk_server.hosts)
    client.start(10)
    try:
        client.create(path, b'{"bogus": 1, "ttl": "1m"}')
        stuck = cachectl(zk_server.hosts, namespace, "config", "set", "max_entries=5")
        assert stuck.returncode == 2 and "'bogus': not a live setting" in stuck.stderr, stuck
        fixed = cachectl(zk_server.hosts, namespace, "config", "set", "--unset", "bogus", "max_entries=5")
        assert fixed.returncode == 0, fixed.stderr
        assert json.loads(client.get(path)[0]) == {"ttl": "1m", "max_entries": "5"}
        client.set(path, b"not json")
        refused = cachectl(zk_server.hosts, namespace, "config", "set", "ttl=2m")
        assert refused.returncode == 2 and "--replace" in refused.stderr, refused
        replaced = cachectl(zk_server.hosts, namespace, "config", "set", "--replace", "ttl=2m")
        assert replaced.returncode == 0, replaced.stderr
        assert json.loads(client.get(path)[0]) == {"ttl": "2m"}
    finally:
        client.stop()
        client.close()
