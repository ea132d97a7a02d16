"""Miss path and write-through: latency, where a write's time goes, ZooKeeper round trips, throughput.

    .venv/bin/python -m bench.write [--quick] [--out bench/results]

Starts its own ZooKeeper and one sidecar (SQLite origin) under a temporary
directory, all on loopback, and stops them at the end.  Measures, in order:

1. **Miss path**: sequential GETs of N distinct keys on one keep-alive
   connection; the keys were written straight into the SQLite file, so no
   ZooKeeper write precedes them.
2. **Write-through**: sequential 1 KiB PUTs of one key (plain, then
   compare-and-set with ``If-Match`` from the previous answer), and PUTs of
   never-written keys; each answer's ``Server-Timing`` header gives the
   phases (lock, check, intent, origin, bump, release).
3. **ZooKeeper round trips** per miss and per write, counted on the server:
   ``zk_packets_received`` / ``zk_packets_sent`` from ``mntr`` across the run,
   minus the same counters over an idle period of the same length right after
   (heartbeats, pings), divided by the number of operations.  Only the one
   sidecar is connected meanwhile.
4. **Throughput**: 8 and 32 concurrent aiohttp clients writing one hot key, or
   1000 distinct keys, for a fixed duration each.
5. **Request census**: the same kinds of operations, fewer of them, by a
   second sidecar that reaches ZooKeeper through a decoding proxy, which names
   every request (opcode, znode kind) and watch notification it forwards.

Statistics, the raw HTTP client and the decoding proxy are in ``bench.lib``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from harness import LocalZooKeeper, SidecarProcess

from .common import (
    command_line,
    machine,
    progress,
    run_async,
    run_scenario,
    scenario_parser,
    seed_origin,
    write_results,
)
from .lib.http import RawConn, Sequential, key_path, sequential_gets, server_timing
from .lib.stats import MS_HEADER, fmt, ms_row, pct, summary
from .lib.zkwire import RequestCensus

T = TypeVar("T")

NAMESPACE = "bench"
VALUE_1K = bytes(range(256)) * 4  # 1 KiB, not all one byte


# -- ZooKeeper's own counters -----------------------------------------------------
def packets(zk: LocalZooKeeper) -> tuple[int, int]:
    """``(zk_packets_received, zk_packets_sent)``: requests in, replies and notifications out."""
    m = zk.mntr()
    return int(m["zk_packets_received"]), int(m["zk_packets_sent"])


@dataclass
class RoundTrips:
    """ZooKeeper packets per operation, server side, net of an idle baseline of the same length."""

    ops: int
    seconds: float
    received: int  # during the run (incl. a short settle for background work)
    sent: int
    idle_received: int  # over the idle period right after, same length
    idle_sent: int

    @property
    def received_per_op(self) -> float:
        """Requests per operation."""
        return (self.received - self.idle_received) / max(self.ops, 1)

    @property
    def sent_per_op(self) -> float:
        """Replies plus watch notifications per operation."""
        return (self.sent - self.idle_sent) / max(self.ops, 1)

    def as_json(self) -> dict[str, Any]:
        """Raw counts and the per-operation figures."""
        return {
            "ops": self.ops,
            "seconds": self.seconds,
            "received": self.received,
            "sent": self.sent,
            "idle_received": self.idle_received,
            "idle_sent": self.idle_sent,
            "received_per_op": self.received_per_op,
            "sent_per_op": self.sent_per_op,
        }


async def count_round_trips(
    zk: LocalZooKeeper, ops: int, work: Awaitable[T], settle: float = 0.3
) -> tuple[T, RoundTrips]:
    """Run ``work`` (``ops`` operations) between two ``mntr`` reads, then an idle period as long.

    ``settle`` lets background work started by the last operation (the
    writer's refill) finish inside the measured window.
    """
    r0, s0 = await asyncio.to_thread(packets, zk)
    started = time.monotonic()
    result = await work
    await asyncio.sleep(settle)
    r1, s1 = await asyncio.to_thread(packets, zk)
    seconds = time.monotonic() - started
    await asyncio.sleep(seconds)  # the idle baseline: same length, nothing sent by us
    r2, s2 = await asyncio.to_thread(packets, zk)
    return result, RoundTrips(ops, seconds, r1 - r0, s1 - s0, r2 - r1, s2 - s1)


# -- the measurements ---------------------------------------------------------------
async def sequential_puts(
    port: int, keys: Sequence[str], deadline: float, *, value: bytes = VALUE_1K, cas: bool = False
) -> Sequential:
    """PUT ``keys[i]`` in order on one keep-alive connection; ``cas``: If-Match the previous answer's ETag."""
    out = Sequential()
    conn = await RawConn(port).open()
    etag: str | None = None
    try:
        if cas:  # the current ETag of the (single) key to start from
            etag = (await conn.request("GET", key_path(keys[0]))).headers.get("etag")
        for key in keys:
            if time.monotonic() > deadline:
                break
            headers = {"If-Match": etag} if cas and etag else None
            t = time.perf_counter()
            resp = await conn.request("PUT", key_path(key), value, headers)
            out.latency.append((time.perf_counter() - t) * 1000)
            out.statuses[resp.status] += 1
            etag = resp.headers.get("etag", etag)
            phases = server_timing(resp.headers.get("server-timing", ""))
            for name, ms in phases.items():
                out.phases.setdefault(name, []).append(ms)
            if phases:
                out.outside.append(out.latency[-1] - sum(phases.values()))
    finally:
        await conn.close()
    return out


async def throughput(url: str, keys: Sequence[str], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` aiohttp clients (one connection each) PUT 1 KiB values for ``duration`` seconds.

    Clients take the next key from a shared counter, so with distinct keys two
    clients rarely write the same key at once; with one key they all queue on it.
    """
    counter = itertools.count()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=30)

    async def client() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) as http:
            while time.perf_counter() < deadline:
                key = keys[next(counter) % len(keys)]
                t = time.perf_counter()
                try:
                    async with http.put(url + key_path(key), data=VALUE_1K) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                statuses[status] += 1
                if status == 200:
                    latencies.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {
        "keys": len(keys),
        "clients": clients,
        "duration_s": elapsed,
        "writes_ok": ok,
        "writes_per_s": ok / elapsed,
        "statuses": dict(statuses),
        "latency_ms": latencies,
        "latency": summary(latencies),
    }


async def concurrent_puts(url: str, keys: Sequence[str], concurrency: int = 32) -> None:
    """PUT each key once, ``concurrency`` at a time (warming keys up before a throughput run)."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as http:

        async def one(key: str) -> None:
            async with sem, http.put(url + key_path(key), data=VALUE_1K) as resp:
                await resp.read()

        await asyncio.gather(*(one(k) for k in keys))


async def census(proxy: RequestCensus, port: int, n: int) -> dict[str, dict[str, float]]:
    """Requests and notifications per operation, by kind, for each kind of operation (``n`` each)."""
    out: dict[str, dict[str, float]] = {}
    far = time.monotonic() + 60
    await sequential_puts(port, ["census/hot"] * 3, far)  # the key and its lock parent exist from here on
    await asyncio.sleep(0.3)  # its background refill, outside the first window
    runs: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("miss", lambda: sequential_gets(port, [f"census/miss/{i}" for i in range(n)], far)),
        ("put", lambda: sequential_puts(port, ["census/hot"] * n, far)),
        ("put If-Match", lambda: sequential_puts(port, ["census/hot"] * n, far, cas=True)),
        ("put new key", lambda: sequential_puts(port, [f"census/new/{i}" for i in range(n)], far)),
    ]
    for name, work in runs:
        before = proxy.snapshot()
        await work()
        await asyncio.sleep(0.3)  # the last write's background refill
        delta = proxy.snapshot() - before
        # Pings and the idle heartbeat (exists on the namespace root) are not per-operation work.
        out[name] = {
            what: count / n for what, count in sorted(delta.items()) if what != "ping" and not what.endswith("<root>")
        }
    return out


def uses_kazoo_lock_recipe() -> bool:
    """True if this tree's write lock is kazoo's Lock recipe (the protocol described in the section)."""
    try:
        from sidecar.coordination import lock

        return ".Lock(" in inspect.getsource(lock)
    except (ImportError, OSError):
        return False


RECIPE_TEXT = """\
**What a write asks ZooKeeper, from the code** (`sidecar/service.py` `_write`, `sidecar/coordination/`),
for a key written before (its version znode and lock directory exist):

1. `exists locks/<bucket>/<key>`: kazoo's `Lock.acquire` first runs `ensure_path` on the lock directory. The
   sidecar makes a new `Lock` object per write, so its `assured_path` shortcut never applies.
2. `create locks/<bucket>/<key>/<uuid>__lock__<seq>` (ephemeral, sequential): the contender node.
3. `getChildren locks/<bucket>/<key>`: any contender with a lower sequence number? None: the lock is held.
   (Contended: `getData` with a watch on the predecessor, wait for its deletion, `getChildren` again.)
4. `If-Match` only: `exists versions/<bucket>/<key>` (no watch) to compare the version.
5. Intent bump: `setData versions/<bucket>/<key>` to empty data ("write in progress"; every watcher drops the key).
6. The origin write (SQLite, no ZooKeeper).
7. Final bump: `setData versions/<bucket>/<key>` with a JSON note: the new version (mzxid) and ETag.
8. Release: `delete` of the contender node (from the releaser thread pool); then the answer.
9. After the answer, the writer's refill through the read protocol: `exists +watch versions/<bucket>/<key>`,
   then an origin read.

So 6 requests before the answer and 1 after: **7 per PUT, 8 with If-Match**, each one a full round trip
(kazoo's calls here are synchronous or awaited one after the other). Packets sent: one reply each, plus the
watch notification the writer's own refill armed, fired by the next write's intent bump (and one to every
other sidecar holding the key). A miss is **one** request: `exists +watch` on the version znode.
A never-written key adds the lock directory (`exists` fails, `create`) and the version znode (`setData` fails
with NoNode, `create`): see the census."""


def protocol_text() -> str:
    """How a write talks to ZooKeeper in this tree."""
    if uses_kazoo_lock_recipe():
        return RECIPE_TEXT
    from sidecar.coordination import lock

    doc = (lock.__doc__ or "").strip().split("\n\n")
    quoted = "\n".join("> " + line for line in "\n\n".join(doc[:3]).splitlines())
    return (
        "**What a write asks ZooKeeper.** In this tree the write lock is not kazoo's Lock recipe; "
        "`sidecar/coordination/lock.py` says:\n\n"
        + quoted
        + "\n\nAfter the answer the writer refills its own entry through the read protocol (`exists +watch` on "
        "the version znode, then an origin read): one more request per PUT, off the acknowledged path. "
        "A miss is one request, that same `exists +watch`. The census below shows what each operation sends."
    )


def markdown(data: dict[str, Any], quick: bool) -> str:
    """The report section."""
    m = data["machine"]
    lines = [
        "## Miss path and write-through",
        "",
        f"One sidecar, SQLite origin (`synchronous=FULL`), ZooKeeper standalone, loopback; {m['nproc']} cores "
        f"({m['cpu']}), Python {m['python']}, {m['date']}. Sequential requests on one keep-alive connection "
        "(a raw HTTP/1.1 client: request written -> response read).",
        "",
        MS_HEADER,
        ms_row(f"GET miss ({data['miss']['keys']} distinct keys, origin read through)", data["miss"]["latency_ms"]),
        ms_row("PUT 1 KiB, one key, sequential", data["put"]["latency_ms"]),
    ]
    for name, samples in data["put"]["phases_ms"].items():
        lines.append(ms_row(f"&nbsp;&nbsp;PUT phase `{name}` (Server-Timing)", samples, 3))
    lines.append(
        ms_row("&nbsp;&nbsp;PUT outside the phases (HTTP both ways, handler)", data["put"]["outside_phases_ms"], 3)
    )
    lines.append(ms_row('PUT with `If-Match: "<etag>"` (compare-and-set)', data["cas"]["latency_ms"]))
    for name, samples in data["cas"]["phases_ms"].items():
        lines.append(ms_row(f"&nbsp;&nbsp;CAS phase `{name}`", samples, 3))
    lines.append(ms_row("PUT of a never-written key", data["fresh"]["latency_ms"]))
    odd = {
        name: {k: v for k, v in data[name]["statuses"].items() if int(k) != 200}
        for name in ("miss", "put", "cas", "fresh")
    }
    if any(odd.values()):
        lines += ["", "Answers other than 200 (they are in the samples above): " + f"{odd}."]
    lines += [
        "",
        "ZooKeeper packets per operation, counted by the server (`mntr` `zk_packets_received` / `zk_packets_sent` "
        "across the run, minus an idle period of the same length right after; one sidecar connected):",
        "",
        "| operation | ops | requests received / op | packets sent / op | idle baseline (recv, sent) |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("GET miss", "miss"), ("PUT", "put"), ("PUT If-Match", "cas"), ("PUT new key", "fresh")):
        rt = data[key]["zk"]
        lines.append(
            f"| {name} | {rt['ops']} | {rt['received_per_op']:.2f} | {rt['sent_per_op']:.2f} | "
            f"{rt['idle_received']}, {rt['idle_sent']} over {rt['seconds']:.1f} s |"
        )
    lines += [
        "",
        "Write throughput, concurrent aiohttp clients (one keep-alive connection each), 1 KiB values, one sidecar:",
        "",
        "| keys | clients | duration (s) | writes/s | p50 (ms) | p99 (ms) | max (ms) | non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in data["throughput"]:
        bad = sum(v for k, v in t["statuses"].items() if int(k) != 200)
        lat = t["latency"]
        lines.append(
            f"| {'1 hot key' if t['keys'] == 1 else str(t['keys']) + ' distinct'} | {t['clients']} | "
            f"{t['duration_s']:.1f} | {t['writes_per_s']:.0f} | {fmt(lat['p50'])} | {fmt(lat['p99'])} | "
            f"{fmt(lat['max'])} | {bad} |"
        )
    lines += ["", protocol_text(), ""]
    c = data["census"]
    lines += [
        f"**Census** ({c['n']} of each, by a second sidecar through a decoding proxy; ZooKeeper requests and watch "
        "notifications per operation; pings and the idle heartbeat left out):",
        "",
        "| operation | requests per operation (kind x count) | total requests | notifications |",
        "|---|---|---|---|",
    ]
    for name, kinds in c["per_op"].items():
        reqs = {k: v for k, v in kinds.items() if not k.startswith("notify")}
        notes = {k: v for k, v in kinds.items() if k.startswith("notify")}
        lines.append(
            f"| {name} | {'<br>'.join(f'`{k}` x {v:.2f}' for k, v in reqs.items())} | {sum(reqs.values()):.2f} | "
            f"{'<br>'.join(f'`{k}` x {v:.2f}' for k, v in notes.items()) or '-'} |"
        )
    put_rt, cas_rt, miss_rt = data["put"]["zk"], data["cas"]["zk"], data["miss"]["zk"]
    phases = summary_phases(data["put"]["phases_ms"])
    lines += [
        "",
        f"Measured: {miss_rt['received_per_op']:.2f} requests per miss, {put_rt['received_per_op']:.2f} per PUT, "
        f"{cas_rt['received_per_op']:.2f} per compare-and-set PUT. Where a PUT's median time goes (p50 per phase, "
        f"ms): {phases}; outside the phases {pct(data['put']['outside_phases_ms'], 50):.2f}. A phase that is one "
        "ZooKeeper write (a `setData` or a `multi`) includes the server's fsync of its transaction log; "
        "the `origin` phase is an fsynced SQLite write.",
        "",
        f"Reproduce: `{command_line('write', quick)}` (starts and stops its own ZooKeeper and sidecars). "
        "Figures move between runs on a shared machine; compare within one run.",
    ]
    return "\n".join(lines)


def summary_phases(phases: dict[str, list[float]]) -> str:
    """``lock 1.20, check 0.00, ...`` (p50 of each phase)."""
    return ", ".join(f"{name} {pct(v, 50):.2f}" for name, v in phases.items()) or "no Server-Timing header"


async def _measure(
    zk: LocalZooKeeper, sc: SidecarProcess, census_sc: SidecarProcess, proxy: RequestCensus, quick: bool
) -> dict[str, Any]:
    misses = 200 if quick else 2000
    writes = 100 if quick else 1000
    duration = 2.0 if quick else 10.0
    deadline = time.monotonic() + (60 if quick else 240)
    data: dict[str, Any] = {}

    progress(f"write: warming up, then {misses} misses")
    await sequential_gets(sc.port, [f"warm/{i}" for i in range(50)], deadline)
    gets, rt = await count_round_trips(
        zk, misses, sequential_gets(sc.port, [f"miss/{i}" for i in range(misses)], deadline)
    )
    data["miss"] = {"keys": misses, **gets.as_json(), "zk": rt.as_json()}

    progress(f"write: {writes} PUTs of one key, {writes} compare-and-set PUTs, {writes} PUTs of new keys")
    await sequential_puts(sc.port, ["hot"] * 20, deadline)  # lock directory, version znode, pools warm
    for name, keys, cas in (
        ("put", ["hot"] * writes, False),
        ("cas", ["hot"] * writes, True),
        ("fresh", [f"d/{i}" for i in range(writes)], False),
    ):
        puts, rt = await count_round_trips(zk, writes, sequential_puts(sc.port, keys, deadline, cas=cas))
        data[name] = {**puts.as_json(), "zk": rt.as_json()}

    distinct = [f"d/{i}" for i in range(1000)]
    progress("write: warming the 1000 distinct keys, then throughput runs")
    await concurrent_puts(sc.url, distinct[writes:])
    data["throughput"] = []
    for keys in (["hot"], distinct):
        for clients in (8, 32):
            progress(f"write: throughput, {len(keys)} key(s), {clients} clients, {duration:g} s")
            data["throughput"].append(await throughput(sc.url, keys, clients, duration))

    n = 20 if quick else 100
    progress(f"write: request census, {n} of each operation")
    await asyncio.to_thread(census_sc.start)
    data["census"] = {"n": n, "per_op": await census(proxy, census_sc.port, n)}
    return data


def run(quick: bool, out_dir: Path) -> str:
    """Run the miss-path and write-through measurements; write ``write.json``; return the Markdown section."""
    started = time.monotonic()
    misses = 200 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-write-") as tmp:
        db = Path(tmp) / "origin.db"
        names = itertools.chain(
            (f"miss/{i}" for i in range(misses)),
            (f"warm/{i}" for i in range(50)),
            (f"census/miss/{i}" for i in range(200)),
        )
        run_async(seed_origin(db, ((k, VALUE_1K) for k in names), "application/octet-stream"))
        zk = LocalZooKeeper(Path(tmp) / "zk")
        proxy = RequestCensus(zk.host, zk.port, f"/zkcache/{NAMESPACE}")
        common = {"zk": zk.hosts, "namespace": NAMESPACE, "origin": f"sqlite:///{db}", "log_level": "warning"}
        sc = SidecarProcess(tmp, "writer", dict(common))
        census_sc = SidecarProcess(tmp, "census", {**common, "zk": ""})  # its zk: the proxy, once it listens
        try:
            progress("write: starting ZooKeeper and the sidecar")
            zk.start()
            sc.start()
            proxy.start()
            census_sc.settings["zk"] = proxy.address
            data = run_async(_measure(zk, sc, census_sc, proxy, quick))
        finally:
            census_sc.stop()
            sc.stop()
            proxy.stop()
            zk.stop()
    data["machine"] = machine()
    data["quick"] = quick
    data["command"] = command_line("write", quick)
    data["wall_seconds"] = time.monotonic() - started
    text = markdown(data, quick)
    write_results(out_dir, "write", data, text)
    return text


def main() -> None:
    """``python -m bench.write [--quick] [--out DIR]``."""
    run_scenario(run, scenario_parser(__doc__, "write", "fewer operations, shorter runs (a smoke run)").parse_args())


if __name__ == "__main__":
    main()
