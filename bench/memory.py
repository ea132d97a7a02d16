"""The sidecar's memory: per cached entry, and against the chart's bound under hostile loads.

    .venv/bin/python -m bench.memory [--quick] [--out bench/results]

**Per cached entry.** For each value size (100 B and 1 KiB), with N = 100,000
entries (1,000 with --quick), under a temporary directory, on loopback:

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

**The bound.** The chart sizes the container at 1.25 x ``max_bytes`` + 64 MiB
(``sidecar.config.memory_needed``).  Three loads, each on a fresh sidecar
(issue 14 found each one past the bound), side by side in one run:

a. large values: 640 distinct values of 1 MiB written through a sidecar with
   ``max_bytes`` 256 MiB (16 PUTs at once), then each read back (16 GETs at
   once): more than ``max_bytes`` holds, so the cache evicts as it fills;
b. large content types: 10,000 values of 100 B, each with its own 8,000-byte
   ``Content-Type``, read through a sidecar with ``max_bytes`` 8 MiB (32
   concurrent GETs): the content type is held with the entry;
c. refused bodies: 300 concurrent chunked PUTs of 2 MiB (no Content-Length,
   over ``max_value_bytes``, 1 MiB), every one of which must get 413, on a
   sidecar with the default ``max_bytes`` (256 MiB).

The origin rows of (b) are written straight into the SQLite file.
While a load runs, a thread samples the sidecar's ``VmRSS`` every 10 ms; the
peak reported is the kernel's own high-water mark, ``VmHWM`` (the sidecar is
fresh, so it is this load's peak).  Each row says whether the peak stayed
within the bound; nothing is asserted, so a run shows where the sidecar
stands.  --quick runs the same three loads, smaller: (a) 128 x 1 MiB through
48 MiB, (b) 3,000 through 2 MiB, (c) 150 PUTs.

Writes ``memory.json`` and ``memory.md`` to --out.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from harness import LocalZooKeeper
from sidecar.cache import ENTRY_OVERHEAD
from sidecar.config import memory_needed

from .common import (
    CpuMeter,
    PinnedSidecar,
    cpu_note,
    machine,
    machine_line,
    proc_status_bytes,
    progress,
    run_scenario,
    scenario_parser,
    seed_origin,
    uses_uvloop,
    write_results,
)
from .lib.http import http_request
from .lib.stats import MIB, fmt

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
        """Quick: 1,000 entries per size (a few seconds); full: 100,000 (about 2 minutes)."""
        if quick:
            return cls(quick, entries=1_000, settle=0.3, fill_timeout=60)
        return cls(quick, entries=100_000, settle=2.0, fill_timeout=900)  # a bound on a hang, not a timing


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


# -- the bound: 1.25 x max_bytes + 64 MiB under hostile loads ------------------------
BOUND_FORMULA = "1.25 x max_bytes + 64 MiB"
CONTENT_TYPE_BYTES = 8000  # "8 KB": under aiohttp's 8,190-byte limit on one header line


def big_content_type(i: int) -> str:
    """The i-th key's own content type, :data:`CONTENT_TYPE_BYTES` long (distinct: none is shared)."""
    head = f"application/x-bench-{i:07d}; pad="
    return head + "x" * (CONTENT_TYPE_BYTES - len(head))


@dataclass(frozen=True)
class Load:
    """One hostile load of the bound table: its sidecar's bound and what it sends."""

    name: str
    title: str
    max_bytes: int
    requests: int
    concurrency: int
    value_bytes: int

    @property
    def bound(self) -> int:
        """What the chart gives the container for this ``max_bytes``."""
        return memory_needed(self.max_bytes)


def loads(quick: bool) -> list[Load]:
    """The three loads of issue 14; --quick makes them smaller (the same shapes)."""
    if quick:
        return [
            Load("a", "large values", 48 * MIB, 128, 16, MIB),
            Load("b", "8 KB content types", 2 * MIB, 3_000, 32, 100),
            Load("c", "refused chunked PUTs", 256 * MIB, 150, 150, 2 * MIB),
        ]
    return [
        Load("a", "large values", 256 * MIB, 640, 16, MIB),
        Load("b", "8 KB content types", 8 * MIB, 10_000, 32, 100),
        Load("c", "refused chunked PUTs", 256 * MIB, 300, 300, 2 * MIB),
    ]


