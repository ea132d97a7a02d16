"""The hit path side by side: a cached 1 KiB value from the sidecar vs. the same bytes from bare servers.

    .venv/bin/python -m bench.hit [--quick] [--out bench/results]

Starts, under a temporary directory and on free loopback ports:

0. ZooKeeper and one sidecar (SQLite origin); ``bench/hit`` is written with a
   1 KiB value and read until it is a hit;
a. a bare aiohttp server (``bench.hit_servers aiohttp``) answering every
   ``GET /v1/keys/...`` with the same bytes and headers the sidecar sent;
b. a raw ``asyncio.Protocol`` server on uvloop (``bench.hit_servers raw``), the
   same bytes again, no HTTP parser: the limit for Python here;
c. ``redis-server`` holding the same value under ``bench:hit``.

Every server runs on core 0 (``taskset -c 0``), every load generator on core 1.
For (0), (a), (b): first a fixed rate of 1,000 requests/s on one keep-alive
connection with an open-loop client (latency counted from the scheduled send
time, no coordinated omission), then ``wrk -t1 -c1`` and ``-c32`` (latency
quantiles from wrk's Lua ``done`` hook, finer than ``--latency``).  Full runs
cut each cell into 2 s slices and let the servers take turns, so that the
stalls of this shared VM hit every server alike.  For (c): ``redis-benchmark
-c1`` and ``-c32`` running the command ``GET bench:hit`` (a custom command, so
the key read is the one set, not ``key:__rand_int__``), sized to last about as
long as a wrk cell.

Before measuring, the sidecar must answer ``Cache-Control: only-if-cached`` with
200 and ``X-Cache: hit``; after, ``/v1/stats`` must show hits grown by the
requests sent and misses unchanged.  Writes ``hit.json`` and ``hit.md`` to --out.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import LocalZooKeeper, free_port

from .common import (
    LOAD_CPU,
    SERVER_CPU,
    CpuMeter,
    OwnedProcess,
    PinnedSidecar,
    cpu_note,
    machine,
    machine_line,
    merge_wrk,
    open_loop,
    pinned,
    python_module,
    run_scenario,
    run_wrk,
    scenario_parser,
    summarize_open_loop,
    uses_uvloop,
    wait_port,
    write_results,
)
from .lib.http import http_request, raw_response
from .lib.stats import fmt, pct

__all__ = ["main", "run"]

NAME = "hit"
KEY_PATH = "/v1/keys/bench/hit"
REDIS_KEY = b"bench:hit"
# 1 KiB of printable bytes, the same in every server.
VALUE = (b"0123456789abcdef" * 64)[:1024]
CONTENT_TYPE = "application/octet-stream"
CONNECTIONS = (1, 32)
FIXED_RATE = 1000.0
HTTP_SERVERS = ("sidecar", "aiohttp", "raw")
LABELS = {
    "sidecar": "sidecar (hit)",
    "aiohttp": "bare aiohttp",
    "raw": "raw asyncio.Protocol",
    "redis": "redis GET",
}
# Headers the servers generate themselves; the rest are copied from the sidecar's hit.
_GENERATED = {"content-length", "date", "server", "connection", "keep-alive"}
# Dapr v1.12, state API over gRPC, 1 KB payload, 1,000 req/s, sidecar limited to 0.5 vCPU,
# added latency vs. calling the state store directly.
DAPR = {
    "p90_added_ms": 0.75,
    "p99_added_ms": 1.52,
    "source": "https://docs.dapr.io/operations/performance-and-scalability/perf-state/",
}


@dataclass(frozen=True)
class Params:
    """Durations of one run (seconds).

    The host is a shared VM whose cores stall now and then for tens of
    milliseconds, so each cell is measured in slices and the servers take turns
    (round-robin, the starting server rotating each round): a stall then hits
    every server alike, and the per-round ratios are paired comparisons a few
    seconds apart.
    """

    quick: bool
    rounds: int  # wrk rounds: each wrk cell lasts rounds * slice seconds
    slice: int  # one wrk run (wrk takes whole seconds)
    warmup: int  # wrk warm-up per server and connection count before the first round (0: none)
    fixed_rounds: int  # fixed-rate rounds: each server gets fixed_rounds * fixed_slice seconds
    fixed_slice: float
    fixed_warmup: float  # at the same rate before each fixed-rate slice, not recorded
    redis: float  # target length of one redis-benchmark measurement

    @classmethod
    def of(cls, quick: bool) -> Params:
        """Quick: 2 s cells, about 22 s in all; full: 10 s wrk cells and 20 s fixed rate, about 2.7 minutes.

        The fixed-rate slices run first and warm the servers up; quick mode has
        no separate wrk warm-up (wrk's shortest run is 1 s).
        """
        if quick:
            return cls(quick, 1, 2, 0, fixed_rounds=1, fixed_slice=2.0, fixed_warmup=0.2, redis=0.5)
        return cls(quick, 5, 2, 1, fixed_rounds=10, fixed_slice=2.0, fixed_warmup=0.2, redis=10.0)

    @property
    def cell(self) -> int:
        """Seconds of wrk measurement per server and connection count."""
        return self.rounds * self.slice

    @property
    def fixed(self) -> float:
        """Seconds of fixed-rate measurement per server."""
        return self.fixed_rounds * self.fixed_slice


def rotated(names: tuple[str, ...], r: int) -> tuple[str, ...]:
    """``names`` starting at position ``r``: who goes first changes every round."""
    k = r % len(names)
    return names[k:] + names[:k]


# -- redis ----------------------------------------------------------------------
def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_set(port: int, key: bytes, value: bytes) -> int:
    """SET ``key`` over a raw RESP socket, then STRLEN it: the stored length."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_resp(b"SET", key, value) + _resp(b"STRLEN", key))
        buf = b""
        while buf.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
    ok, strlen = buf.split(b"\r\n")[:2]
    if ok != b"+OK" or not strlen.startswith(b":"):
        raise RuntimeError(f"redis SET failed: {buf!r}")
    return int(strlen[1:])


def redis_benchmark(port: int, clients: int, requests: int, timeout: float) -> dict[str, Any]:
    """``redis-benchmark -c <clients> -n <requests> --csv GET bench:hit`` on the load core."""
    argv = pinned(
        ["redis-benchmark", "-p", str(port), "-c", str(clients), "-n", str(requests), "--csv", "GET", "bench:hit"],
        LOAD_CPU,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    r = rows[-1]
    return {
        "connections": clients,
        "requests": requests,
        "rps": float(r["rps"]),
        "mean_ms": float(r["avg_latency_ms"]),
        "min_ms": float(r["min_latency_ms"]),
        "p50_ms": float(r["p50_latency_ms"]),
        "p95_ms": float(r["p95_latency_ms"]),
        "p99_ms": float(r["p99_latency_ms"]),
        "max_ms": float(r["max_latency_ms"]),
    }


def measure_redis(port: int, p: Params) -> dict[str, Any]:
    """Per connection count: a short calibration run (also the warm-up), then one sized to ``p.redis``."""
    out: dict[str, Any] = {}
    for c in CONNECTIONS:
        calib = redis_benchmark(port, c, 2000, timeout=30)
        n = max(2000, min(int(calib["rps"] * p.redis), 5_000_000))
        out[f"c{c}"] = redis_benchmark(port, c, n, timeout=p.redis * 5 + 30)
    return out


# -- the sidecar's hit ------------------------------------------------------------
def make_hit(sidecar: PinnedSidecar, timeout: float = 10.0) -> list[tuple[str, str]]:
    """PUT the value, read until ``only-if-cached`` answers 200 with ``X-Cache: hit``; the hit's headers."""
    status, _, body = http_request(sidecar.port, "PUT", KEY_PATH, body=VALUE, headers={"Content-Type": CONTENT_TYPE})
    if status != 200:
        raise RuntimeError(f"PUT {KEY_PATH} -> {status}: {body!r}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, headers, body = http_request(sidecar.port, "GET", KEY_PATH, headers={"Cache-Control": "only-if-cached"})
        if status == 200 and dict(headers).get("X-Cache") == "hit":
            if body != VALUE:
                raise RuntimeError("the sidecar's hit returned other bytes than were written")
            return headers
        if status == 504:  # not cached yet (the writer refills in the background): read it through
            http_request(sidecar.port, "GET", KEY_PATH)
        time.sleep(0.02)
    raise RuntimeError(f"no hit on {KEY_PATH} within {timeout:g}s:\n{sidecar.log_tail()}")


def check_response(name: str, raw: bytes, expected_names: list[str]) -> dict[str, Any]:
    """Status, body and header names of one server's raw response, compared with the sidecar's."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    names = [ln.split(":", 1)[0] for ln in lines[1:]]
    problems = []
    if not lines[0].startswith("HTTP/1.1 200"):
        problems.append(f"status line {lines[0]!r}")
    if body != VALUE:
        problems.append("body differs")
    if [n.lower() for n in names] != [n.lower() for n in expected_names]:
        problems.append(f"headers {names} != {expected_names}")
    if problems:
        raise RuntimeError(f"{name}: response not equivalent to the sidecar's hit: {'; '.join(problems)}")
    return {"bytes": len(raw), "header_bytes": len(head) + 4, "headers": names}


# -- the run ------------------------------------------------------------------------
def run(quick: bool, out_dir: Path) -> str:
    """Start everything, measure, stop everything; write ``hit.json``/``hit.md``; return the Markdown."""
    p = Params.of(quick)
    started = time.monotonic()
    info = machine()
    command = f"python -m bench.hit{' --quick' if quick else ''}"
    results: dict[str, Any] = {name: {} for name in HTTP_SERVERS}
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-hit-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        # Stops are registered before each start, so a failed start is cleaned up too.
        zk = LocalZooKeeper(tmp / "zk")
        stack.callback(zk.stop)
        redis_port = free_port()
        redis = OwnedProcess(
            "redis",
            [
                *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp)),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"),
            ],
            tmp,
            cpu=SERVER_CPU,
        )
        stack.callback(redis.stop)
        redis.start()
        zk.start()
        sidecar = PinnedSidecar(
            tmp,
            "sidecar",
            {
                "zk": zk.hosts,
                "namespace": "bench",
                "origin": f"sqlite:///{tmp}/o.db",
                "log_level": "warning",
                "shutdown_timeout": "3s",
            },
        )
        stack.callback(sidecar.stop)
        sidecar.start()

        hit_headers = make_hit(sidecar)
        copied = [(k, v) for k, v in hit_headers if k.lower() not in _GENERATED]
        server_header = dict(hit_headers).get("Server", "Python")
        (tmp / "value.bin").write_bytes(VALUE)
        ports = {"sidecar": sidecar.port}
        refs: dict[str, OwnedProcess] = {}
        for kind in ("aiohttp", "raw"):
            ports[kind] = free_port()
            refs[kind] = OwnedProcess(
                kind,
                [
                    *python_module("bench.hit_servers", kind, f"--port={ports[kind]}"),
                    *(f"--body-file={tmp / 'value.bin'}", f"--headers={json.dumps(copied)}"),
                    f"--server-header={server_header}",
                ],
                tmp,
                cpu=SERVER_CPU,
            )
            stack.callback(refs[kind].stop)
            refs[kind].start()
        for kind, proc in refs.items():
            wait_port(ports[kind], 15, owner=proc)
        wait_port(redis_port, 10, owner=redis)
        stored = redis_set(redis_port, REDIS_KEY, VALUE)
        if stored != len(VALUE):
            raise RuntimeError(f"redis holds {stored} bytes under {REDIS_KEY!r}, expected {len(VALUE)}")

        # Same bytes, same header names, from all three HTTP servers.
        expected = [k for k, _ in hit_headers if k.lower() != "connection"]
        responses = {}
        for name in ports:
            responses[name] = check_response(name, raw_response(ports[name], KEY_PATH), expected)
        loops = {"sidecar": uses_uvloop(sidecar.pid), **{k: uses_uvloop(v.pid) for k, v in refs.items()}}
        print(f"hit: {sidecar.name} answered only-if-cached with 200 X-Cache: hit; headers {hit_headers}", flush=True)

        before = sidecar.stats()
        counted = 0  # requests the clients saw answered by the sidecar
        in_flight = 0  # at most this many more: wrk stops with requests outstanding
        urls = {name: f"http://127.0.0.1:{ports[name]}{KEY_PATH}" for name in HTTP_SERVERS}
        for name in HTTP_SERVERS if p.warmup else ():
            for c in CONNECTIONS:
                warm = run_wrk(urls[name], c, p.warmup, tmp)
                if name == "sidecar":
                    counted += warm["requests"]
                    in_flight += c
        fixed_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in HTTP_SERVERS}
        for r in range(p.fixed_rounds):
            for name in rotated(HTTP_SERVERS, r):
                one = open_loop(ports[name], KEY_PATH, FIXED_RATE, p.fixed_slice, p.fixed_warmup)
                fixed_runs[name].append(one)
                if name == "sidecar":
                    counted += one["sent_total"]
            print(f"hit: fixed-rate round {r + 1}/{p.fixed_rounds} done", flush=True)
        wrk_runs: dict[str, list[dict[str, Any]]] = {f"{n} c{c}": [] for n in HTTP_SERVERS for c in CONNECTIONS}
        for r in range(p.rounds):
            for name in rotated(HTTP_SERVERS, r):
                for c in CONNECTIONS:
                    one = run_wrk(urls[name], c, p.slice, tmp)
                    wrk_runs[f"{name} c{c}"].append(one)
                    if name == "sidecar":
                        counted += one["requests"]
                        in_flight += c
            print(f"hit: wrk round {r + 1}/{p.rounds} done", flush=True)
        after = sidecar.stats()
        for name in HTTP_SERVERS:
            results[name]["fixed"] = summarize_open_loop(fixed_runs[name])
            for c in CONNECTIONS:
                results[name][f"c{c}"] = merge_wrk(wrk_runs[f"{name} c{c}"])
        results["redis"] = measure_redis(redis_port, p)
        print(f"hit: redis -c32: {results['redis']['c32']['rps']:.0f} req/s", flush=True)
        for proc in (*refs.values(), redis):
            proc.check_alive()  # a reference server that died mid-run would void its numbers
        assert zk.proc is not None
        cpu = meter.read([zk.proc.pid, sidecar.pid, redis.pid, *(r.pid for r in refs.values())])

    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    check = {
        "hits_delta": hits,
        "misses_delta": misses,
        "requests_counted": counted,
        "max_in_flight": in_flight,
        "ok": counted <= hits <= counted + in_flight and misses == 0,
    }
    data = {
        "name": NAME,
        "command": command,
        "machine": info,
        "uvloop": loops,
        "params": {**p.__dict__, "cell": p.cell, "fixed": p.fixed},
        "value_bytes": len(VALUE),
        "responses": responses,
        # One row per server, in table order (bench.plots reads this list).
        "servers": [{"name": LABELS[name], "key": name, **results[name]} for name in (*HTTP_SERVERS, "redis")],
        "stats_check": check,
        "cpu": cpu,
        "dapr_reference": DAPR,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    data["ratios"] = ratios(results)
    markdown = report(data)
    write_results(out_dir, NAME, data, markdown)
    return markdown


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The goal ratios, sidecar against the bare servers: over the whole cell and per round (paired)."""
    s, a, r = results["sidecar"], results["aiohttp"], results["raw"]
    paired = [x / y for x, y in zip(s["c32"]["rps_per_round"], a["c32"]["rps_per_round"], strict=True)]
    return {
        "sidecar_over_aiohttp_rps_c32": s["c32"]["rps"] / a["c32"]["rps"],
        "sidecar_over_aiohttp_rps_c32_per_round": paired,
        "sidecar_over_raw_rps_c32": s["c32"]["rps"] / r["c32"]["rps"],
        "sidecar_over_aiohttp_p99_c32": s["c32"]["p99_ms"] / a["c32"]["p99_ms"],
        "sidecar_over_aiohttp_rps_c1": s["c1"]["rps"] / a["c1"]["rps"],
        "sidecar_over_aiohttp_p99_c1": s["c1"]["p99_ms"] / a["c1"]["p99_ms"],
    }


def _spread(values: list[float], digits: int = 0) -> str:
    return f"{min(values):,.{digits}f}-{max(values):,.{digits}f}" if len(values) > 1 else "-"


def report(d: dict[str, Any]) -> str:
    """The Markdown section for one run."""
    res, q, p = {row["key"]: row for row in d["servers"]}, d["ratios"], d["params"]
    rounds = p["rounds"]
    how = (f"{rounds} rounds of {p['slice']} s, servers taking turns" if rounds > 1 else f"one {p['slice']} s run") + (
        f", after a {p['warmup']} s warm-up run per server and connection count" if p["warmup"] else ""
    )
    lines = [
        "## Hit path: one cached 1 KiB value",
        "",
        f"Servers pinned to core {SERVER_CPU}, load generators to core {LOAD_CPU}. wrk -t1, {p['cell']} s per cell "
        f"({how}); latency in ms. redis: redis-benchmark, the same value, `GET bench:hit`, about "
        f"{p['redis']:g} s per cell.",
        "",
        "| server | req/s @1 | p50 @1 | p99 @1 | req/s @32 | p50 @32 | p99 @32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*HTTP_SERVERS, "redis"):
        c1, c32 = res[name]["c1"], res[name]["c32"]
        lines.append(
            f"| {LABELS[name]} | {c1['rps']:,.0f} | {fmt(c1['p50_ms'], 3)} | {fmt(c1['p99_ms'], 3)} "
            f"| {c32['rps']:,.0f} | {fmt(c32['p50_ms'], 3)} | {fmt(c32['p99_ms'], 3)} |"
        )
    if rounds > 1:
        lines += [
            "",
            "req/s per round (min-max): "
            + "; ".join(
                f"{LABELS[n]} @1 {_spread(res[n]['c1']['rps_per_round'])}, "
                f"@32 {_spread(res[n]['c32']['rps_per_round'])}"
                for n in HTTP_SERVERS
            )
            + ".",
        ]
    goal_tp = "met" if q["sidecar_over_aiohttp_rps_c32"] >= 1.0 else "not met"
    goal_p99 = "met" if q["sidecar_over_aiohttp_p99_c32"] <= 1.3 else "not met"
    paired = q["sidecar_over_aiohttp_rps_c32_per_round"]
    lines += [
        "",
        f"- sidecar / bare aiohttp throughput @32: **{q['sidecar_over_aiohttp_rps_c32']:.2f}x** "
        f"(goal >= 1.0x: {goal_tp})"
        + (f"; per round {_spread(paired, 2)}, median {pct(paired, 50):.2f}x" if len(paired) > 1 else "")
        + f"; @1: {q['sidecar_over_aiohttp_rps_c1']:.2f}x",
        f"- sidecar / raw asyncio.Protocol throughput @32: {q['sidecar_over_raw_rps_c32']:.2f}x",
        f"- sidecar p99 / bare aiohttp p99 @32: **{q['sidecar_over_aiohttp_p99_c32']:.2f}x** "
        f"(goal <= 1.3x: {goal_p99}); @1: {q['sidecar_over_aiohttp_p99_c1']:.2f}x",
    ]
    errors = {
        f"{n} -c{c}": res[n][f"c{c}"]["errors"]
        for n in HTTP_SERVERS
        for c in CONNECTIONS
        if any(res[n][f"c{c}"]["errors"].values())
    }
    if errors:
        lines.append(f"- wrk reported errors: {errors}")

    base = res["aiohttp"]["fixed"]
    fr = p["fixed_rounds"]
    lines += [
        "",
        f"Fixed rate: {FIXED_RATE:,.0f} requests/s on one keep-alive connection, open loop (latency from the "
        f"scheduled send), {p['fixed']:g} s per server"
        + (f" in {fr} slices of {p['fixed_slice']:g} s, servers taking turns" if fr > 1 else "")
        + f", each slice after {p['fixed_warmup']:g} s at the same rate; ms.",
        "",
        "| server | requests | achieved req/s | p50 | p90 | p99 | p99.9 | max | p99 per slice "
        "| p90 - bare aiohttp | p99 - bare aiohttp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in HTTP_SERVERS:
        f = res[name]["fixed"]
        lines.append(
            f"| {LABELS[name]} | {f['requests']:,} | {f['achieved_rps']:,.0f} | {fmt(f['p50_ms'], 3)} "
            f"| {fmt(f['p90_ms'], 3)} | {fmt(f['p99_ms'], 3)} | {fmt(f['p999_ms'], 3)} | {fmt(f['max_ms'], 3)} "
            f"| {_spread(f['p99_per_round'], 3)} "
            f"| {f['p90_ms'] - base['p90_ms']:+.3f} | {f['p99_ms'] - base['p99_ms']:+.3f} |"
        )
    sf = res["sidecar"]["fixed"]
    lines += [
        "",
        f"For scale, Dapr's published sidecar overhead at 1,000 req/s (v1.12 state API, gRPC, 1 KB, sidecar at "
        f"0.5 vCPU, vs. calling the store directly; {DAPR['source']}): +{DAPR['p90_added_ms']} ms p90, "
        f"+{DAPR['p99_added_ms']} ms p99. Here a whole sidecar hit (against an in-process cache at ~0 ms) "
        f"costs {sf['p90_ms']:.3f} ms p90 and {sf['p99_ms']:.3f} ms p99 on loopback; against a bare aiohttp "
        f"server returning the same bytes, {sf['p90_ms'] - base['p90_ms']:+.3f} ms p90 and "
        f"{sf['p99_ms'] - base['p99_ms']:+.3f} ms p99.",
    ]
    c = d["stats_check"]
    loops = ", ".join(f"{LABELS[k]} {'yes' if v else 'no'}" for k, v in d["uvloop"].items())
    sizes = ", ".join(f"{LABELS[n]} {r['bytes']} B" for n, r in d["responses"].items())
    lines += [
        "",
        f"Checks: before measuring, `GET {KEY_PATH}` with `Cache-Control: only-if-cached` answered 200, "
        f"`X-Cache: hit`, the 1,024 bytes written. Responses are the same size and header names "
        f"({', '.join(d['responses']['sidecar']['headers'])}): {sizes}. During the load the sidecar's "
        f"`/v1/stats` hits grew by {c['hits_delta']:,} for {c['requests_counted']:,} requests answered "
        f"(up to {c['max_in_flight']} more in flight when wrk stopped), misses by {c['misses_delta']}: "
        f"{'ok' if c['ok'] else 'MISMATCH'}.",
        "",
        cpu_note(d["cpu"]),
        "",
        machine_line(d["command"], d["machine"], d["uvloop"]["sidecar"]) + f" uvloop in use per process: {loops}; "
        f"redis-server, wrk, redis-benchmark from Debian. Wall time {d['wall_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m bench.hit [--quick] [--out DIR]``."""
    run_scenario(run, scenario_parser(__doc__, "hit", "2 s cells (about 20 s in all) instead of 10 s").parse_args())


if __name__ == "__main__":
    main()
