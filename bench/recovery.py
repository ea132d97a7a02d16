"""Recovery under load: a ZooKeeper rolling restart, and a session expiry, with N cached keys per sidecar.

    .venv/bin/python -m bench.recovery [--keys 20000] [--quick] [--out bench/results]

**Rolling restart.**

A 3-node ensemble on loopback, a SQLite origin with N rows, two sidecars
that read all N keys first (each caches N), then steady load from this
process: reads of random keys spread over both sidecars (about 600/s) and a
write every 200 ms through sidecar 1.  After a 10 s baseline, every server
is stopped cleanly and started again in turn, the leader last, with a few
seconds between them.  Measured through the whole restart, against the
baseline's rates:

* origin reads above baseline (the sidecars' misses plus uncached bypass
  reads, from ``/v1/stats``), as a share of the cached entries;
* reads answered 5xx; writes refused, and how many of those overlapped a
  time when no server was leader (``srvr`` on every server, every 50 ms):
  a write waits up to ``lock_timeout`` for a connection, so the others are
  refusals the ensemble did not force;
* the longest time each sidecar was not ready (``/readyz`` polled every 50 ms);
* ZooKeeper packets received above baseline (``mntr`` on every server), per
  cached entry.

Issue #11 measured the code before setWatches and watch removal on the same
scenario with 20,000 keys: 6.6 to 13.7% of the cached entries re-read from
the origin, each sidecar not ready for 10 to 16 s (writes refused all that
time), up to 7,000 ZooKeeper packets/s against 46.

**Session expiry.** One ZooKeeper server, two sidecars caching the same N
keys (a 6 s session). Sidecar 0's link (a TCP proxy this process owns) is cut
until ZooKeeper has expired its session; meanwhile 1% of the keys are
written through sidecar 1, and sidecar 0 is read for those keys all along.
Then the link heals, sidecar 0 gets a new session and restores its watches
by zxid.  Measured: entries kept and dropped (from ``/v1/stats`` and by
reading every changed key and a sample of the others), stale reads (the old
value of a changed key, read after its write was acknowledged and after
sidecar 0's grace ran out), the time from heal to ready, and ZooKeeper
packets for the recovery per cached entry.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kazoo.client import KazooClient

from harness import SidecarProcess, TcpProxy
from harness.zookeeper import LocalEnsemble, LocalZooKeeper
from sidecar.coordination import Layout

from .common import graceful_sigterm, machine, machine_line, seed_origin, write_results

READS_PER_SECOND = 600
WRITE_INTERVAL = 0.2
BASELINE_SECONDS = 10.0
SETTLE_SECONDS = 3.0  # between one server being back and the next stop
EXPIRY_SESSION = 6.0
EXPIRY_CHANGED = 0.01  # share of the keys written while sidecar 0 is cut off


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
        self.refused: list[tuple[float, float]] = []  # (sent, answered) of each refused write
        self.refusals: dict[str, int] = {}  # problem type (or client error) -> count
        self.not_ready: list[list[tuple[float, float]]] = [[] for _ in sidecars]
        self.leaderless: list[tuple[float, float]] = []  # no server in leader mode
        self.packets = 0  # received by every server since the load began
        self._stop = asyncio.Event()

    async def run(self, servers: list[LocalZooKeeper]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await asyncio.gather(
                self._reader(http),
                self._writer(http),
                self._count_packets(servers),
                self._leaders(servers),
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

    async def _leaders(self, servers: list[LocalZooKeeper]) -> None:
        since: float | None = None
        while not self._stop.is_set():
            modes = await asyncio.to_thread(lambda: [s.mode() for s in servers])
            now = time.monotonic()
            if "leader" not in modes and since is None:
                since = now
            elif "leader" in modes and since is not None:
                self.leaderless.append((since, now))
                since = None
            await asyncio.sleep(0.05)
        if since is not None:
            self.leaderless.append((since, time.monotonic()))

    def refused_without_leader(self, slack: float = 0.2) -> int:
        """Refused writes that overlapped a time with no leader (widened by the polling's ``slack``)."""
        return sum(
            1
            for sent, answered in self.refused
            if any(a - slack <= answered and sent <= b + slack for a, b in self.leaderless)
        )

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
            sent = time.monotonic()
            try:
                async with http.put(f"{self.sidecars[0].url}/v1/keys/{key}", data=b"w" * 1024) as resp:
                    body = await resp.read()
                    self.writes += 1
                    refused = resp.status >= 500
                    reason = body.decode(errors="replace").partition('"type":"')[2].partition('"')[0]
            except (aiohttp.ClientError, TimeoutError) as exc:
                refused, reason = True, type(exc).__name__
            if refused:
                reason = reason.rsplit("/", 1)[-1] or "5xx"
                self.refusals[reason] = self.refusals.get(reason, 0) + 1
                self.write_errors += 1
                self.refused.append((sent, time.monotonic()))
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
    await seed_origin(db, ((f"k/{i:06d}", b"x" * 1024) for i in range(keys)))
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
            "write_5xx_without_leader": load.refused_without_leader(),
            "leaderless_s": sum(b - a for a, b in load.leaderless),
            "refusals": load.refusals,
            "not_ready_max_s": [max((b - a for a, b in spans), default=0.0) for spans in load.not_ready],
        }
    finally:
        for s in sidecars:
            s.stop()
        ensemble.stop()


