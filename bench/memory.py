"""Memory per cached entry: the sidecar's RSS growth while N values are cached, against their payload.

    .venv/bin/python -m bench.memory [--quick] [--out bench/results]

For each value size (100 B and 1 KiB), with N = 100,000 entries (10,000 with
--quick), under a temporary directory, on loopback:

1. a SQLite origin file with N rows is written directly (the sidecar's own
   schema, created by :class:`sidecar.origins.sqlite.SqliteOrigin`);
2. a fresh sidecar (its own namespace on one shared ZooKeeper) starts with
   ``max_entries`` and ``max_bytes`` large enough for all N;
3. one key is read until it is a hit, and the sidecar's ``VmRSS``/``RssAnon``
   are read from ``/proc/<pid>/status``;
4. every key is read once (32 concurrent aiohttp requests): each is a miss
   that reads through (one ZooKeeper ``exists`` watch, one origin read) and
   is cached; RSS is read again at N/10 entries and, after a short settle, at N;
5. ``/v1/stats`` must report N entries; its ``bytes`` (the cache's own
   accounting against ``max_bytes``) is compared with the measured growth;
6. ZooKeeper's ``mntr`` shows znodes and watches before and after the reads
   (reads must create no znodes) and after the sidecar stopped.

"Growth from 1 key" includes one-off costs the first reads pay (32 client
connections, 4 SQLite threads and their page caches); "marginal" (from N/10 to
N entries) excludes them and is the per-entry cost.  The garbage collector of
the sidecar cannot be triggered from outside; RSS is what the kernel reports.
Writes ``memory.json`` and ``memory.md`` to --out.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from harness import LocalZooKeeper
from sidecar.cache import ENTRY_OVERHEAD

from .common import (
    CpuMeter,
    PinnedSidecar,
    cpu_note,
    machine,
    machine_line,
    proc_status_bytes,
    run_scenario,
    scenario_parser,
    seed_origin,
    uses_uvloop,
    write_results,
)
from .lib.http import http_request

__all__ = ["main", "run"]

NAME = "memory"
SIZES = (100, 1024)
CONCURRENCY = 32
CONTENT_TYPE = "application/octet-stream"


def key_of(i: int) -> str:
    """The i-th key: 11 bytes, e.g. ``mem/0000042``."""
    return f"mem/{i:07d}"


def value_of(i: int, size: int) -> bytes:
    """The i-th value: ``size`` bytes, distinct per key."""
    return i.to_bytes(4, "big") + b"v" * (size - 4)


@dataclass(frozen=True)
class Params:
    """Sizes and bounds of one run."""

    quick: bool
    entries: int
    settle: float  # seconds between the last read and the final RSS reading
    fill_timeout: float  # bound on reading all N keys once

    @classmethod
    def of(cls, quick: bool) -> Params:
        """Quick: 10,000 entries per size (about 15 s); full: 100,000 (about 2 minutes)."""
        if quick:
            return cls(quick, entries=10_000, settle=0.5, fill_timeout=60)
        return cls(quick, entries=100_000, settle=2.0, fill_timeout=300)


def mntr(zk: LocalZooKeeper) -> dict[str, int]:
    """ZooKeeper's node count, watch count and approximate data size (``mntr``)."""
    wanted = {"zk_znode_count", "zk_watch_count", "zk_approximate_data_size", "zk_ephemerals_count"}
    return {name.removeprefix("zk_"): int(value) for name, value in zk.mntr(5).items() if name in wanted}


async def read_all(url: str, entries: int, size: int, deadline: float, on_count: dict[int, Any]) -> dict[str, int]:
    """GET every key once, ``CONCURRENCY`` at a time; call ``on_count[n]()`` once n keys were read."""
    outcome = {"miss": 0, "hit": 0, "other": 0}
    next_key = iter(range(entries))
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:

        async def worker() -> None:
            nonlocal done
            for i in next_key:  # shared iterator: each key is taken by exactly one worker
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {entries} keys took too long (stopped at {done})")
                async with http.get(f"{url}/v1/keys/{key_of(i)}") as resp:
                    body = await resp.read()
                    if resp.status != 200 or len(body) != size:
                        raise RuntimeError(f"GET {key_of(i)} -> {resp.status}, {len(body)} bytes")
                    kind = resp.headers.get("X-Cache", "other")
                    outcome[kind if kind in outcome else "other"] += 1
                done += 1
                if done in on_count:
                    on_count[done]()

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcome


