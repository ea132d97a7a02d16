"""Watches held in ZooKeeper against what the sidecar caches (issue #11).

    .venv/bin/python -m bench.watches [--quick] [--out bench/results]

One ZooKeeper and one sidecar with ``max_entries = 100`` on a SQLite origin
with 2,000 rows (all under a temporary directory, on loopback):

1. 5,000 reads of keys the origin does not have (1,000 with --quick), 32 at
   a time: each is a miss that arms the key's watch and reads the origin;
2. 2,000 reads of keys it has (500 with --quick): each is cached, and the
   LRU keeps the last 100.

After each step ZooKeeper's ``mntr`` gives ``zk_watch_count`` (every watch
it holds, the sidecar's namespace watches included), and ``/proc`` the
sidecar's RSS.

Then ZooKeeper's own memory per watch: 50,000 znodes (5,000 with --quick),
the JVM's live heap (``jcmd GC.class_histogram``, which runs a full GC first), one
session setting a data watch on each, the heap again, a second session
watching the same paths, the heap again.  Skipped when ``jcmd`` (a JDK
tool) is not installed.  The bound a sidecar must keep: key watches <= entries +
fills in flight (0 at rest) + its few namespace watches.  The figures of
the code before watch removal are those measured in issue #11 (one watch
per key ever read: 5,000 and 2,000).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kazoo.client import KazooClient

from harness import LocalZooKeeper

from .common import (
    PinnedSidecar,
    jvm_live_heap,
    machine,
    machine_line,
    proc_status_bytes,
    run_scenario,
    scenario_parser,
    seed_origin,
    write_results,
)
from .lib.stats import MIB

MAX_ENTRIES = 100


def _watch_count(zk: LocalZooKeeper) -> int:
    return int(zk.mntr()["zk_watch_count"])


async def _read_all(base: str, keys: list[str], expect: int) -> None:
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(key: str) -> None:
            async with sem, http.get(f"{base}/v1/keys/{key}") as resp:
                await resp.read()
                if resp.status != expect:
                    raise RuntimeError(f"GET {key}: {resp.status}, expected {expect}")

        await asyncio.gather(*(one(k) for k in keys))


def _settled(zk: LocalZooKeeper, sidecar: PinnedSidecar, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    # Removals are pipelined after the answers: wait until the count stops moving.
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        count = _watch_count(zk)
        stats = sidecar.stats()
        if (count == last and stats["fills_in_flight"] == 0) or time.monotonic() > deadline:
            return count, stats
        last = count
        time.sleep(0.2)


def _watch_heap(zk: LocalZooKeeper, znodes: int) -> dict[str, Any] | None:
    """ZooKeeper's live heap with ``znodes`` znodes, then with one and two sessions watching each."""
    if zk.proc is None or shutil.which("jcmd") is None:
        return None
    pid = zk.proc.pid
    paths = [f"/watchprobe/{i // 1000:03d}/k{i:06d}" for i in range(znodes)]
    clients = [KazooClient(hosts=zk.hosts) for _ in range(2)]
    for client in clients:
        client.start(timeout=10)
    try:
        creator = clients[0]
        for bucket in sorted({p.rsplit("/", 1)[0] for p in paths}):
            creator.ensure_path(bucket)
        for start in range(0, znodes, 1000):
            for result in [creator.create_async(p, b"") for p in paths[start : start + 1000]]:
                result.get(timeout=30)
        heaps = [jvm_live_heap(pid)]
        counts = [int(zk.mntr()["zk_watch_count"])]
        for client in clients:
            for start in range(0, znodes, 1000):
                for result in [client.exists_async(p, watch=lambda _e: None) for p in paths[start : start + 1000]]:
                    result.get(timeout=30)
            heaps.append(jvm_live_heap(pid))
            counts.append(int(zk.mntr()["zk_watch_count"]))
    finally:
        for client in clients:
            client.stop()
            client.close()
    if None in heaps:
        return None
    h = [int(x) for x in heaps if x is not None]
    return {
        "znodes": znodes,
        "live_heap_bytes": h,
        "watch_counts": counts,
        "bytes_per_watch_first_session": (h[1] - h[0]) / max(counts[1] - counts[0], 1),
        "bytes_per_watch_second_session": (h[2] - h[1]) / max(counts[2] - counts[1], 1),
    }