async def _read_value(http: aiohttp.ClientSession, side: SidecarProcess, key: str) -> tuple[int, str, bytes]:
    async with http.get(f"{side.url}/v1/keys/{key}") as resp:
        return resp.status, resp.headers.get("X-Cache", ""), await resp.read()


def _member_alive(hosts: str, root: str, member: str) -> bool:
    client = KazooClient(hosts=hosts)
    client.start(timeout=10)
    try:
        return client.exists(Layout(root).member_path(member)) is not None
    finally:
        client.stop()
        client.close()


async def _measure_expiry(keys: int, tmp: Path) -> dict[str, Any]:
    db = tmp / "expiry.db"
    await seed_origin(db, ((f"k/{i:06d}", b"x" * 1024) for i in range(keys)))
    zk = LocalZooKeeper(tmp / "zk-expiry")
    await asyncio.to_thread(zk.start)
    proxy = TcpProxy(zk.host, zk.port)
    proxy.start()
    settings = {
        "namespace": "expiry",
        "origin": f"sqlite:///{db}",
        "log_level": "warning",
        "max_entries": str(keys * 2),
        "zk_session_timeout": f"{EXPIRY_SESSION:g}s",
    }
    sidecars = [
        SidecarProcess(tmp, f"ex{i}", {**settings, "zk": address, "member_id": f"ex{i}"})
        for i, address in enumerate([proxy.address, zk.hosts])
    ]
    a, b = sidecars
    try:
        for s in sidecars:
            await asyncio.to_thread(s.start, True, 60)
        for s in sidecars:
            await _fill(s, keys)
        cached = a.stats()["entries"]
        grace = EXPIRY_SESSION / 3  # the default suspended_grace
        changed = [f"k/{i:06d}" for i in random.Random(3).sample(range(keys), max(1, int(keys * EXPIRY_CHANGED)))]
        acked: dict[str, float] = {}
        stale = stale_in_grace = reads = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            proxy.cut()
            cut_at = time.monotonic()

            async def writer() -> None:
                for key in changed:
                    async with http.put(f"{b.url}/v1/keys/{key}", data=b"new") as resp:
                        assert resp.status == 200, await resp.text()
                    acked[key] = time.monotonic()

            async def reader() -> None:
                nonlocal stale, stale_in_grace, reads
                rng = random.Random(4)
                while not expired.is_set():
                    done = list(acked.items())
                    if not done:
                        await asyncio.sleep(0.01)
                        continue
                    key, acked_at = done[rng.randrange(len(done))]
                    sent = time.monotonic()
                    status, _, value = await _read_value(http, a, key)
                    reads += 1
                    if status == 200 and value != b"new" and sent > acked_at:
                        if sent <= cut_at + grace + 0.5:
                            stale_in_grace += 1
                        else:
                            stale += 1
                    await asyncio.sleep(0.002)

            expired = asyncio.Event()
            read_task = asyncio.ensure_future(reader())
            await writer()
            root = f"/zkcache/{settings['namespace']}"
            deadline = time.monotonic() + 4 * EXPIRY_SESSION
            while await asyncio.to_thread(_member_alive, zk.hosts, root, "ex0"):
                if time.monotonic() > deadline:
                    raise RuntimeError("ZooKeeper did not expire sidecar 0's session")
                await asyncio.sleep(0.2)
            expired.set()
            await read_task
            partition = time.monotonic() - cut_at
            packets0 = int(zk.mntr().get("zk_packets_received", 0))
            healed_at = time.monotonic()
            proxy.heal()
            await asyncio.to_thread(a.wait_ready, 30)
            ready_after = time.monotonic() - healed_at
            packets = int(zk.mntr().get("zk_packets_received", 0)) - packets0
            stats = a.stats()
            kept = stats["entries"]
            changed_set = set(changed)
            wrong_changed = sum([await _read_value(http, a, key) != (200, "miss", b"new") for key in changed])
            sample = [f"k/{i:06d}" for i in random.Random(5).sample(range(keys), min(keys, 2000))]
            sample = [key for key in sample if key not in changed_set]
            unchanged_not_hit = sum([await _read_value(http, a, key) != (200, "hit", b"x" * 1024) for key in sample])
        return {
            "keys": keys,
            "cached": cached,
            "changed": len(changed),
            "partition_s": partition,
            "sessions": stats["zookeeper"]["sessions"],
            "kept_after": kept,
            "expected_kept": cached - len(changed),
            "changed_not_refetched": wrong_changed,
            "unchanged_sampled": len(sample),
            "unchanged_not_hit": unchanged_not_hit,
            "reads_during_partition": reads,
            "stale_after_grace": stale,
            "stale_within_grace": stale_in_grace,
            "ready_after_heal_s": ready_after,
            "restore_packets": packets,
            "restore_seconds": stats["revalidation"]["seconds"],
        }
    finally:
        for s in sidecars:
            s.stop()
        proxy.stop()
        zk.stop()