class RssSampler:
    """Samples a process's ``VmRSS`` on a thread every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status_bytes(self.pid, ("VmRSS",))["VmRSS"]
            except (OSError, KeyError):
                return  # the process is gone
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)


async def get_all(
    url: str, keys: list[str], concurrency: int, check: Callable[[int, bytes, aiohttp.ClientResponse], bool]
) -> Counter[str]:
    """GET every key once, ``concurrency`` at a time: counts of ``GET <X-Cache>``, or ``GET wrong <status>``."""
    outcome: Counter[str] = Counter()
    todo = iter(enumerate(keys))
    async with _session(concurrency) as http:

        async def worker() -> None:
            for i, key in todo:  # shared iterator: each key is taken by exactly one worker
                try:
                    async with http.get(f"{url}/v1/keys/{key}") as resp:
                        body = await resp.read()
                        right = check(i, body, resp)
                        outcome[f"GET {resp.headers.get('X-Cache', '-')}" if right else f"GET wrong {resp.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome[f"GET {type(exc).__name__}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


async def put_all(url: str, keys: list[str], concurrency: int, body: Callable[[int], Any]) -> Counter[str]:
    """PUT ``body(i)`` to every key once, ``concurrency`` at a time: counts of ``PUT <status>`` or errors.

    A body that is an async iterator is sent chunked (no Content-Length).
    """
    outcome: Counter[str] = Counter()
    todo = iter(enumerate(keys))
    async with _session(concurrency) as http:

        async def worker() -> None:
            for i, key in todo:
                try:
                    headers = {"Content-Type": CONTENT_TYPE}
                    async with http.put(f"{url}/v1/keys/{key}", data=body(i), headers=headers) as resp:
                        await resp.read()
                        outcome[f"PUT {resp.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome[f"PUT {type(exc).__name__}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


def _session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=120)
    )


async def _chunks(size: int) -> AsyncIterator[bytes]:
    chunk = b"z" * (64 * 1024)
    for _ in range(size // len(chunk)):
        yield chunk


async def _run_load(load: Load, url: str) -> Counter[str]:
    keys = [key_of(i) for i in range(load.requests)]
    size = load.value_bytes
    if load.name == "a":  # written through, then read back: the cache evicts as it fills
        outcome = await put_all(url, keys, load.concurrency, lambda i: value_of(i, size))
        return outcome + await get_all(url, keys, load.concurrency, lambda i, body, _: body == value_of(i, size))
    if load.name == "b":  # read through from rows written straight into the origin

        def right(i: int, body: bytes, resp: aiohttp.ClientResponse) -> bool:
            return len(body) == size and resp.headers.get("Content-Type") == big_content_type(i)

        return await get_all(url, keys, load.concurrency, right)
    refused = [f"refused/{i}" for i in range(load.requests)]  # c: all at once, chunked
    return await put_all(url, refused, load.concurrency, lambda i: _chunks(size))


def measure_bound(tmp: Path, zk: LocalZooKeeper, load: Load) -> dict[str, Any]:
    """One fresh sidecar with ``load.max_bytes`` under ``load``: its RSS peak against the bound."""
    db = tmp / f"origin-bound-{load.name}.db"
    if load.name == "b":  # each row has its own content type: none is shared
        rows_b = ((key_of(i), value_of(i, load.value_bytes), big_content_type(i)) for i in range(load.requests))
        asyncio.run(seed_origin(db, rows_b))
    sidecar = PinnedSidecar(
        tmp,
        f"bound-{load.name}",
        {
            "zk": zk.hosts,
            "namespace": f"bound-{load.name}",
            "origin": f"sqlite:///{db}",
            "log_level": "warning",
            "max_bytes": str(load.max_bytes),
            "shutdown_timeout": "3s",
        },
        cpu=None,
    )
    try:
        sidecar.start()
        pid = sidecar.pid
        time.sleep(0.3)
        before = proc_status_bytes(pid)
        started = time.monotonic()
        with RssSampler(pid) as sampler:
            outcome = asyncio.run(_run_load(load, sidecar.url))
            seconds = time.monotonic() - started
            time.sleep(0.5)  # what the load left behind: still resident?
        after = proc_status_bytes(pid)
        stats = sidecar.stats()
        uvloop_on = uses_uvloop(pid)
    finally:
        sidecar.stop()
    peak = max(after["VmHWM"], sampler.peak)
    return {
        "load": load.name,
        "title": load.title,
        "max_bytes": load.max_bytes,
        "bound_bytes": load.bound,
        "requests": load.requests,
        "concurrency": load.concurrency,
        "value_bytes": load.value_bytes,
        "outcome": dict(outcome),
        "seconds": seconds,
        "rss_before": before["VmRSS"],
        "rss_after": after["VmRSS"],
        "rss_sampled_peak": sampler.peak,
        "rss_samples": sampler.samples,
        "vm_hwm": after["VmHWM"],
        "peak_bytes": peak,
        "peak_over_bound": peak / load.bound,
        "within_bound": peak <= load.bound,
        "cache": {k: stats.get(k) for k in ("entries", "bytes", "evictions", "max_bytes")},
        "uvloop": uvloop_on,
    }


def run(quick: bool, out_dir: Path) -> str:
    """Measure both value sizes and the three bound loads; write ``memory.json``/``memory.md``; return the Markdown."""
    p = Params.of(quick)
    started = time.monotonic()
    info = machine()
    command = f"python -m bench.memory{' --quick' if quick else ''}"
    results: list[dict[str, Any]] = []
    bounds: list[dict[str, Any]] = []
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-mem-") as tmpdir:
        tmp = Path(tmpdir)
        zk = LocalZooKeeper(tmp / "zk")
        try:
            zk.start()
            for load in loads(quick):
                progress(f"memory: bound ({load.name}) {load.title}: {load.requests} requests")
                bounds.append(measure_bound(tmp, zk, load))
                print(bound_line(bounds[-1]), flush=True)
            for size in SIZES:
                progress(f"memory: {p.entries} entries of {size} B")
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
        "bound": bounds,
        "sizes": results,  # one row per value size (bench.plots reads this list)
        "cpu": cpu,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    markdown = report(data)
    write_results(out_dir, NAME, data, markdown)
    return markdown


def bound_line(b: dict[str, Any]) -> str:
    """One line for the terminal: a load's RSS peak against its bound."""
    return (
        f"memory: bound ({b['load']}) {b['title']}: RSS peak {b['peak_bytes'] / MIB:.0f} MiB, bound "
        f"{b['bound_bytes'] / MIB:.0f} MiB ({BOUND_FORMULA}, max_bytes {b['max_bytes'] / MIB:g} MiB): "
        f"{b['peak_over_bound']:.3f}x; within bound: {'yes' if b['within_bound'] else 'NO'}"
    )


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n:,} B"


