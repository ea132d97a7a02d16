"""A ZooKeeper rolling restart under load: what two sidecars with N cached keys cost the origin and ZooKeeper.

    .venv/bin/python -m bench.recovery [--keys 20000] [--quick] [--out bench/results]

A 3-node ensemble on loopback, a SQLite origin with N rows, two sidecars
that read all N keys first (each caches N), then steady load from this
process: reads of random keys spread over both sidecars (about 600/s) and a
write every 200 ms through sidecar 1.  After a 10 s baseline, every server
is stopped cleanly and started again in turn, the leader last, with a few
seconds between them.  Measured through the whole restart, against the
baseline's rates:

* origin reads above baseline (the sidecars' misses plus uncached bypass
  reads, from ``/v1/stats``), as a share of the cached entries;
* reads answered 5xx, writes refused;
* the longest time each sidecar was not ready (``/readyz`` polled every 50 ms);
* ZooKeeper packets received above baseline (``mntr`` on every server), per
  cached entry.

Issue #11 measured the code before setWatches and watch removal on the same
scenario with 20,000 keys: 6.6 to 13.7% of the cached entries re-read from
the origin, each sidecar not ready for 10 to 16 s (writes refused all that
time), up to 7,000 ZooKeeper packets/s against 46.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.dev import SidecarProcess
from sidecar.dev.zookeeper import LocalEnsemble, LocalZooKeeper

from .common import create_origin_schema, graceful_sigterm, machine, machine_line, write_results

READS_PER_SECOND = 600
WRITE_INTERVAL = 0.2
BASELINE_SECONDS = 10.0
SETTLE_SECONDS = 3.0  # between one server being back and the next stop


def _packets(servers: list[LocalZooKeeper]) -> int:
    total = 0
    for server in servers:
        if server.proc is None:
            continue
        try:
            # A server still starting answers mntr without its counters.
            total += int(server.mntr().get("zk_packets_received", 0))
        except OSError:
            pass  # stopping or starting
    return total


def _origin_reads(sidecars: list[SidecarProcess]) -> int:
    return sum(s.stats()["misses"] + s.stats()["bypassed_reads"] for s in sidecars)


class Load:
    """Reads and writes from this process, counted, until stopped."""

    def __init__(self, sidecars: list[SidecarProcess], keys: int) -> None:
        self.sidecars, self.keys = sidecars, keys
        self.reads = self.read_errors = self.writes = self.write_errors = 0
        self.not_ready: list[list[tuple[float, float]]] = [[] for _ in sidecars]
        self.packets = 0  # received by every server since the load began
        self._stop = asyncio.Event()

    async def run(self, servers: list[LocalZooKeeper]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await asyncio.gather(
                self._reader(http),
                self._writer(http),
                self._count_packets(servers),
                *(self._ready(i) for i in range(2)),
            )

    async def _count_packets(self, servers: list[LocalZooKeeper]) -> None:
        # mntr counters restart at zero with their server: sum each server's increments.
        last: dict[int, int] = {}
        while not self._stop.is_set():
            for server in servers:
                value = await asyncio.to_thread(_packets, [server])
                if value == 0 and server.proc is None:
                    continue
                before = last.get(server.port, value)
                self.packets += value - before if value >= before else value
                last[server.port] = value
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()

    async def _reader(self, http: aiohttp.ClientSession) -> None:
        rng = random.Random(1)
        interval = 1 / READS_PER_SECOND
        next_at = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            side = self.sidecars[rng.randrange(2)]
            key = f"k/{rng.randrange(self.keys):06d}"
            task = asyncio.ensure_future(self._read(http, side, key))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if pending:
            await asyncio.wait(pending)

    async def _read(self, http: aiohttp.ClientSession, side: SidecarProcess, key: str) -> None:
        try:
            async with http.get(f"{side.url}/v1/keys/{key}") as resp:
                await resp.read()
                self.reads += 1
                self.read_errors += resp.status >= 500
        except (aiohttp.ClientError, TimeoutError):
            self.read_errors += 1

    async def _writer(self, http: aiohttp.ClientSession) -> None:
        rng = random.Random(2)
        while not self._stop.is_set():
            key = f"k/{rng.randrange(self.keys):06d}"
            try:
                async with http.put(f"{self.sidecars[0].url}/v1/keys/{key}", data=b"w" * 1024) as resp:
                    await resp.read()
                    self.writes += 1
                    self.write_errors += resp.status >= 500
            except (aiohttp.ClientError, TimeoutError):
                self.write_errors += 1
            await asyncio.sleep(WRITE_INTERVAL)

    async def _ready(self, i: int) -> None:
        down_since: float | None = None
        while not self._stop.is_set():
            ready = await asyncio.to_thread(self.sidecars[i].is_ready)
            now = time.monotonic()
            if not ready and down_since is None:
                down_since = now
            elif ready and down_since is not None:
                self.not_ready[i].append((down_since, now))
                down_since = None
            await asyncio.sleep(0.05)
        if down_since is not None:
            self.not_ready[i].append((down_since, time.monotonic()))


async def _fill(sidecar: SidecarProcess, keys: int) -> None:
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            async with sem, http.get(f"{sidecar.url}/v1/keys/k/{i:06d}") as resp:
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(keys)))


def _rolling_restart(ensemble: LocalEnsemble) -> list[str]:
    order = [s for s in ensemble.servers if s.mode() != "leader"] + [ensemble.leader()]
    done = []
    for server in order:
        mode = server.mode()
        server.stop()
        time.sleep(1.0)
        server.start()
        deadline = time.monotonic() + 60
        while server.mode() not in ("leader", "follower"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {server.port} did not rejoin")
            time.sleep(0.1)
        done.append(f"{mode} {server.port}")
        time.sleep(SETTLE_SECONDS)
    return done


async def _measure(keys: int, tmp: Path) -> dict[str, Any]:
    db = tmp / "origin.db"
    await create_origin_schema(db)
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO kv (key, value, content_type, updated_at) VALUES (?, ?, 'text/plain', 0)",
        [(f"k/{i:06d}", b"x" * 1024) for i in range(keys)],
    )
    conn.commit()
    conn.close()
    ensemble = LocalEnsemble(tmp / "zk")
    await asyncio.to_thread(ensemble.start)
    sidecars = [
        SidecarProcess(
            tmp,
            f"rr{i}",
            {
                "zk": ensemble.hosts,
                "namespace": "recovery",
                "origin": f"sqlite:///{db}",
                "log_level": "warning",
                "max_entries": str(keys * 2),
                "zk_session_timeout": "10s",
            },
        )
        for i in range(2)
    ]
    try:
        for s in sidecars:
            await asyncio.to_thread(s.start, True, 60)
        for s in sidecars:
            await _fill(s, keys)
        cached = [s.stats()["entries"] for s in sidecars]
        load = Load(sidecars, keys)
        runner = asyncio.ensure_future(load.run(ensemble.servers))
        await asyncio.sleep(2.0)  # warm
        origin0, packets0, t0 = _origin_reads(sidecars), load.packets, time.monotonic()
        await asyncio.sleep(BASELINE_SECONDS)
        origin1, packets1, t1 = _origin_reads(sidecars), load.packets, time.monotonic()
        base_origin_rate = (origin1 - origin0) / (t1 - t0)
        base_packet_rate = (packets1 - packets0) / (t1 - t0)
        errors_before = (load.read_errors, load.write_errors)
        order = await asyncio.to_thread(_rolling_restart, ensemble)
        await asyncio.sleep(1.0)  # the last sample
        origin2, packets2, t2 = _origin_reads(sidecars), load.packets, time.monotonic()
        load.stop()
        await runner
        span = t2 - t1
        return {
            "keys": keys,
            "cached": cached,
            "order": order,
            "restart_seconds": span,
            "baseline_origin_reads_per_s": base_origin_rate,
            "origin_reads_above_baseline": (origin2 - origin1) - base_origin_rate * span,
            "baseline_packets_per_s": base_packet_rate,
            "packets_above_baseline": (packets2 - packets1) - base_packet_rate * span,
            "reads": load.reads,
            "read_5xx": load.read_errors - errors_before[0],
            "writes": load.writes,
            "write_5xx": load.write_errors - errors_before[1],
            "not_ready_max_s": [max((b - a for a, b in spans), default=0.0) for spans in load.not_ready],
        }
    finally:
        for s in sidecars:
            s.stop()
        ensemble.stop()


def run(quick: bool, out_dir: Path, keys: int | None = None) -> str:
    """Measure, write ``recovery.json`` and ``recovery.md``, return the Markdown section."""
    keys = keys or (2000 if quick else 20000)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        data = asyncio.run(_measure(keys, Path(tmp)))
    cached = sum(data["cached"])
    above = max(0.0, data["origin_reads_above_baseline"])
    packets = max(0.0, data["packets_above_baseline"])
    expected = data["baseline_packets_per_s"] * data["restart_seconds"]
    during = data["packets_above_baseline"] + expected
    packet_cell = f"{packets / cached:.3f} ({during:,.0f} received, {expected:,.0f} at the baseline rate)"
    command = "python -m bench.recovery" + (" --quick" if quick else f" --keys {keys}")
    md = f"""## ZooKeeper rolling restart under load