def _expiry_markdown(e: dict[str, Any]) -> str:
    rows = [
        ("sessions of sidecar 0 afterwards", f"{e['sessions']} (a new one)"),
        (
            "entries kept after the new session's restore",
            f"{e['kept_after']:,} (cached minus changed: {e['expected_kept']:,})",
        ),
        ("changed keys not read again from the origin with the new value", f"{e['changed_not_refetched']}"),
        ("unchanged keys (sample) not served as hits", f"{e['unchanged_not_hit']} of {e['unchanged_sampled']:,}"),
        (
            "stale reads after the grace",
            f"{e['stale_after_grace']} (within the grace, as documented: {e['stale_within_grace']})",
        ),
        ("heal to ready", f"{e['ready_after_heal_s']:.2f} s (restore {1000 * e['restore_seconds']:.0f} ms)"),
        (
            "ZooKeeper packets from heal to ready, per cached entry",
            f"{e['restore_packets'] / max(e['cached'], 1):.4f} ({e['restore_packets']:,})",
        ),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""## Session expiry

One ZooKeeper server, two sidecars with {e["cached"]:,} cached keys each, a {EXPIRY_SESSION:g} s session.
Sidecar 0 was cut off for {e["partition_s"]:.1f} s, until ZooKeeper expired its session; meanwhile
{e["changed"]:,} keys were written through sidecar 1 and read on sidecar 0 ({e["reads_during_partition"]:,} reads).

| measurement | this run |
|---|---|
{table}
"""


def run(quick: bool, out_dir: Path, keys: int | None = None) -> str:
    """Measure, write ``recovery.json`` and ``recovery.md``, return the Markdown section."""
    keys = keys or (2000 if quick else 20000)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        data = asyncio.run(_measure(keys, Path(tmp)))
        expiry = asyncio.run(_measure_expiry(keys, Path(tmp)))
    cached = sum(data["cached"])
    above = max(0.0, data["origin_reads_above_baseline"])
    packets = max(0.0, data["packets_above_baseline"])
    expected = data["baseline_packets_per_s"] * data["restart_seconds"]
    during = data["packets_above_baseline"] + expected
    packet_cell = f"{packets / cached:.3f} ({during:,.0f} received, {expected:,.0f} at the baseline rate)"
    writes_cell = (
        f"{data['write_5xx']} of {data['writes']}; {data['write_5xx_without_leader']} of them while no server "
        f"was leader ({data['leaderless_s']:.1f} s in all)"
        + (f"; {', '.join(f'{n} {why}' for why, n in sorted(data['refusals'].items()))}" if data["refusals"] else "")
    )
    command = "python -m bench.recovery" + (" --quick" if quick else f" --keys {keys}")
    md = f"""## ZooKeeper rolling restart under load

3-node ensemble, each server stopped cleanly and started again in turn ({", ".join(data["order"])}), two
sidecars with {data["cached"][0]:,} and {data["cached"][1]:,} cached keys, {READS_PER_SECOND} reads/s and 5 writes/s.
The restart took {data["restart_seconds"]:.0f} s.

| measurement | this run | before setWatches and watch removal (issue #11, 20,000 keys) |
|---|---|---|
| origin reads above baseline, share of cached entries | {above:,.0f} ({100 * above / cached:.2f}%) | 6.6-13.7% |
| reads answered 5xx | {data["read_5xx"]} of {data["reads"]:,} | |
| writes refused (5xx) | {writes_cell} | refused while not ready |
| longest not-ready time per sidecar | {" / ".join(f"{s:.2f} s" for s in data["not_ready_max_s"])} | 10-16 s |
| ZooKeeper packets above baseline, per cached entry | {packet_cell} | about 1 |

Baseline: {data["baseline_origin_reads_per_s"]:.1f} origin reads/s, {data["baseline_packets_per_s"]:.0f} ZooKeeper
packets/s (all servers; sampled every 0.5 s, a restarted server's counter counted from zero).

{_expiry_markdown(expiry)}
{machine_line(command, info)}
"""
    data["expiry"] = expiry
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