def _outcome(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def bound_report(bounds: list[dict[str, Any]]) -> list[str]:
    """The Markdown table of the three loads against the chart's bound."""
    lines = [
        "## A memory bound that holds",
        "",
        f"The chart gives the container {BOUND_FORMULA} (`sidecar.config.memory_needed`). Three loads, each on a "
        "fresh sidecar, side by side in one run (issue 14 found each past the bound): RSS peak is the kernel's "
        "`VmHWM` of the sidecar process (its own high-water mark; `VmRSS` sampled every 10 ms agrees or is "
        "lower), RSS before the load and after it (0.5 s later) from `/proc/<pid>/status`.",
        "",
        "| load | max_bytes | requests | answers | cache after (entries, `bytes`, evictions) | RSS before "
        "| RSS peak | RSS after | bound | peak / bound | within bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in bounds:
        c = b["cache"]
        cache = "-" if c.get("entries") is None else f"{c['entries']:,}, {c['bytes'] / MIB:.1f} MiB, {c['evictions']:,}"
        lines.append(
            f"| ({b['load']}) {b['title']} | {b['max_bytes'] / MIB:g} MiB | {b['requests']:,} x "
            f"{_size(b['value_bytes'])}, {b['concurrency']} at once | {_outcome(b['outcome'])} | {cache} "
            f"| {b['rss_before'] / MIB:.0f} MiB | **{b['peak_bytes'] / MIB:.0f} MiB** | {b['rss_after'] / MIB:.0f} MiB "
            f"| {b['bound_bytes'] / MIB:.0f} MiB | {fmt(b['peak_over_bound'], 3)}x "
            f"| **{'yes' if b['within_bound'] else 'no'}** |"
        )
    lines += [
        "",
        "- (a) distinct values of 1 MiB written through the sidecar (16 PUTs at once), then each read back (16 GETs "
        "at once), more of them than `max_bytes` holds: the cache evicts least recently used as it fills.",
        f"- (b) values of 100 B, each with its own {CONTENT_TYPE_BYTES:,}-byte `Content-Type` (none shared), read "
        "through (32 GETs at once): what the cache charges an entry against `max_bytes` must cover what it holds.",
        "- (c) chunked PUTs (no Content-Length) of 2 MiB, over `max_value_bytes` (1 MiB), all sent at once: each "
        "must be refused with 413 without the sidecar holding every body at the same time.",
        "",
    ]
    return lines


def report(d: dict[str, Any]) -> str:
    """The Markdown section for one run."""
    res = d["sizes"]
    n = d["params"]["entries"]
    lines = [
        *bound_report(d["bound"]),
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
        machine_line(d["command"], d["machine"], all(r["uvloop"] for r in res + d["bound"]))
        + f" Wall time {d['wall_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m bench.memory [--quick] [--out DIR]``."""
    quick_help = "1,000 entries per size instead of 100,000; smaller bound loads"
    run_scenario(run, scenario_parser(__doc__, "memory", quick_help).parse_args())


if __name__ == "__main__":
    main()