def run(quick: bool, out_dir: Path) -> str:
    """Measure, write ``watches.json`` and ``watches.md``, return the Markdown section."""
    absent_n, present_n = (1000, 500) if quick else (5000, 2000)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-watches-") as tmp:
        db = Path(tmp) / "origin.db"
        asyncio.run(seed_origin(db, ((f"present/{i:05d}", b"x" * 1024) for i in range(present_n))))
        zk = LocalZooKeeper(Path(tmp) / "zk")
        zk.start()
        sidecar = PinnedSidecar(
            tmp,
            "watches",
            {
                "zk": zk.hosts,
                "namespace": "watches",
                "origin": f"sqlite:///{db}",
                "log_level": "warning",
                "max_entries": str(MAX_ENTRIES),
            },
        )
        try:
            sidecar.start(wait_ready=True, timeout=30)
            idle, _ = _settled(zk, sidecar)
            rss_idle = proc_status_bytes(sidecar.pid)["VmRSS"]
            asyncio.run(_read_all(sidecar.url, [f"absent/{i:05d}" for i in range(absent_n)], 404))
            after_absent, stats_absent = _settled(zk, sidecar)
            rss_absent = proc_status_bytes(sidecar.pid)["VmRSS"]
            asyncio.run(_read_all(sidecar.url, [f"present/{i:05d}" for i in range(present_n)], 200))
            after_present, stats_present = _settled(zk, sidecar)
            rss_present = proc_status_bytes(sidecar.pid)["VmRSS"]
            heap = _watch_heap(zk, 5000 if quick else 50000)
        finally:
            sidecar.stop()
            zk.stop()
    data = {
        "absent_reads": absent_n,
        "present_reads": present_n,
        "max_entries": MAX_ENTRIES,
        "watches_idle": idle,
        "watches_after_absent": after_absent,
        "watches_after_present": after_present,
        "entries_after_present": stats_present["entries"],
        "sidecar_key_watches": [stats_absent["zookeeper"]["key_watches"], stats_present["zookeeper"]["key_watches"]],
        "removals": stats_present["zookeeper"]["watch_removals"],
        "rss_mib": [rss_idle / MIB, rss_absent / MIB, rss_present / MIB],
        "zookeeper_heap_per_watch": heap,
    }
    if heap is None:
        heap_line = "ZooKeeper's heap per watch: not measured (`jcmd`, a JDK tool, is not installed)."
    else:
        heap_line = (
            "ZooKeeper's live heap per data watch (`jcmd GC.class_histogram` after a full GC, "
            f"{heap['znodes']:,} znodes): "
            f"{heap['bytes_per_watch_first_session']:.0f} B for the first session watching a path, "
            f"{heap['bytes_per_watch_second_session']:.0f} B for a second session watching the same paths."
        )
    entries = stats_present["entries"]
    before_present = idle + absent_n + present_n
    command = "python -m bench.watches" + (" --quick" if quick else "")
    md = f"""## Watches held against what is cached

One sidecar, `max_entries = {MAX_ENTRIES}`, SQLite origin; ZooKeeper's own count (`mntr` `zk_watch_count`,
the sidecar's {idle} namespace watches included); RSS from `/proc`.

| after | watches in ZooKeeper | without removal (one per key read) | entries | sidecar RSS |
|---|---|---|---|---|
| start (idle) | {idle} | {idle} | 0 | {rss_idle / MIB:.0f} MiB |
| {absent_n:,} reads of absent keys | {after_absent} | {idle + absent_n:,} | 0 | {rss_absent / MIB:.0f} MiB |
| {present_n:,} reads of present keys | {after_present} | {before_present:,} | {entries} | {rss_present / MIB:.0f} MiB |

Bound (entries + fills in flight + namespace watches): {entries + idle}; held:
{after_present}. removeWatches requests sent: {data["removals"]:,}.

{heap_line}

{machine_line(command, info)}
"""
    write_results(out_dir, "watches", data, md)
    return md


def main() -> None:
    parser = scenario_parser(__doc__, "watches", "1,000 absent and 500 present keys")
    run_scenario(run, parser.parse_args())


if __name__ == "__main__":
    main()