def measure_size(tmp: Path, zk: LocalZooKeeper, size: int, p: Params) -> dict[str, Any]:
    """One fresh sidecar caching ``p.entries`` values of ``size`` bytes; RSS and ZooKeeper readings."""
    n = p.entries
    db = tmp / f"origin-{size}.db"
    asyncio.run(seed_origin(db, ((key_of(i), value_of(i, size)) for i in range(n)), CONTENT_TYPE))
    per_entry_charge = size + len(key_of(0)) + ENTRY_OVERHEAD
    sidecar = PinnedSidecar(
        tmp,
        f"mem-{size}",
        {
            "zk": zk.hosts,
            "namespace": f"mem-{size}",
            "origin": f"sqlite:///{db}",
            "log_level": "warning",
            "max_entries": str(n + 16),
            # Twice what the cache will charge, so nothing is evicted.
            "max_bytes": str(max(2 * n * per_entry_charge, 64 * 1024**2)),
            "shutdown_timeout": "3s",
        },
        cpu=None,  # nothing competes here; the fill uses both cores
    )
    try:
        sidecar.start()
        pid = sidecar.pid
        # One key cached and served as a hit: the baseline.
        first = f"/v1/keys/{key_of(0)}"
        deadline = time.monotonic() + 10
        while True:
            status, headers, _ = http_request(sidecar.port, "GET", first, headers={"Cache-Control": "only-if-cached"})
            if status == 200 and dict(headers).get("X-Cache") == "hit":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{first} never became a hit:\n{sidecar.log_tail()}")
            http_request(sidecar.port, "GET", first)
        time.sleep(p.settle)
        zk_before = mntr(zk)
        stats_before = sidecar.stats()
        rss_one = proc_status_bytes(pid)
        tenth = max(1, n // 10)
        rss_tenth: dict[str, int] = {}
        started = time.monotonic()
        outcome = asyncio.run(
            read_all(
                sidecar.url,
                n,
                size,
                started + p.fill_timeout,
                {tenth: lambda: rss_tenth.update(proc_status_bytes(pid))},
            )
        )
        fill_seconds = time.monotonic() - started
        time.sleep(p.settle)
        rss_all = proc_status_bytes(pid)
        stats_after = sidecar.stats()
        zk_after = mntr(zk)
        uvloop_on = uses_uvloop(pid)
    finally:
        sidecar.stop()
    zk_stopped = mntr(zk)

    entries = stats_after["entries"]
    if entries != n or stats_after["evictions"]:
        raise RuntimeError(f"expected {n} entries and no evictions, /v1/stats says {stats_after}")
    growth = rss_all["VmRSS"] - rss_one["VmRSS"]
    anon_growth = rss_all["RssAnon"] - rss_one["RssAnon"]
    marginal = (rss_all["VmRSS"] - rss_tenth["VmRSS"]) / (n - tenth)
    payload = size + len(key_of(0).encode())
    per_entry = growth / (n - 1)  # the first key was cached before the baseline
    accounting = stats_after["bytes"] / entries
    return {
        "value_bytes": size,
        "key_bytes": len(key_of(0).encode()),
        "entries": entries,
        "payload_per_entry": payload,
        "rss_one_key": rss_one,
        "rss_tenth": rss_tenth,
        "rss_all": rss_all,
        "rss_growth_bytes": growth,
        "rss_anon_growth_bytes": anon_growth,
        "rss_growth_per_entry": per_entry,
        "rss_per_entry": per_entry,  # the same, under the name bench.plots reads
        "rss_anon_growth_per_entry": anon_growth / (n - 1),
        "marginal_per_entry": marginal,
        "ratio_growth_to_payload": per_entry / payload,
        "ratio_marginal_to_payload": marginal / payload,
        "accounting_bytes": stats_after["bytes"],
        "accounting_per_entry": accounting,
        "accounted_per_entry": accounting,  # the same, under the name bench.plots reads
        "accounting_over_growth": accounting / per_entry,
        "accounting_over_marginal": accounting / marginal,
        "reads": outcome,
        "misses_delta": stats_after["misses"] - stats_before["misses"],
        "hits_delta": stats_after["hits"] - stats_before["hits"],
        "fill_seconds": fill_seconds,
        "fill_rate": n / fill_seconds,
        "zookeeper": {"before": zk_before, "after": zk_after, "after_stop": zk_stopped},
        "uvloop": uvloop_on,
    }


def run(quick: bool, out_dir: Path) -> str:
    """Measure both value sizes; write ``memory.json``/``memory.md``; return the Markdown."""
    p = Params.of(quick)
    started = time.monotonic()
    info = machine()
    command = f"python -m bench.memory{' --quick' if quick else ''}"
    results: list[dict[str, Any]] = []
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-mem-") as tmpdir:
        tmp = Path(tmpdir)
        zk = LocalZooKeeper(tmp / "zk")
        try:
            zk.start()
            for size in SIZES:
                results.append(measure_size(tmp, zk, size, p))
                r = results[-1]
                print(
                    f"memory: {size} B x {r['entries']}: {r['rss_growth_per_entry']:.0f} B/entry RSS "
                    f"(marginal {r['marginal_per_entry']:.0f}), {r['fill_rate']:.0f} misses/s",
                    flush=True,
                )
            cpu = meter.read([zk.proc.pid] if zk.proc is not None else [])
        finally:
            zk.stop()
    data = {
        "name": NAME,
        "command": command,
        "machine": info,
        "params": p.__dict__,
        "entry_overhead_charged": ENTRY_OVERHEAD,
        "sizes": results,  # one row per value size (bench.plots reads this list)
        "cpu": cpu,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    markdown = report(data)
    write_results(out_dir, NAME, data, markdown)
    return markdown


def report(d: dict[str, Any]) -> str:
    """The Markdown section for one run."""
    res = d["sizes"]
    n = d["params"]["entries"]
    lines = [
        "## Memory per cached entry",
        "",
        f"One fresh sidecar per value size, {n:,} keys of 11 bytes read once each through the sidecar "
        f"({CONCURRENCY} concurrent), so each is one cached entry (and one ZooKeeper watch). "
        "RSS from `/proc/<pid>/status`; bytes per entry.",
        "",
        "| value size | entries | payload (value + key) | RSS growth from 1 key | / payload "
        "| marginal RSS (N/10 -> N) | / payload | RssAnon growth | cache accounting (`bytes`/entries) "
        "| accounting / RSS growth | misses/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['value_bytes']:,} B | {r['entries']:,} | {r['payload_per_entry']:,} "
            f"| {r['rss_growth_per_entry']:,.0f} | {r['ratio_growth_to_payload']:.2f}x "
            f"| {r['marginal_per_entry']:,.0f} | {r['ratio_marginal_to_payload']:.2f}x "
            f"| {r['rss_anon_growth_per_entry']:,.0f} | {r['accounting_per_entry']:,.0f} "
            f"| {r['accounting_over_growth']:.2f} | {r['fill_rate']:,.0f} |"
        )
    kib = next((r for r in res if r["value_bytes"] == 1024), None)
    if kib is not None:
        ratio = kib["ratio_growth_to_payload"]
        lines += [
            "",
            f"- 1 KiB values: RSS growth / payload **{ratio:.2f}x** (goal <= 2x: {'met' if ratio <= 2 else 'not met'});"
            f" marginal {kib['ratio_marginal_to_payload']:.2f}x.",
        ]
    lines += [
        f"- The cache charges value + key + {d['entry_overhead_charged']} B per entry against `max_bytes`; "
        "accounting / RSS growth below 1 means `max_bytes` undercounts the real footprint by that factor.",
        "- Besides the cache entry, each key's growth includes kazoo's record of its watch in the sidecar "
        "(a set of callbacks keyed by the znode path, kept until the watch fires or the session ends).",
    ]
    lines += [
        "",
        "ZooKeeper (`mntr`) around the reads: reads create no znodes, only watches (one `exists` watch per key, "
        "kept in ZooKeeper's memory and dropped with the session).",
        "",
        "| value size | znodes before -> after reads | watches before -> after reads -> after the sidecar stopped "
        "| approximate data size before -> after (B) |",
        "|---|---|---|---|",
    ]
    for r in res:
        z = r["zookeeper"]
        b, a, s = z["before"], z["after"], z["after_stop"]
        lines.append(
            f"| {r['value_bytes']:,} B | {b['znode_count']:,} -> {a['znode_count']:,} "
            f"| {b['watch_count']:,} -> {a['watch_count']:,} -> {s['watch_count']:,} "
            f"| {b['approximate_data_size']:,} -> {a['approximate_data_size']:,} |"
        )
    created = [r["zookeeper"]["after"]["znode_count"] - r["zookeeper"]["before"]["znode_count"] for r in res]
    checks = [
        f"{r['value_bytes']} B: /v1/stats entries {r['entries']:,}, misses +{r['misses_delta']:,}, "
        f"responses {r['reads']['miss']:,} miss / {r['reads']['hit']:,} hit"
        for r in res
    ]
    lines += [
        "",
        f"Checks: {'; '.join(checks)}; znodes created by reads: {created}.",
        "",
        cpu_note(d["cpu"]),
        "",
        machine_line(d["command"], d["machine"], all(r["uvloop"] for r in res))
        + f" Wall time {d['wall_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m bench.memory [--quick] [--out DIR]``."""
    run_scenario(run, scenario_parser(__doc__, "memory", "10,000 entries per size instead of 100,000").parse_args())


if __name__ == "__main__":
    main()
