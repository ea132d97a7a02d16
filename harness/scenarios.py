"""Coherence under faults: a workload, a fault schedule, and the history checker.

    python -m harness.scenarios [--scenario NAME ...] [--seconds 8] [--soak]

Each scenario starts a 3-node ZooKeeper ensemble and three sidecar processes on
a shared SQLite origin (an HTTP upstream or a redis-server in the origin
scenarios).  Every sidecar reaches every ZooKeeper server through a
TCP proxy this process owns, so one sidecar can be partitioned alone.
Concurrent clients then run reads (eventual and strong), write-through PUTs,
compare-and-set writes, DELETEs and invalidations on a few keys while the fault
is injected.  Everything runs on 127.0.0.1, and every loop is bounded in count
and in time.  The recorded history goes to :func:`harness.history.check`;
the script prints one table row per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.origins.sqlite import SqliteOrigin

from .history import Op, Report, check
from .process import SidecarProcess
from .proxy import TcpProxy
from .redis import LocalRedis
from .upstream import UpstreamProcess
from .zookeeper import LocalEnsemble

__all__ = ["SCENARIOS", "ScenarioResult", "main", "run_scenario"]

SESSION = 4.0  # sidecar session timeout in the scenarios (seconds)
# Eventual reads may be stale for up to the lease (2/3 T) + grace (T/3) = T
# after a sidecar last heard from ZooKeeper; half a second more for delivery.
WINDOW = SESSION + 0.5
_NOT_APPLIED = {"zookeeper-unavailable", "lock-timeout", "coordination-unavailable", "write-abandoned"}


@dataclass
class Cluster:
    """What a fault schedule may act on."""

    ensemble: LocalEnsemble
    sidecars: list[SidecarProcess]
    proxies: list[list[TcpProxy]]  # per sidecar, one per ZooKeeper server
    dead: set[int]
    keys: list[str]
    upstream: str | None = None  # base URL of the HTTP origin, in origin scenarios
    redis: LocalRedis | None = None  # the Redis origin, in Redis scenarios
    killed_at: float | None = None  # time.monotonic() of the sidecar SIGKILL


async def _no_fault(cluster: Cluster, seconds: float) -> None:
    return None


async def _kill_leader(cluster: Cluster, seconds: float) -> None:
    await asyncio.sleep(seconds * 0.3)
    await asyncio.to_thread(lambda: cluster.ensemble.leader().kill())


async def _rolling_restart(cluster: Cluster, seconds: float) -> None:
    # Every server stopped cleanly and started again in turn, the leader
    # last, as an upgrade does: every sidecar reconnects two or three times.
    await asyncio.sleep(seconds * 0.1)

    def restart_all() -> None:
        ensemble = cluster.ensemble
        order = [s for s in ensemble.servers if s.mode() != "leader"] + [ensemble.leader()]
        for server in order:
            server.stop()
            server.start()
            deadline = time.monotonic() + 30
            while server.mode() not in ("leader", "follower") and time.monotonic() < deadline:
                time.sleep(0.05)

    await asyncio.to_thread(restart_all)


def _link_fault(act: Callable[[TcpProxy], None], duration: float) -> Callable[[Cluster, float], Awaitable[None]]:
    """Apply ``act`` to sidecar 1's links to ZooKeeper for ``duration`` seconds, then heal."""

    async def fault(cluster: Cluster, seconds: float) -> None:
        await asyncio.sleep(seconds * 0.2)
        # Act while sidecar 1 holds entries, or the fault would test nothing:
        # writes elsewhere invalidate entries within milliseconds.
        async with aiohttp.ClientSession() as http:
            url = cluster.sidecars[0].url
            await asyncio.gather(*(_guarded(http, "GET", f"{url}/v1/keys/{key}") for key in cluster.keys))
        for proxy in cluster.proxies[0]:
            act(proxy)
        await asyncio.sleep(duration)
        for proxy in cluster.proxies[0]:
            proxy.heal()

    return fault


def _session_expiry(duration: float) -> Callable[[Cluster, float], Awaitable[None]]:
    """Partition sidecar 1 past its session, then check it really got a new session and set it up."""
    partition = _link_fault(TcpProxy.cut, duration)

    async def fault(cluster: Cluster, seconds: float) -> None:
        sidecar = cluster.sidecars[0]
        before = (await asyncio.to_thread(sidecar.stats))["zookeeper"]["session"]
        await partition(cluster, seconds)
        deadline = time.monotonic() + SESSION * 3
        while True:
            zk = (await asyncio.to_thread(sidecar.stats))["zookeeper"]
            if zk["ready"] and zk["session"] != before:
                return  # expired, and the new session restored the cache by zxid
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar 1 kept session {before} through a {duration:g}s partition: {zk}")
            await asyncio.sleep(0.1)

    return fault


