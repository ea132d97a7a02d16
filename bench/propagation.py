"""Invalidation propagation: from a write's acknowledgment on sidecar A to sidecar B serving it.

    .venv/bin/python -m bench.propagation [--writes 1000] [--out bench/results/propagation.md]

Starts its own ZooKeeper and two sidecar processes (SQLite origin) under a
temporary directory, all on loopback, and stops them at the end.  Each round:

1. B reads the key until it is a hit (B holds the old value, watch armed);
2. A writes a new value (PUT, write-through) while B is polled back to back
   with ``Cache-Control: only-if-cached`` (a hit, or 504 once dropped);
3. the first 504 is the moment B dropped the entry; then a normal GET on B
   must return the new value.

Drop times are upper bounds by at most one poll, reported as the resolution.
"0 = before the ack": A acknowledges only after re-arming its own watch (one
more ZooKeeper round trip), so B usually drops first.

In the same run, the raw ZooKeeper floor: one kazoo client ``set``s a znode,
another client (own session and connection, same process) has a data watch
on it; time from issuing ``set`` to the watch callback.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from kazoo.client import KazooClient

from harness import LocalZooKeeper, SidecarProcess

from .lib.stats import MS_HEADER, ms_row, pct


class Rounds:
    """Per-write timings in milliseconds."""

    def __init__(self) -> None:
        self.put: list[float] = []  # PUT sent -> acknowledged, on A
        self.sent_to_drop: list[float] = []  # PUT sent -> B no longer has the entry
        self.ack_to_drop: list[float] = []  # ack -> B no longer has it (0: before the ack)
        self.ack_to_new: list[float] = []  # ack -> a normal GET on B returns the new value
        self.poll: list[float] = []  # one only-if-cached poll of B (the resolution)


async def sidecar_rounds(a: str, b: str, writes: int, deadline: float) -> Rounds:
    out = Rounds()
    key = "/v1/keys/bench/prop"
    only_cached = {"Cache-Control": "only-if-cached"}
    async with aiohttp.ClientSession() as writer, aiohttp.ClientSession() as reader:
        for i in range(writes):
            if time.monotonic() > deadline:
                break
            for _ in range(50):  # B must hold the value (a hit) before the write
                async with reader.get(b + key) as resp:
                    await resp.read()
                    if resp.headers.get("X-Cache") == "hit" or resp.status == 404:
                        break
            new = f"value-{i}".encode()
            dropped_at: list[float] = []

            t0 = time.perf_counter()

            async def poll_until_dropped(dropped_at: list[float] = dropped_at, t0: float = t0, i: int = i) -> None:
                # Back-to-back hits on B until the first "not cached" answer.
                for _ in range(100_000):
                    t = time.perf_counter()
                    async with reader.get(b + key, headers=only_cached) as resp:
                        await resp.read()
                    done = time.perf_counter()
                    out.poll.append((done - t) * 1000)
                    if resp.status == 504:
                        dropped_at.append(done)
                        return
                    if done - t0 > 5:
                        raise RuntimeError(f"B still cached the old value 5s after write {i}")

            poller = asyncio.create_task(poll_until_dropped())
            async with writer.put(a + key, data=new) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            acked = time.perf_counter()
            await poller
            async with reader.get(b + key) as resp:
                assert await resp.read() == new, "B served a stale value after dropping the entry"
            out.put.append((acked - t0) * 1000)
            out.sent_to_drop.append((dropped_at[0] - t0) * 1000)
            out.ack_to_drop.append(max(0.0, (dropped_at[0] - acked) * 1000))
            out.ack_to_new.append((time.perf_counter() - acked) * 1000)
    return out


def zk_floor(hosts: str, rounds: int) -> list[float]:
    writer, watcher = KazooClient(hosts=hosts), KazooClient(hosts=hosts)
    writer.start(10)
    watcher.start(10)
    try:
        path = "/bench-floor/node"
        writer.ensure_path(path)
        out: list[float] = []
        for _ in range(rounds):
            fired = threading.Event()
            stamp: list[float] = []

            def on_event(event: object, stamp: list[float] = stamp, fired: threading.Event = fired) -> None:
                stamp.append(time.perf_counter())
                fired.set()

            watcher.exists(path, watch=on_event)
            issued = time.perf_counter()
            writer.set(path, b"x")
            if not fired.wait(5):
                raise RuntimeError("watch did not fire within 5s")
            out.append((stamp[0] - issued) * 1000)
        return out
    finally:
        for c in (writer, watcher):
            c.stop()
            c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=300, help="stop early after this long")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zkcache-bench-") as tmp:
        zk = LocalZooKeeper(Path(tmp) / "zk")
        zk.start()
        common = {"zk": zk.hosts, "namespace": "bench", "origin": f"sqlite:///{tmp}/origin.db", "log_level": "warning"}
        a = SidecarProcess(tmp, "a", dict(common))
        b = SidecarProcess(tmp, "b", dict(common))
        try:
            a.start()
            b.start()
            deadline = time.monotonic() + args.max_seconds
            rounds = asyncio.run(sidecar_rounds(a.url, b.url, args.writes, deadline))
            floor = zk_floor(zk.hosts, len(rounds.put))
        finally:
            a.stop()
            b.stop()
            zk.stop()

    n = len(rounds.put)
    before_ack = sum(1 for d in rounds.ack_to_drop if d == 0) / n
    lines = [
        f"Invalidation propagation, 2 sidecars (SQLite origin), {n} writes, ZooKeeper 3.8 standalone, "
        f"loopback, 2 cores ({time.strftime('%Y-%m-%d')}; `python -m bench.propagation --writes {args.writes}`)",
        "",
        MS_HEADER,
        ms_row("PUT on A: sent -> acknowledged", rounds.put),
        ms_row("PUT sent on A -> entry dropped on B", rounds.sent_to_drop),
        ms_row("PUT acknowledged -> entry dropped on B (0 = before the ack)", rounds.ack_to_drop),
        ms_row("PUT acknowledged -> B returns the new value (includes B's refill)", rounds.ack_to_new),
        ms_row("resolution: one only-if-cached poll of B", rounds.poll),
        ms_row("raw ZooKeeper floor: set issued -> watch callback, 2nd session", floor),
        "",
        f"B had dropped the entry before A acknowledged in {before_ack:.0%} of writes. "
        f"p99 ratio, PUT sent -> dropped on B vs raw floor: "
        f"{pct(rounds.sent_to_drop, 99) / max(pct(floor, 99), 1e-6):.1f}x "
        f"(the sidecar path adds a lock, an origin write and HTTP).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
