"""Scale curves: miss latency, propagation, memory and revalidation with 10^3 .. 10^6 keys.

    .venv/bin/python -m bench.scale [--quick] [--out bench/results]

Starts its own ZooKeeper (with a larger heap: 10^6 znodes do not fit in the
256 MB that ``LocalZooKeeper`` gives the JVM) and two sidecars, A (the writer)
and B (the one under test, whose cache grows), on one SQLite origin, under a
temporary directory; stops them at the end.  The key count grows in steps
(10^3, 10^4, 10^5, 10^6; quick: 10^3, 10^4), and at each step:

1. ZooKeeper gets version znodes for every key up to that count, at their real
   paths (``Layout.version_path``), with a write's JSON note as data, created
   in multi-op transactions of 1000, a few in flight;
2. B's cache is filled to min(count, 10^5) entries: rows written straight into
   the SQLite file, then read through B (each read is a miss that arms a watch);
3. 200 fresh misses on B, sequential on one keep-alive connection (keys with a
   version znode, not cached);
4. propagation: 100 writes of one key through A while B holds it
   (``bench.fanout``'s rounds with one watcher): ack -> dropped on B;
5. RSS of B, A and ZooKeeper; ZooKeeper's znode and watch counts (``mntr``)
   and its live heap after a full GC (``jcmd GC.class_histogram``);
6. at 10^4 and 10^5 cached keys (quick: 10^4), revalidation after a reconnect,
   as ``bench.revalidation`` measures it (the time the sidecar reports for
   re-arming and comparing every cached key, and until ``/readyz``): here the
   connection is cut by killing B's ZooKeeper socket with ``ss -K``, so B needs
   no proxy in front of ZooKeeper for the other measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from harness import LocalZooKeeper, SidecarProcess
from sidecar.coordination.layout import Layout

from .common import (
    command_line,
    jvm_live_heap,
    machine,
    proc_status_bytes,
    progress,
    run_async,
    run_scenario,
    scenario_parser,
    seed_origin,
    start_sidecars,
    write_results,
)
from .fanout import propagation_rounds
from .lib.http import RawConn, key_path, sequential_gets
from .lib.stats import fmt, mib, pct

NAMESPACE = "scale"
ROOT = f"/zkcache/{NAMESPACE}"
CACHE_CAP = 100_000  # entries B caches at most (the daemon's default max_entries)
MISSES = 200
VALUE = b"v" * 100
NOTE = b'{"op":"put","by":"bench-scale"}'  # never empty: empty data means "write in progress"
ZK_HEAP = "2g"
TXN_OPS = 1000  # creates per multi: about 60 KB per request, well under jute.maxbuffer
TXN_IN_FLIGHT = 4


def cache_key(i: int) -> str:
    """The i-th key: version znode at every size, cached by B while i < 10^5."""
    return f"k{i}"


def miss_key(size: int, i: int) -> str:
    """A key with a version znode and an origin row, never read before the miss measurement at ``size``."""
    return f"m{size}/{i}"


def create_version_znodes(client: KazooClient, layout: Layout, keys: Iterator[str], deadline: float) -> Counter[str]:
    """Create the version znode of every key, in pipelined multi-op transactions; returns error counts."""
    errors: Counter[str] = Counter()
    slots = threading.Semaphore(TXN_IN_FLIGHT)

    def done(result: Any) -> None:
        try:
            for r in result.get():
                if isinstance(r, Exception):
                    errors[type(r).__name__] += 1
        except Exception as exc:  # the whole transaction failed
            errors[type(exc).__name__] += TXN_OPS
        finally:
            slots.release()

    while batch := list(itertools.islice(keys, TXN_OPS)):
        if time.monotonic() > deadline:
            errors["not created: out of time"] += len(batch)
            continue
        if not slots.acquire(timeout=60):
            raise RuntimeError("ZooKeeper did not answer a transaction within 60 s")
        txn = client.transaction()
        for key in batch:
            txn.create(layout.version_path(key), NOTE)
        txn.commit_async().rawlink(done)
    for _ in range(TXN_IN_FLIGHT):  # every transaction answered
        slots.acquire(timeout=60)
    return errors


def create_buckets(client: KazooClient, layout: Layout) -> None:
    """The 65,536 bucket parents under ``versions/`` (``<hh>/<hh>``: the key's 16-bit hash, see layout.py)."""
    client.ensure_path(layout.versions)
    for high in range(256):
        txn = client.transaction()
        txn.create(f"{layout.versions}/{high:02x}")
        for low in range(256):
            txn.create(f"{layout.versions}/{high:02x}/{low:02x}")
        failed = [r for r in txn.commit() if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"creating the bucket znodes failed: {failed[0]!r}")


# -- revalidation ---------------------------------------------------------------------
def kill_zk_connection(pid: int, zk_port: int) -> int:
    """Reset process ``pid``'s TCP connections to ZooKeeper (``ss -K``); returns how many were killed."""
    try:
        listing = subprocess.run(
            ["ss", "-tnpH", "state", "established", "dport", "=", f":{zk_port}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        killed = 0
        for line in listing.splitlines():
            if f"pid={pid}," not in line:
                continue
            local = next(f for f in line.split() if f.startswith("127.0.0.1:"))
            result = subprocess.run(
                ["ss", "-K", "-tnH", "state", "established", "src", local, "dport", "=", f":{zk_port}"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            killed += sum(1 for out in result.stdout.splitlines() if out.strip())
        return killed
    except (OSError, subprocess.SubprocessError, StopIteration):
        return 0  # no ss, or no such socket: the caller reports "not measured"


def revalidate(sc: SidecarProcess, zk_port: int, timeout: float) -> dict[str, Any]:
    """Cut the sidecar's ZooKeeper connection (same session survives) and wait until it revalidated and is ready."""
    assert sc.proc is not None
    before = sc.stats()
    count = before["revalidation"]["count"]
    cut = time.monotonic()
    if kill_zk_connection(sc.proc.pid, zk_port) == 0:
        return {"error": "ss -K killed no connection (kernel without SOCK_DESTROY, or not permitted)"}
    deadline = cut + timeout
    stats = before
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            stats = sc.stats()
            if stats["revalidation"]["count"] > count and stats["zookeeper"]["ready"]:
                break
        time.sleep(0.02)
    else:
        return {"error": f"not revalidated and ready within {timeout:g}s", "stats": stats}
    reval = stats["revalidation"]
    return {
        "entries": reval["entries"],
        "dropped": reval["dropped"],
        "seconds": reval["seconds"],
        "us_per_key": reval["seconds"] / max(reval["entries"], 1) * 1e6,
        "cut_to_ready_s": time.monotonic() - cut,
        "same_session": stats["zookeeper"]["sessions"] == before["zookeeper"]["sessions"],
    }


# -- the steps --------------------------------------------------------------------------
async def fill_cache(port: int, keys: list[str], connections: int = 32) -> dict[str, Any]:
    """Read every key through the sidecar (misses), ``connections`` keep-alive connections at once."""
    todo = iter(keys)
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        conn = await RawConn(port).open()
        try:
            for key in todo:
                statuses[(await conn.request("GET", key_path(key))).status] += 1
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds = time.monotonic() - started
    return {"keys": len(keys), "seconds": seconds, "per_s": len(keys) / max(seconds, 1e-9), "statuses": dict(statuses)}


def _step(
    size: int,
    prev: int,
    zk: LocalZooKeeper,
    client: KazooClient,
    a: SidecarProcess,
    b: SidecarProcess,
    writes: int,
    revalidate_here: bool,
) -> dict[str, Any]:
    layout = Layout(ROOT)
    step: dict[str, Any] = {"keys": size}
    progress(f"scale: {size} keys: creating {size - prev + MISSES} version znodes")
    started = time.monotonic()
    names = itertools.chain((cache_key(i) for i in range(prev, size)), (miss_key(size, i) for i in range(MISSES)))
    errors = create_version_znodes(client, layout, names, time.monotonic() + 300)
    step["znodes"] = {"created_s": time.monotonic() - started, "errors": dict(errors)}

    cached, cached_before = min(size, CACHE_CAP), min(prev, CACHE_CAP)
    progress(f"scale: {size} keys: filling B's cache to {cached} entries")
    step["fill"] = run_async(fill_cache(b.port, [cache_key(i) for i in range(cached_before, cached)]))
    step["cached"] = cached
    step["b_entries"] = b.stats()["entries"]

    progress(f"scale: {size} keys: {MISSES} misses, {writes} propagation rounds")
    misses = run_async(sequential_gets(b.port, [miss_key(size, i) for i in range(MISSES)], time.monotonic() + 120))
    step["miss"] = misses.as_json()
    rounds = run_async(propagation_rounds(a.port, [b.port], "prop", writes, time.monotonic() + 120))
    step["propagation"] = rounds.as_json()

    assert a.proc is not None and b.proc is not None and zk.proc is not None
    m = zk.mntr()
    step["rss"] = {
        name: proc_status_bytes(proc.pid)["VmRSS"]
        for name, proc in (("b", b.proc), ("a", a.proc), ("zookeeper", zk.proc))
    }
    step["mntr"] = {
        k: m.get(k) for k in ("zk_znode_count", "zk_watch_count", "zk_approximate_data_size", "zk_avg_latency")
    }
    step["zk_live_heap"] = jvm_live_heap(zk.proc.pid)
    if revalidate_here:
        progress(f"scale: {size} keys: revalidation of {cached} cached keys after a reconnect")
        step["revalidation"] = revalidate(b, zk.port, timeout=180)
    return step


def markdown(data: dict[str, Any], quick: bool) -> str:
    """The report section."""
    m = data["machine"]
    lines = [
        "## Scale: 10^3 to 10^6 keys",
        "",
        f"Sidecar B caches min(keys, 10^5) entries of 100 B; ZooKeeper holds a version znode per key (real layout, "
        f"JSON note as data), standalone, JVM -Xmx{ZK_HEAP} and serial GC; loopback, {m['nproc']} cores ({m['cpu']}), "
        f"Python {m['python']}, {m['date']}. Misses: {MISSES} fresh keys, sequential on one connection. "
        "Propagation: writes of one key through sidecar A while B holds it.",
        "",
        "| keys (znodes) | cached on B | miss p50 | miss p99 | ack -> dropped p50 | ack -> dropped p99 "
        "| sent -> dropped p50 | sent -> dropped p99 | PUT p50 | B RSS (MB) | ZooKeeper RSS / live heap (MB) "
        "| watches | znodes created in |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["steps"]:
        p = s["propagation"]
        lines.append(
            f"| {s['keys']:,} ({s['mntr'].get('zk_znode_count')}) | {s['b_entries']:,} | "
            f"{fmt(s['miss']['latency']['p50'])} | {fmt(s['miss']['latency']['p99'])} | "
            f"{fmt(pct(p['ack_to_drop'], 50))} | {fmt(pct(p['ack_to_drop'], 99))} | "
            f"{fmt(pct(p['sent_to_drop'], 50))} | {fmt(pct(p['sent_to_drop'], 99))} | {fmt(pct(p['put'], 50))} | "
            f"{mib(s['rss']['b'])} | {mib(s['rss']['zookeeper'])} / {mib(s['zk_live_heap'])} | "
            f"{s['mntr'].get('zk_watch_count')} | {s['znodes']['created_s']:.1f} s |"
        )
    lines += ["", "Latencies in ms. Filling B's cache through the sidecar (concurrent misses, 32 connections):", ""]
    lines.append(
        "; ".join(
            f"to {s['cached']:,}: {s['fill']['keys']:,} reads in {s['fill']['seconds']:.1f} s "
            f"({s['fill']['per_s']:.0f}/s)"
            for s in data["steps"]
            if s["fill"]["keys"]
        )
        + "."
    )
    problems = [
        f"{s['keys']:,} keys: {what}"
        for s in data["steps"]
        for what in (
            *(f"{n} znode creates failed ({e})" for e, n in s["znodes"]["errors"].items()),
            *([f"{s['propagation']['not_dropped']} rounds not dropped"] if s["propagation"]["not_dropped"] else []),
            *([f"{s['propagation']['stale_reads']} stale reads"] if s["propagation"]["stale_reads"] else []),
            *([f"misses answered {s['miss']['x_cache']}"] if set(s["miss"]["x_cache"]) != {"miss"} else []),
            *([f"cache fill answered {s['fill']['statuses']}"] if set(s["fill"]["statuses"]) - {200} else []),
        )
    ]
    if problems:
        lines += ["", "Anomalies: " + "; ".join(problems) + "."]
    revals = [s for s in data["steps"] if "revalidation" in s]
    if revals:
        lines += [
            "",
            "Revalidation after a reconnect (B's ZooKeeper connection reset with `ss -K`; same session):",
            "",
            "| keys (znodes) | cached keys revalidated | dropped | re-arm + compare, measured by B | per key "
            "| cut -> /readyz 200 (incl. kazoo's reconnect) |",
            "|---|---|---|---|---|---|",
        ]
        for s in revals:
            r = s["revalidation"]
            if "error" in r:
                lines.append(f"| {s['keys']:,} | not measured: {r['error']} | | | | |")
                continue
            lines.append(
                f"| {s['keys']:,} | {r['entries']:,}{'' if r['same_session'] else ' (new session!)'} | "
                f"{r['dropped']} | {r['seconds'] * 1000:.0f} ms | {r['us_per_key']:.1f} us | "
                f"{r['cut_to_ready_s'] * 1000:.0f} ms |"
            )
    lines += [
        "",
        f"Reproduce: `{command_line('scale', quick)}` (starts and stops its own ZooKeeper and sidecars; "
        "creating 10^6 znodes takes ZooKeeper about 20 s and 1 GB of memory). Figures move between runs on a "
        "shared machine; compare within one run.",
    ]
    return "\n".join(lines)


def run(quick: bool, out_dir: Path) -> str:
    """Run the scale steps; write ``scale.json``; return the Markdown section."""
    started = time.monotonic()
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    revalidate_at = {10_000} if quick else {10_000, 100_000}
    writes = 30 if quick else 100
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "origin.db"
        cached = min(max(sizes), CACHE_CAP)
        rows = itertools.chain(
            ((cache_key(i), VALUE) for i in range(cached)),
            ((miss_key(size, i), VALUE) for size in sizes for i in range(MISSES)),
        )
        progress(f"scale: writing {cached + MISSES * len(sizes)} rows into the SQLite origin")
        run_async(seed_origin(db, rows, "application/octet-stream"))
        zk = LocalZooKeeper(tmp / "zk", heap=ZK_HEAP)
        client = KazooClient(hosts=zk.hosts)
        common = {"zk": zk.hosts, "namespace": NAMESPACE, "origin": f"sqlite:///{db}", "log_level": "warning"}
        a = SidecarProcess(tmp, "a", dict(common))
        # Room for every cached key plus every step's misses: nothing is evicted.
        b = SidecarProcess(tmp, "b", {**common, "max_entries": str(CACHE_CAP + MISSES * len(sizes) + 100)})
        try:
            progress(f"scale: starting ZooKeeper ({ZK_HEAP})")
            zk.start()
            client.start(30)
            create_buckets(client, Layout(ROOT))
            start_sidecars([a, b])
            prev = 0
            for size in sizes:
                steps.append(_step(size, prev, zk, client, a, b, writes, size in revalidate_at))
                prev = size
        finally:
            b.stop()
            a.stop()
            with contextlib.suppress(Exception):
                client.stop()
                client.close()
            zk.stop()
    data = {
        "machine": machine(),
        "quick": quick,
        "command": command_line("scale", quick),
        "zk_jvm_flags": ZK_HEAP,
        "steps": steps,
        "wall_seconds": time.monotonic() - started,
    }
    text = markdown(data, quick)
    write_results(out_dir, "scale", data, text)
    return text


def main() -> None:
    """``python -m bench.scale [--quick] [--out DIR]``."""
    run_scenario(run, scenario_parser(__doc__, "scale", "10^3 and 10^4 keys only (a smoke run)").parse_args())


if __name__ == "__main__":
    main()
