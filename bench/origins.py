"""The miss path over each origin, side by side: SQLite, an HTTP upstream, Redis.

    .venv/bin/python -m bench.origins [--quick] [--out bench/results]

Starts one ZooKeeper, one origin of each kind (a SQLite file, the dev HTTP
upstream ``harness.upstream``, a ``redis-server``) and one sidecar per
origin, all on loopback, under a temporary directory; stops them at the end.
Each origin is preloaded with N keys of 1 KiB (quick: 200; else 2,000).

For each origin, in the same run:

1. **bare origin read**: this process reads every key once through the
   sidecar's own origin class (``SqliteOrigin``, ``HttpOrigin``,
   ``RedisOrigin``), sequentially: the floor a miss cannot beat;
2. **sidecar miss**: sequential GETs of every key on one keep-alive
   connection to the sidecar (a read-through: arm the key's watch and read
   its version in ZooKeeper, then the origin, then cache);
3. **sidecar hit**: the same keys again.

The table gives p50/p99 of each and what a miss adds to the bare read
(p50 miss minus p50 bare read): the coordination's price per miss.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from harness import LocalZooKeeper, SidecarProcess
from harness.redis import LocalRedis
from harness.upstream import UpstreamProcess
from sidecar.origins import open_origin

from .common import machine, machine_line, run_scenario, scenario_parser, seed_origin, write_results
from .lib.http import sequential_gets
from .lib.stats import fmt, summary

VALUE = b"v" * 1024
NAMESPACE = "bench-origins"


WARM = [f"warm/{i}" for i in range(50)]


async def _bare_reads(url: str, keys: Sequence[str]) -> list[float]:
    origin = await open_origin(url, 5.0, 1 << 20)
    try:
        for key in keys[:20]:  # warm the connection or the pool threads
            await origin.get(key)
        out = []
        for key in keys:
            t = time.perf_counter()
            value = await origin.get(key)
            out.append((time.perf_counter() - t) * 1000)
            assert value is not None and value.value == VALUE, f"{url}: {key} not preloaded"
        return out
    finally:
        await origin.close()


async def _preload_http(base: str, keys: Sequence[str]) -> None:
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(32)

        async def one(key: str) -> None:
            async with sem, http.put(f"{base}/kv/{key}", data=VALUE) as resp:
                assert resp.status < 300

        await asyncio.gather(*(one(k) for k in keys))


def _preload_redis(server: LocalRedis, keys: Sequence[str]) -> None:
    with server.client() as plain:
        pipe = plain.pipeline(transaction=False)
        for key in keys:
            pipe.hset(key, mapping={"value": VALUE, "content_type": "text/plain"})
        pipe.execute()


async def _measure(origin_urls: dict[str, str], sidecars: dict[str, SidecarProcess], n: int) -> dict[str, Any]:
    keys = [f"k{i}" for i in range(n)]
    result: dict[str, Any] = {}
    for name, url in origin_urls.items():
        bare = await _bare_reads(url, keys)
        port = sidecars[name].port
        deadline = time.monotonic() + 120
        await sequential_gets(port, WARM, deadline)  # JIT, pools and connections warm, as in bench.write
        miss = await sequential_gets(port, keys, deadline)
        hit = await sequential_gets(port, keys, deadline)
        assert dict(miss.x_cache).get("miss", 0) == n, f"{name}: not every first read missed: {dict(miss.x_cache)}"
        result[name] = {
            "bare_ms": summary(bare),
            "miss_ms": summary(miss.latency),
            "hit_ms": summary(hit.latency),
            "statuses": {str(k): v for k, v in miss.statuses.items()},
        }
    return result


def run(quick: bool, out_dir: Path) -> str:
    """Measure every origin; write ``origins.json`` and ``origins.md``; return the Markdown section."""
    n = 200 if quick else 2000
    keys = [f"k{i}" for i in range(n)]
    preload = keys + WARM
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-origins-") as tmp:
        base = Path(tmp)
        db = base / "origin.db"
        asyncio.run(seed_origin(db, ((k, VALUE) for k in preload)))
        zk = LocalZooKeeper(base / "zk")
        redis = LocalRedis(base / "redis")
        upstream: UpstreamProcess | None = None
        procs: dict[str, SidecarProcess] = {}
        try:
            zk.start()
            redis.start()
            upstream = UpstreamProcess()
            asyncio.run(_preload_http(upstream.base, preload))
            _preload_redis(redis, preload)
            urls = {"sqlite": f"sqlite:///{db}", "http": f"{upstream.base}/kv", "redis": redis.url}
            for name, url in urls.items():
                settings = {"zk": zk.hosts, "namespace": f"{NAMESPACE}-{name}", "origin": url, "log_level": "warning"}
                procs[name] = SidecarProcess(base, f"sidecar-{name}", settings)
                procs[name].start()
            data = asyncio.run(_measure(urls, procs, n))
        finally:
            for proc in procs.values():
                proc.stop()
            if upstream is not None:
                upstream.stop()
            redis.stop()
            zk.stop()
    command = "python -m bench.origins" + (" --quick" if quick else "")
    rows = []
    for name, d in data.items():
        added = d["miss_ms"]["p50"] - d["bare_ms"]["p50"]
        rows.append(
            f"| {name} | {fmt(d['bare_ms']['p50'], 3)} / {fmt(d['bare_ms']['p99'], 3)} | "
            f"{fmt(d['miss_ms']['p50'], 3)} / {fmt(d['miss_ms']['p99'], 3)} | {fmt(added, 3)} | "
            f"{d['miss_ms']['p50'] / d['bare_ms']['p50']:.1f}x | "
            f"{fmt(d['hit_ms']['p50'], 3)} / {fmt(d['hit_ms']['p99'], 3)} |"
        )
    md = f"""## The miss path over each origin

One sidecar per origin, one ZooKeeper, loopback; {n:,} distinct keys of 1 KiB, read once (miss) then again (hit),
sequentially on one keep-alive connection, after 50 warm-up reads. Bare read: the same origin code, in the
benchmark's own process. Milliseconds, p50 / p99.

| origin | bare origin read | sidecar miss | added by the sidecar (p50) | miss / bare read (p50) | sidecar hit |
|---|---|---|---|---|---|
{chr(10).join(rows)}

A miss arms the key's watch and reads its version in ZooKeeper (one pipelined round trip) before it reads the
origin; the added column is that round trip plus HTTP and caching.

{machine_line(command, info)}
"""
    write_results(out_dir, "origins", {"keys": n, "origins": data, "machine": info, "command": command}, md)
    return md


def main() -> None:
    """``python -m bench.origins [--quick] [--out DIR]``."""
    run_scenario(run, scenario_parser(__doc__, "origins", "200 keys (a smoke run)").parse_args())


if __name__ == "__main__":
    main()