async def _origin_faults(cluster: Cluster, seconds: float) -> None:
    # 5xx, then timeouts (origin_timeout is 0.5 s), then health again.
    async with aiohttp.ClientSession() as http:
        for mode, share in (("500", 0.2), ("hang", 0.25), ("ok", 0.0)):
            await asyncio.sleep(seconds * 0.15)
            async with http.post(f"{cluster.upstream}/_control/mode/{mode}") as resp:
                assert resp.status == 204
            await asyncio.sleep(seconds * share)


async def _redis_faults(cluster: Cluster, seconds: float) -> None:
    # Hung past the timeout (origin_timeout is 0.5 s), then crashed and
    # restarted from its append-only file (fsynced on every write).
    redis = cluster.redis
    assert redis is not None
    await asyncio.sleep(seconds * 0.15)
    redis.pause()
    await asyncio.sleep(seconds * 0.2)
    redis.resume()
    await asyncio.sleep(seconds * 0.15)
    await asyncio.to_thread(redis.kill)
    await asyncio.sleep(seconds * 0.1)
    await asyncio.to_thread(redis.start)


async def _kill_sidecar(cluster: Cluster, seconds: float) -> None:
    await asyncio.sleep(seconds * 0.3)
    victim = cluster.sidecars[2]
    cluster.dead.add(2)
    cluster.killed_at = time.monotonic()
    if victim.proc is not None:
        victim.proc.kill()  # SIGKILL: its locks go only when its session expires


SCENARIOS: dict[str, tuple[str, Callable[[Cluster, float], Awaitable[None]]]] = {
    "baseline": ("no fault", _no_fault),
    "leader-kill": ("kill the ZooKeeper leader under load", _kill_leader),
    "rolling-restart": ("stop and start every ZooKeeper server in turn, the leader last", _rolling_restart),
    "partition-short": (
        f"partition sidecar 1 from ZooKeeper for {SESSION / 2:g}s (< session)",
        _link_fault(TcpProxy.cut, SESSION / 2),
    ),
    "session-expiry": (
        f"partition sidecar 1 from ZooKeeper for {SESSION * 2:g}s: its session expires, the new one restores",
        _session_expiry(SESSION * 2),
    ),
    "blackhole": (
        f"black-hole sidecar 1's ZooKeeper traffic for {SESSION * 1.5:g}s (silent)",
        _link_fault(TcpProxy.blackhole, SESSION * 1.5),
    ),
    "slow-link": (
        "add 300 ms to every packet between sidecar 1 and ZooKeeper",
        _link_fault(lambda p: p.delay(0.3), 5.0),
    ),
    "sidecar-kill": ("SIGKILL sidecar 3 in the middle of writes", _kill_sidecar),
    "origin-faults": ("HTTP origin answers 500, then hangs past the timeout, then recovers", _origin_faults),
    "redis-faults": ("Redis origin hangs past the timeout, then is killed and restarted", _redis_faults),
}
_HTTP_ORIGIN = {"origin-faults"}
_REDIS_ORIGIN = {"redis-faults"}


@dataclass
class ScenarioResult:
    """One scenario's verdict."""

    name: str
    description: str
    report: Report
    converged: bool
    seconds: float
    ops: list[Op]
    killed_at: float | None


def _outcome(status: int, problem_type: str) -> str:
    if 200 <= status < 300 or status == 404:
        return "ok"
    if 400 <= status < 500 or (status == 503 and problem_type in _NOT_APPLIED):
        return "fail"
    return "unknown"  # 5xx after the origin may have changed, timeouts