3-node ensemble, each server stopped cleanly and started again in turn ({", ".join(data["order"])}), two
sidecars with {data["cached"][0]:,} and {data["cached"][1]:,} cached keys, {READS_PER_SECOND} reads/s and 5 writes/s.
The restart took {data["restart_seconds"]:.0f} s.

| measurement | this run | before setWatches and watch removal (issue #11, 20,000 keys) |
|---|---|---|
| origin reads above baseline, share of cached entries | {above:,.0f} ({100 * above / cached:.2f}%) | 6.6-13.7% |
| reads answered 5xx | {data["read_5xx"]} of {data["reads"]:,} | |
| writes refused (5xx) | {data["write_5xx"]} of {data["writes"]} | refused while not ready |
| longest not-ready time per sidecar | {" / ".join(f"{s:.2f} s" for s in data["not_ready_max_s"])} | 10-16 s |
| ZooKeeper packets above baseline, per cached entry | {packet_cell} | about 1 |

Baseline: {data["baseline_origin_reads_per_s"]:.1f} origin reads/s, {data["baseline_packets_per_s"]:.0f} ZooKeeper
packets/s (all servers; sampled every 0.5 s, a restarted server's counter counted from zero).

{machine_line(command, info)}
"""
    write_results(out_dir, "recovery", data, md)
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 keys")
    parser.add_argument("--keys", type=int, default=None, help="cached keys per sidecar (default 20,000)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where recovery.json and .md go")
    args = parser.parse_args()
    graceful_sigterm()
    print(run(args.quick, args.out, args.keys))


if __name__ == "__main__":
    main()
