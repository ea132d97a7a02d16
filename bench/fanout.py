"""Invalidation fan-out: one writing sidecar, N-1 watching sidecars, against raw ZooKeeper with the same fan-out.

    .venv/bin/python -m bench.fanout [--quick] [--out bench/results]

Starts its own ZooKeeper and N sidecar processes (N = 2, 5, 10; quick: 2, 5)
on one shared SQLite origin under a temporary directory, and stops them at the
end.  For each N, each round:

1. every watcher reads the key until it is a hit (it holds the value, its
   watch armed), and the value must be the last one written;
2. the writer A gets a PUT of a new value; meanwhile every watcher is polled
   back to back with ``Cache-Control: only-if-cached`` (a hit, or 504 once
   dropped), all watchers at once, one connection each;
3. per watcher: PUT sent -> dropped, and PUT acknowledged -> dropped (0 when
   the drop came before the acknowledgment, as in ``bench.propagation``).

Drop times are upper bounds, late by at most one poll (the resolution row).

Beside it, the raw ZooKeeper floor with the same fan-out: N-1 separate
processes, each with its own kazoo session holding a data watch on one znode;
one client ``set``s it; each watcher process stamps ``time.monotonic()`` (one
clock for every process on the machine) in its watch callback and reports it
on stdout.  Floor = ``set`` issued -> callback in each watcher process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from harness import LocalZooKeeper, SidecarProcess
from harness.process import die_with_parent

from .common import (
    command_line,
    machine,
    progress,
    run_async,
    run_scenario,
    scenario_parser,
    start_sidecars,
    write_results,
)
from .lib.http import RawConn, key_path
from .lib.stats import MS_HEADER, fmt, ms_row, pct, ratio, summary

FLOOR_PATH = "/bench-floor/node"
POLL_GIVE_UP = 5.0  # seconds after the PUT was sent: the watcher counts as "not dropped"


# -- sidecar rounds -------------------------------------------------------------
@dataclass
class Rounds:
    """Per-round (writer) and per-watcher-round samples, milliseconds."""

    watchers: int
    put: list[float] = field(default_factory=list)  # PUT sent -> acknowledged, on A
    sent_to_drop: list[float] = field(default_factory=list)  # PUT sent -> watcher dropped
    ack_to_drop: list[float] = field(default_factory=list)  # ack -> dropped, 0 when before the ack
    drop_minus_ack: list[float] = field(default_factory=list)  # signed: negative = dropped before the ack
    poll: list[float] = field(default_factory=list)  # one only-if-cached poll (the resolution)
    # Stamped by each watcher itself (/v1/stats key_events, CLOCK_MONOTONIC): no poll resolution.
    sent_to_arrived: list[float] = field(default_factory=list)  # PUT sent -> event on the watcher's kazoo thread
    sent_to_applied: list[float] = field(default_factory=list)  # PUT sent -> entry dropped on the watcher's loop
    hop: list[float] = field(default_factory=list)  # event arrived -> dropped: the sidecar's own cost
    ack_to_applied: list[float] = field(default_factory=list)  # 0 when before the ack
    not_dropped: int = 0  # watcher-rounds still cached POLL_GIVE_UP after the PUT
    skipped: int = 0  # rounds in which some watcher could not be brought to a hit
    stale_reads: int = 0  # a GET after the drop returned an older value
    errors: int = 0  # PUTs not answered 200

    def as_json(self) -> dict[str, Any]:
        """Samples and summaries."""
        out: dict[str, Any] = asdict(self)
        for name in (
            "put",
            "sent_to_drop",
            "ack_to_drop",
            "drop_minus_ack",
            "poll",
            "sent_to_arrived",
            "sent_to_applied",
            "hop",
            "ack_to_applied",
        ):
            out[f"{name}_summary"] = summary(getattr(self, name))
        out["dropped_before_ack"] = sum(1 for d in self.drop_minus_ack if d <= 0) / max(len(self.drop_minus_ack), 1)
        return out


async def _hold(conn: RawConn, path: str, expected: bytes | None, out: Rounds) -> bool:
    # Read until this watcher serves the key from its cache (its watch armed).
    for _ in range(50):
        resp = await conn.request("GET", path)
        if expected is not None and resp.status == 200 and resp.body != expected:
            out.stale_reads += 1
        if resp.headers.get("x-cache") == "hit":
            return True
    return False  # e.g. an intent left by a failed write: the key is not cached until the next write


async def _poll_until_dropped(conn: RawConn, path: str, sent: float, out: Rounds) -> float | None:
    # Back-to-back only-if-cached reads until the first 504 ("not cached here").
    only_cached = {"Cache-Control": "only-if-cached"}
    while True:
        t = time.monotonic()
        resp = await conn.request("GET", path, headers=only_cached)
        done = time.monotonic()
        out.poll.append((done - t) * 1000)
        if resp.status == 504:
            return done
        if done - sent > POLL_GIVE_UP:
            return None


async def _stamps(conns: list[RawConn], sent: float) -> list[dict[str, float]]:
    # Each watcher's own stamps of this round's event, read without polling
    # the key: a stats read every few ms, until every watcher has one.
    found: dict[int, dict[str, float]] = {}
    while len(found) < len(conns) and time.monotonic() - sent < POLL_GIVE_UP:
        await asyncio.sleep(0.005)
        pending = [i for i in range(len(conns)) if i not in found]
        replies = await asyncio.gather(*(conns[i].request("GET", "/v1/stats") for i in pending))
        for i, stats in zip(pending, replies, strict=True):
            events = json.loads(stats.body).get("key_events")
            if events and events["last_applied_monotonic"] > sent:
                found[i] = events
    return list(found.values())


async def propagation_rounds(
    writer_port: int,
    watcher_ports: list[int],
    key: str,
    writes: int,
    deadline: float,
    value_size: int = 100,
    *,
    poll: bool = True,
) -> Rounds:
    """``writes`` rounds of: all watchers hold ``key`` as a hit; the writer PUTs; poll every watcher until dropped.

    With ``poll=False`` nobody reads the key during the round: the figures
    come only from each watcher's own stamps (``/v1/stats`` ``key_events``),
    so the watchers' loops are as idle as in production.  Bounded by
    ``deadline`` (``time.monotonic()``) between rounds and by
    :data:`POLL_GIVE_UP` per round.  Also used by ``bench.scale``.
    """
    out = Rounds(watchers=len(watcher_ports))
    path = key_path(key)
    writer = await RawConn(writer_port).open()
    conns = [await RawConn(p).open() for p in watcher_ports]
    try:
        first = await writer.request("PUT", path, b"start".ljust(value_size, b"."))
        expected: bytes | None = b"start".ljust(value_size, b".") if first.status == 200 else None
        for i in range(writes):
            if time.monotonic() > deadline:
                break
            value = f"value-{i}".encode().ljust(value_size, b".")
            if not all(await asyncio.gather(*(_hold(c, path, expected, out) for c in conns))):
                out.skipped += 1
                resp = await writer.request("PUT", path, value)  # a new write clears whatever kept it uncached
                expected = value if resp.status == 200 else None
                continue
            sent = time.monotonic()
            writer.send("PUT", path, value)  # on the wire before any poll of this round
            pollers = [asyncio.ensure_future(_poll_until_dropped(c, path, sent, out)) for c in conns] if poll else []
            resp = await writer.receive()
            acked = time.monotonic()
            drops = await asyncio.gather(*pollers)
            if resp.status != 200:
                out.errors += 1
                expected = None
                continue
            expected = value
            out.put.append((acked - sent) * 1000)
            for dropped in drops:
                if dropped is None:
                    out.not_dropped += 1
                    continue
                out.sent_to_drop.append((dropped - sent) * 1000)
                out.drop_minus_ack.append((dropped - acked) * 1000)
                out.ack_to_drop.append(max(0.0, (dropped - acked) * 1000))
            for events in await _stamps(conns, sent):
                arrived, applied = events["last_arrived_monotonic"], events["last_applied_monotonic"]
                out.sent_to_arrived.append((arrived - sent) * 1000)
                out.sent_to_applied.append((applied - sent) * 1000)
                out.hop.append((applied - arrived) * 1000)
                out.ack_to_applied.append(max(0.0, (applied - acked) * 1000))
    finally:
        for c in (writer, *conns):
            await c.close()
    return out


# -- the raw ZooKeeper floor ------------------------------------------------------
def floor_watcher(hosts: str, path: str) -> None:
    """A watcher process: ``arm`` on stdin arms a data watch on ``path``; the callback prints its monotonic time."""
    zk = KazooClient(hosts=hosts)
    zk.start(15)
    out = threading.Lock()

    def emit(line: str) -> None:
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_event(event: object) -> None:
        emit(f"fired {time.monotonic()!r}")  # the first thing the callback does

    try:
        emit("ready")
        for line in sys.stdin:
            command = line.strip()
            if command == "arm":
                zk.exists(path, watch=on_event)
                emit("armed")
            elif command == "quit":
                break
    finally:
        zk.stop()
        zk.close()


@dataclass
class Floor:
    """Raw ZooKeeper: ``set`` issued by one client -> watch callback in each watcher process (ms)."""

    watchers: int
    set_to_callback: list[float] = field(default_factory=list)
    set_to_ack: list[float] = field(default_factory=list)  # the setter's own reply
    ack_to_callback: list[float] = field(default_factory=list)  # 0 when the callback came first
    callback_minus_ack: list[float] = field(default_factory=list)  # signed
    timeouts: int = 0

    def as_json(self) -> dict[str, Any]:
        """Samples and summaries."""
        out: dict[str, Any] = asdict(self)
        for name in ("set_to_callback", "set_to_ack", "ack_to_callback"):
            out[f"{name}_summary"] = summary(getattr(self, name))
        return out


async def _expect(proc: asyncio.subprocess.Process, word: str, timeout: float) -> str:
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if not line.startswith(word):
        raise RuntimeError(f"floor watcher said {line!r}, expected {word!r}")
    return line


def _resolve(fut: asyncio.Future[float], value: float) -> None:
    if not fut.done():
        fut.set_result(value)


async def floor_rounds(hosts: str, watchers: int, rounds: int, deadline: float, log_dir: Path) -> Floor:
    """``rounds`` sets of one znode, each watched by ``watchers`` separate processes."""
    out = Floor(watchers=watchers)
    loop = asyncio.get_running_loop()
    writer = KazooClient(hosts=hosts)
    await asyncio.to_thread(writer.start, 15)
    procs: list[asyncio.subprocess.Process] = []
    log = open(log_dir / "floor-watchers.log", "ab")  # noqa: ASYNC230 (opened once, before timing)
    try:
        await asyncio.to_thread(writer.ensure_path, FLOOR_PATH)
        for _ in range(watchers):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.fanout",
                    "--floor-watcher",
                    hosts,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    preexec_fn=die_with_parent(),
                )
            )
        await asyncio.gather(*(_expect(p, "ready", 60) for p in procs))
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"arm\n")
            await asyncio.gather(*(_expect(p, "armed", 10) for p in procs))
            acked: asyncio.Future[float] = loop.create_future()

            def on_reply(_result: object, acked: asyncio.Future[float] = acked) -> None:
                stamp = time.monotonic()  # kazoo's thread, as the watchers stamp theirs
                loop.call_soon_threadsafe(_resolve, acked, stamp)

            issued = time.monotonic()
            writer.set_async(FLOOR_PATH, b"x").rawlink(on_reply)
            try:
                lines = await asyncio.gather(*(_expect(p, "fired", POLL_GIVE_UP) for p in procs))
                ack = await asyncio.wait_for(acked, POLL_GIVE_UP)
            except TimeoutError:
                out.timeouts += 1
                break  # a late line would be read as the next round's answer
            out.set_to_ack.append((ack - issued) * 1000)
            for line in lines:
                fired = float(line.split()[1])
                out.set_to_callback.append((fired - issued) * 1000)
                out.callback_minus_ack.append((fired - ack) * 1000)
                out.ack_to_callback.append(max(0.0, (fired - ack) * 1000))
    finally:
        for p in procs:
            if p.returncode is None and p.stdin is not None:
                with contextlib.suppress(Exception):
                    p.stdin.write(b"quit\n")
                    p.stdin.close()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                p.kill()
                await p.wait()
        await asyncio.to_thread(writer.stop)
        writer.close()
        log.close()
    return out


# -- the run --------------------------------------------------------------------
async def _measure(
    zk: LocalZooKeeper, fleet: list[SidecarProcess], sizes: list[int], rounds: int, tmp: Path
) -> list[dict[str, Any]]:
    results = []
    running = 0
    deadline = time.monotonic() + (90 if len(sizes) < 3 else 240)
    for n in sizes:
        progress(f"fanout: starting sidecars {running + 1}..{n}")
        await asyncio.to_thread(start_sidecars, fleet[running:n])
        running = n
        writer, watchers = fleet[0], fleet[1:n]
        progress(f"fanout: {n} sidecars, {rounds} writes")
        ports = [w.port for w in watchers]
        sidecar = await propagation_rounds(writer.port, ports, f"fanout/{n}", rounds, deadline)
        progress(f"fanout: {n} sidecars, {rounds} writes, no polling (the watchers' own stamps)")
        stamped = await propagation_rounds(writer.port, ports, f"fanout/{n}/s", rounds, deadline + 30, poll=False)
        progress(f"fanout: raw ZooKeeper floor, {n - 1} watcher processes, {rounds} sets")
        floor = await floor_rounds(zk.hosts, n - 1, rounds, deadline + 60, tmp)
        results.append(
            {"sidecars": n, "sidecar": sidecar.as_json(), "stamped": stamped.as_json(), "floor": floor.as_json()}
        )
    return results


def markdown(data: dict[str, Any], quick: bool) -> str:
    """The report section."""
    m = data["machine"]
    lines = [
        "## Invalidation fan-out",
        "",
        f"One writer sidecar A and N-1 watchers on one SQLite origin, ZooKeeper standalone, loopback; {m['nproc']} "
        f"cores ({m['cpu']}), Python {m['python']}, {m['date']}. Every process of a run shares the 2 cores: with 10 "
        "sidecars, their pollers and ZooKeeper, scheduling is part of every figure.",
        "",
    ]
    for r in data["results"]:
        s, f, st = r["sidecar"], r["floor"], r["stamped"]
        n = r["sidecars"]
        lines += [
            f"**{n} sidecars** ({len(s['put'])} writes, {len(s['sent_to_drop'])} watcher-rounds; "
            f"floor: {len(f['set_to_ack'])} sets to {n - 1} watcher processes)",
            "",
            MS_HEADER,
            ms_row("PUT on A: sent -> acknowledged", s["put"]),
            ms_row("PUT sent on A -> dropped on a watcher", s["sent_to_drop"]),
            ms_row("PUT acknowledged -> dropped on a watcher (0 = before the ack)", s["ack_to_drop"]),
            ms_row("resolution: one only-if-cached poll", s["poll"]),
            ms_row("no polling, stamped by the watcher: PUT sent -> event on its kazoo thread", st["sent_to_arrived"]),
            ms_row("no polling, stamped by the watcher: PUT sent -> entry dropped", st["sent_to_applied"]),
            ms_row("no polling, stamped by the watcher: event arrived -> dropped", st["hop"]),
            ms_row("no polling, stamped by the watcher: ack -> dropped (0 = before the ack)", st["ack_to_applied"]),
            ms_row("no polling: PUT on A, sent -> acknowledged", st["put"]),
            ms_row("floor: set issued -> watch callback in each watcher process", f["set_to_callback"]),
            ms_row("floor: set issued -> set acknowledged to the setter", f["set_to_ack"]),
            ms_row("floor: set acknowledged -> callback (0 = before the ack)", f["ack_to_callback"]),
            "",
            f"Dropped before A acknowledged: {s['dropped_before_ack']:.0%} of watcher-rounds; not dropped within "
            f"{POLL_GIVE_UP:g} s: {s['not_dropped']}; stale reads after a drop: {s['stale_reads']}; failed PUTs: "
            f"{s['errors']}; rounds skipped (a watcher without a hit): {s['skipped']}; "
            f"floor timeouts: {f['timeouts']}.",
            "",
        ]
    lines += [
        "No polling during the rounds; each watcher stamps its own event (arrival on kazoo's thread) and drop "
        "(on its loop) with CLOCK_MONOTONIC, read from /v1/stats afterwards: p99 in ms.",
        "",
        "| sidecars | PUT sent -> dropped | floor set -> callback | ratio | sidecar's own cost: event -> dropped "
        "| floor + that cost, / floor | ack -> dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        s, f = r["stamped"], r["floor"]
        a, b, h = pct(s["sent_to_applied"], 99), pct(f["set_to_callback"], 99), pct(s["hop"], 99)
        lines.append(
            f"| {r['sidecars']} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} | {fmt(h)} | {ratio(b + h, b)} | "
            f"{fmt(pct(s['ack_to_applied'], 99))} |"
        )
    lines += [
        "",
        "Polled by the benchmark (one client polls every watcher in turn; resolution above):",
        "",
        "| sidecars | sent -> dropped p99 | floor set -> callback p99 | ratio (like for like) "
        "| ack -> dropped p99 | ack -> dropped p99 / floor p99 (starts later: flattering) "
        "| floor ack -> callback p99 | ack -> dropped max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        s, f = r["sidecar"], r["floor"]
        a, b, c = pct(s["sent_to_drop"], 99), pct(f["set_to_callback"], 99), pct(s["ack_to_drop"], 99)
        lines.append(
            f"| {r['sidecars']} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} | {fmt(c)} | {ratio(c, b)} | "
            f"{fmt(pct(f['ack_to_callback'], 99))} | {fmt(max(s['ack_to_drop'], default=float('nan')))} |"
        )
    lines += [
        "",
        "What each pair compares. *Sent -> dropped* and the floor's *set -> callback* both start when the write "
        "is issued and end when the other side knows: that ratio is the like-for-like one (goal: at most 1.5x "
        "at 10 sidecars). The sidecar's path adds the HTTP request, the ZooKeeper write that carries the intent "
        "(watchers are told by the intent, before the origin is written), the hop from kazoo's thread to the "
        "event loop, and this benchmark's poll resolution. *Ack -> dropped* is what a client can observe: how "
        "long after a write was acknowledged another sidecar may still serve the old value; it is 0 whenever "
        "the drop came first, so its ratio to the floor says little about speed and much about ordering. Both "
        "are reported; neither is the other. One client process sends the PUT and runs every poll, so under "
        "fan-out A's answer may be read up to one poll late (the resolution row), which favours "
        "'dropped before the ack'; the floor's watchers stamp in their own processes, with no poll.",
        "",
        f"Reproduce: `{command_line('fanout', quick)}` (starts and stops its own ZooKeeper, sidecars and watcher "
        "processes). Figures move between runs on a shared machine; compare within one run.",
    ]
    return "\n".join(lines)


def run(quick: bool, out_dir: Path) -> str:
    """Run the fan-out measurements; write ``fanout.json``; return the Markdown section."""
    started = time.monotonic()
    sizes = [2, 5] if quick else [2, 5, 10]
    rounds = 60 if quick else 500
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-fanout-") as tmp:
        zk = LocalZooKeeper(Path(tmp) / "zk")
        common = {"zk": zk.hosts, "namespace": "fanout", "origin": f"sqlite:///{tmp}/origin.db", "log_level": "warning"}
        fleet = [SidecarProcess(tmp, f"s{i}", dict(common)) for i in range(max(sizes))]
        try:
            progress("fanout: starting ZooKeeper")
            zk.start()
            results = run_async(_measure(zk, fleet, sizes, rounds, Path(tmp)))
        finally:
            for sc in reversed(fleet):
                sc.stop()
            zk.stop()
    data = {
        "machine": machine(),
        "quick": quick,
        "command": command_line("fanout", quick),
        "rounds": rounds,
        "results": results,
        "wall_seconds": time.monotonic() - started,
    }
    text = markdown(data, quick)
    write_results(out_dir, "fanout", data, text)
    return text


def main() -> None:
    """``python -m bench.fanout [--quick] [--out DIR]``."""
    parser = scenario_parser(__doc__, "fanout", "2 and 5 sidecars, 60 writes each (a smoke run)")
    parser.add_argument("--floor-watcher", metavar="HOSTS", help=argparse.SUPPRESS)  # internal: one watcher process
    args = parser.parse_args()
    if args.floor_watcher:
        floor_watcher(args.floor_watcher, FLOOR_PATH)
        return
    run_scenario(run, args)


if __name__ == "__main__":
    main()