async def _request(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.read(), resp.headers


async def _client(
    n: int, http: aiohttp.ClientSession, cluster: Cluster, keys: list[str], deadline: float, ops: list[Op]
) -> None:
    rng = random.Random(n)
    for i in range(2000):  # bounded in count as well as in time
        if time.monotonic() > deadline:
            return
        live = [s for j, s in enumerate(cluster.sidecars) if j not in cluster.dead]
        base = rng.choice(live).url
        key = rng.choice(keys)
        url = f"{base}/v1/keys/{key}"
        roll = rng.random()
        value = f"c{n}-{i}".encode()
        kw: dict[str, Any] = {}
        kind, method, expect = "read", "GET", None
        if roll < 0.30:
            pass
        elif roll < 0.48:
            kind, url = "strong_read", url + "?consistency=strong"
        elif roll < 0.68:
            kind, method, kw = "put", "PUT", {"data": value}
        elif roll < 0.78:
            kind, method = "cas", "PUT"
            status, _, headers = await _guarded(http, "GET", url + "?consistency=strong")
            etag = headers.get("ETag") if headers is not None else None
            expect = int(etag.strip('"')) if etag and status in (200, 404) else 0
            kw = {"data": value, "headers": {"If-Match": f'"{expect}"'}}
        elif roll < 0.83:
            kind, method = "delete", "DELETE"
        elif roll < 0.90:
            kind, method, url, kw = _invalidation(rng, base, key)
        else:
            await _lease_fill(http, url, ops, n)
            continue
        start = time.monotonic()
        status, body, headers = await _guarded(http, method, url, **kw)
        end = time.monotonic()
        problem = ""
        if headers is not None and headers.get("Content-Type") == "application/problem+json":
            problem = str(_json(body).get("type", "")).rsplit("/", 1)[-1]
        etag = headers.get("ETag") if headers is not None else None
        op = Op(kind, key, start, end, _outcome(status, problem), client=n, expect=expect)
        op.version = int(etag.strip('"')) if etag and status < 300 else None
        if kind in ("put", "cas"):
            op.value = value
        elif kind in ("read", "strong_read"):
            op.value = body if status == 200 else None
            if status not in (200, 404):
                op.outcome = "unknown"
        ops.append(op)


def _invalidation(rng: random.Random, base: str, key: str) -> tuple[str, str, str, dict[str, Any]]:
    """An invalidation of every kind: the key, a covering prefix or everything; acknowledged or not."""
    body = rng.choice([{"keys": [key]}, {"prefixes": [key[:1]]}, {"prefixes": [key]}, {"all": True}])
    wait = "?wait=true&timeout=2" if rng.random() < 0.5 else ""
    return "invalidate", "POST", f"{base}/v1/invalidate{wait}", {"json": body}


async def _lease_fill(http: aiohttp.ClientSession, url: str, ops: list[Op], n: int) -> None:
    """Cache-aside: a lease on a miss, the application's own read (here: strong), a fill under the lease.

    The strong read is recorded as a read; the fill is judged through what
    later reads return (a fill installed under a stale lease would serve a
    superseded value past the window).
    """
    start = time.monotonic()
    status, _, headers = await _guarded(http, "GET", url + "?fill=true")
    if status != 404 or headers is None or "ETag" not in headers:
        return  # a hit, or no lease (not ready): nothing to fill
    lease = headers["ETag"]
    key = url.rsplit("/v1/keys/", 1)[1]
    read_start = time.monotonic()
    status, body, headers = await _guarded(http, "GET", url + "?consistency=strong")
    read = Op("strong_read", key, read_start, time.monotonic(), "ok" if status in (200, 404) else "unknown", client=n)
    read.value = body if status == 200 else None
    ops.append(read)
    if status != 200:
        return
    status, _, _ = await _guarded(http, "PUT", url + "?fill=true", data=body, headers={"If-Match": lease})
    ops.append(Op("fill", key, start, time.monotonic(), "ok" if status == 200 else "fail", value=body, client=n))


async def _guarded(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    try:
        return await _request(http, method, url, **kw)
    except (aiohttp.ClientError, TimeoutError):
        return 599, b"", None  # the outcome is unknown


def _json(body: bytes) -> dict[str, Any]:
    import orjson

    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def _workload(cluster: Cluster, keys: list[str], seconds: float, clients: int, fault: Any) -> list[Op]:
    ops: list[Op] = []
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            fault(cluster, seconds), *(_client(n, http, cluster, keys, deadline, ops) for n in range(clients))
        )
    return ops


async def _converged(cluster: Cluster, final: dict[str, bytes | None], within: float) -> bool:
    """Every live sidecar serves each key's final origin value within ``within`` seconds."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            good = True
            for j, sc in enumerate(cluster.sidecars):
                if j in cluster.dead:
                    continue
                for key, value in final.items():
                    status, body, _ = await _guarded(http, "GET", f"{sc.url}/v1/keys/{key}")
                    if (body if status == 200 else None) != value or status not in (200, 404):
                        good = False
            if good:
                return True
            await asyncio.sleep(0.2)
    return False


def run_scenario(name: str, base_dir: Path, seconds: float = 8.0, clients: int = 6, keys: int = 8) -> ScenarioResult:
    """Run one scenario end to end and check its history."""
    description, fault = SCENARIOS[name]
    started = time.monotonic()
    db = base_dir / "origin.db"
    asyncio.run(SqliteOrigin(f"sqlite:///{db}", 5).open())
    upstream = UpstreamProcess() if name in _HTTP_ORIGIN else None
    redis = LocalRedis(base_dir / "redis") if name in _REDIS_ORIGIN else None
    origin = f"{upstream.base}/kv" if upstream else redis.url if redis else f"sqlite:///{db}"
    ensemble = LocalEnsemble(base_dir / "zk", tick_ms=500)
    key_names = [f"k{i}" for i in range(keys)]
    cluster = Cluster(ensemble, [], [], set(), key_names, redis=redis)
    if upstream is not None:
        cluster.upstream = upstream.base
    try:
        if redis is not None:
            redis.start()
        ensemble.start()
        for i in range(3):
            proxies = [TcpProxy(s.host, s.port) for s in ensemble.servers]
            for proxy in proxies:
                proxy.start()
            cluster.proxies.append(proxies)
            sc = SidecarProcess(
                base_dir / "logs",
                f"sidecar-{i + 1}",
                {
                    "zk": ",".join(p.address for p in proxies),
                    "origin": origin,
                    "origin_timeout": "0.5s",
                    "namespace": "checker",
                    "zk_session_timeout": f"{SESSION:g}s",
                    "lock_timeout": f"{SESSION * 3:g}s",
                    "fills": "allow",
                    "log_level": "info",
                },
            )
            cluster.sidecars.append(sc)
            sc.start(wait_ready=False)
        for sc in cluster.sidecars:  # started side by side, then awaited
            sc.wait_ready(timeout=60)
        ops = asyncio.run(_workload(cluster, key_names, seconds, clients, fault))
        final = _final_values(db, cluster, key_names)
        converged = asyncio.run(_converged(cluster, final, WINDOW + 10))
        report = check(ops, final, WINDOW)
    finally:
        for sc in cluster.sidecars:
            sc.stop()
        for proxies in cluster.proxies:
            for proxy in proxies:
                proxy.stop()
        ensemble.stop()
        if upstream is not None:
            upstream.stop()
        if redis is not None:
            redis.stop()
    return ScenarioResult(name, description, report, converged, time.monotonic() - started, ops, cluster.killed_at)


def _final_values(db: Path, cluster: Cluster, keys: list[str]) -> dict[str, bytes | None]:
    upstream = cluster.upstream
    if cluster.redis is not None:
        with cluster.redis.client() as plain:
            return {k: plain.hget(k, "value") for k in keys}
    if upstream is None:
        with sqlite3.connect(db) as conn:
            stored = dict(conn.execute("SELECT key, value FROM kv").fetchall())
        return {k: stored.get(k) for k in keys}
    final: dict[str, bytes | None] = {}
    for key in keys:
        try:
            with urllib.request.urlopen(f"{upstream}/kv/{key}", timeout=5) as resp:
                final[key] = resp.read()
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            final[key] = None
    return final


def table(results: list[ScenarioResult]) -> str:
    """The Markdown table the README keeps."""
    lines = [
        "| scenario | operations | reads | acked writes | errors | strong stale | max eventual staleness | "
        "lost writes | double CAS | phantom reads | converged | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rep = r.report
        verdict = "pass" if rep.ok and r.converged else "FAIL"
        lines.append(
            f"| {r.name}: {r.description} | {rep.operations} | {rep.reads} | {rep.writes_acknowledged} | "
            f"{rep.errors} | {len(rep.strong_stale)} | {rep.max_eventual_staleness * 1000:.0f} ms | "
            f"{len(rep.lost_writes)} | {len(rep.double_cas)} | {len(rep.phantom_reads)} | "
            f"{'yes' if r.converged else 'no'} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run scenarios; exit 1 if any fails."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.scenarios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per scenario")
    parser.add_argument("--soak", action="store_true", help="10x longer load per scenario")
    args = parser.parse_args(argv)
    seconds = args.seconds * (10 if args.soak else 1)
    results = []
    for name in args.scenario or list(SCENARIOS):
        with tempfile.TemporaryDirectory(prefix=f"zkcache-{name}-") as tmp:
            result = run_scenario(name, Path(tmp), seconds=seconds)
        results.append(result)
        print(
            f"{name}: {'pass' if result.report.ok and result.converged else 'FAIL'} in {result.seconds:.0f}s",
            flush=True,
        )
        for line in result.report.violations[:10]:
            print(f"  {line}", flush=True)
    print()
    print(f"Eventual window W = {WINDOW:g}s (session timeout {SESSION:g}s + 0.5s); {seconds:g}s of load each.")
    print(table(results))
    return 0 if all(r.report.ok and r.converged for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
