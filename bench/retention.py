"""ZooKeeper's state bounded by ``version_retention``, not by every key ever written (issue #12).

    .venv/bin/python -m bench.retention [--quick] [--out bench/results]

The same write stream twice, on a fresh ZooKeeper each time, in one run:
N distinct keys (10^6; --quick: 6,000) written once each at W keys per
second, as version znodes at their real paths with a write's note as data
(multi-op transactions of 1000, as ``bench.scale`` creates them: the
sidecar's own write path would take hours for 10^6 keys, and what is
measured here is ZooKeeper's state, not the write path), and

* **kept**: one sidecar, the namespace's elected housekeeper, with
  ``version_retention`` T, ``housekeeping_interval`` 1 s and a request
  budget well above the write rate;
* **unkept**: no sidecar at all, so nothing retires anything (every key
  ever written keeps its version znode, as before issue #12).

Every second: ZooKeeper's znode count (``mntr``) and RSS.  All along, a probe
client times one ``exists`` every 10 ms: ZooKeeper's latency for everyone
else, with the housekeeper at work and without.  After the writes, the kept
phase waits until the housekeeper has retired what is older than T.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from harness import LocalZooKeeper
from sidecar.coordination.layout import Layout

from .common import (
    PinnedSidecar,
    machine,
    machine_line,
    proc_status_bytes,
    run_scenario,
    scenario_parser,
    write_results,
)
from .lib.stats import MIB, pct
from .scale import NOTE, TXN_OPS, create_buckets

NAMESPACE = "retention"


def _write_stream(hosts: str, layout: Layout, keys: int, rate: float, stop: threading.Event) -> dict[str, Any]:
    """Create ``keys`` version znodes at ``rate`` per second (paced per transaction); returns what it did."""
    client = KazooClient(hosts=hosts, timeout=30)
    client.start(timeout=30)
    errors = 0
    started = time.monotonic()
    try:
        create_buckets(client, layout)
        for first in range(0, keys, TXN_OPS):
            if stop.is_set():
                break
            due = started + first / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            txn = client.transaction()
            for i in range(first, min(first + TXN_OPS, keys)):
                txn.create(layout.version_path(f"r{i}"), NOTE)
            errors += sum(isinstance(r, Exception) for r in txn.commit())
    finally:
        client.stop()
        client.close()
    return {"written": keys, "errors": errors, "seconds": time.monotonic() - started}


def _probe_latency(hosts: str, path: str, stop: threading.Event, out: list[float]) -> None:
    client = KazooClient(hosts=hosts, timeout=30)
    client.start(timeout=30)
    try:
        while not stop.is_set():
            sent = time.perf_counter()
            client.exists(path)
            out.append((time.perf_counter() - sent) * 1000)
            stop.wait(0.01)
    finally:
        client.stop()
        client.close()


def _znodes(zk: LocalZooKeeper) -> int:
    # mntr answers without its counters until the server serves requests.
    deadline = time.monotonic() + 30
    while (count := zk.mntr().get("zk_znode_count")) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("ZooKeeper's mntr never gave zk_znode_count")
        time.sleep(0.1)
    return int(count)


def _phase(tmp: Path, name: str, keys: int, rate: float, retention: float, keep: bool) -> dict[str, Any]:
    zk = LocalZooKeeper(tmp / f"zk-{name}", heap="3g")
    zk.start()
    layout = Layout(f"/zkcache/{NAMESPACE}")
    sidecar: PinnedSidecar | None = None
    samples: list[dict[str, float]] = []
    latencies: list[float] = []
    stop_probe, stop_writer = threading.Event(), threading.Event()
    try:
        base = _znodes(zk)
        if keep:
            sidecar = PinnedSidecar(
                tmp,
                f"keeper-{name}",
                {
                    "zk": zk.hosts,
                    "namespace": NAMESPACE,
                    "origin": f"sqlite:///{tmp}/origin-{name}.db",
                    "log_level": "warning",
                    "version_retention": f"{retention}s",
                    "housekeeping_interval": "1s",
                    "housekeeping_rate": "200000",
                    "lock_timeout": "1s",
                },
                cpu=None,
            )
            sidecar.start(wait_ready=True, timeout=30)
        probe = threading.Thread(target=_probe_latency, args=(zk.hosts, "/zookeeper", stop_probe, latencies))
        probe.start()
        written: dict[str, Any] = {}
        writer = threading.Thread(
            target=lambda: written.update(_write_stream(zk.hosts, layout, keys, rate, stop_writer))
        )
        started = time.monotonic()
        writer.start()

        def sample() -> None:
            assert zk.proc is not None
            samples.append(
                {
                    "t": round(time.monotonic() - started, 2),
                    "znodes": _znodes(zk) - base,
                    "zk_rss_mib": proc_status_bytes(zk.proc.pid)["VmRSS"] / MIB,
                }
            )

        while writer.is_alive():
            sample()
            writer.join(1.0)
        writes_done = time.monotonic() - started
        # The buckets (65,792 parents) stay: they are part of the count.
        buckets = 256 + 256 * 256 + 2
        if keep:
            settle_deadline = time.monotonic() + retention + 120
            while time.monotonic() < settle_deadline:
                sample()
                if samples[-1]["znodes"] <= buckets + 20:
                    break
                time.sleep(1.0)
        else:
            sample()
        stats = sidecar.stats()["housekeeping"] if sidecar is not None else None
    finally:
        stop_probe.set()
        stop_writer.set()
        if sidecar is not None:
            sidecar.stop()
        zk.stop()
    during = [s["znodes"] for s in samples if s["t"] <= writes_done]
    return {
        "keys": keys,
        "rate": rate,
        "retention": retention if keep else None,
        "writes": written,
        "writes_seconds": round(writes_done, 1),
        "bucket_znodes": buckets,
        "max_znodes": max(during or [0]),
        "final_znodes": samples[-1]["znodes"] if samples else None,
        "max_zk_rss_mib": max((s["zk_rss_mib"] for s in samples), default=0),
        "latency_ms": {"p50": pct(latencies, 50), "p99": pct(latencies, 99), "n": len(latencies)},
        "housekeeping": stats,
        "samples": samples,
    }


def run(quick: bool, out_dir: Path) -> str:
    """Measure both phases, write ``retention.json`` and ``retention.md``, return the Markdown section."""
    keys, rate, retention = (6_000, 2_000.0, 1.0) if quick else (1_000_000, 2_000.0, 10.0)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        kept = _phase(Path(tmp), "kept", keys, rate, retention, keep=True)
        unkept = _phase(Path(tmp), "unkept", keys, rate, retention, keep=False)
    data = {"kept": kept, "unkept": unkept}
    window = rate * retention
    hk = kept["housekeeping"] or {}
    totals = hk.get("totals", {})
    command = "python -m bench.retention" + (" --quick" if quick else "")
    b = kept["bucket_znodes"]
    k_max, u_max = kept["max_znodes"] - b, unkept["max_znodes"] - b
    k_end, u_end = kept["final_znodes"] - b, unkept["final_znodes"] - b
    k_rss, u_rss = kept["max_zk_rss_mib"], unkept["max_zk_rss_mib"]
    k_lat, u_lat = kept["latency_ms"], unkept["latency_ms"]
    rows = [
        ("most version znodes while writing", f"{k_max:,}", f"{u_max:,}", f"{k_max / max(u_max, 1):.3f}"),
        ("version znodes at the end", f"{k_end:,}", f"{u_end:,}", ""),
        ("most version znodes / keys written within T", f"{k_max / window:.2f}", f"{u_max / window:.2f}", ""),
        ("ZooKeeper RSS, most", f"{k_rss:,.0f} MiB", f"{u_rss:,.0f} MiB", f"{k_rss / max(u_rss, 1):.2f}"),
        (
            "probe `exists` p50 / p99",
            f"{k_lat['p50']:.2f} / {k_lat['p99']:.2f} ms",
            f"{u_lat['p50']:.2f} / {u_lat['p99']:.2f} ms",
            f"{k_lat['p99'] / max(u_lat['p99'], 1e-9):.2f} (p99)",
        ),
    ]
    table = "\n".join(f"| {' | '.join(row)} |" for row in rows)
    md = f"""## Version znodes bounded by retention

{keys:,} distinct keys written once each at {rate:,.0f}/s ({kept["writes_seconds"]:.0f} s), as version znodes;
`version_retention` T = {retention:g} s, so about {window:,.0f} keys were written within any retention window.
ZooKeeper's znode count (`mntr`, minus its own at start and the {b:,} bucket parents), its RSS, and the
latency of a probe client's `exists` every 10 ms, for the same stream with and without a housekeeper:

| | with housekeeping (a sidecar leads) | without (nothing retires) | ratio |
|---|---|---|---|
{table}

The housekeeper: {hk.get("rounds", 0)} rounds, {totals.get("retired", 0):,} version znodes retired,
{totals.get("skipped", 0):,} skipped, {totals.get("scanned", 0):,} stats read in all; its last round took
{(hk.get("last_round") or {}).get("seconds", 0):.1f} s. A round reads the stat of every version znode (kazoo
manages about 9,000 a second from one Python process here) and lists every bucket, so ZooKeeper holds about
W x (T + a round + the interval) version znodes: the keys written within the retention, plus one round's.

{machine_line(command, info)}
"""
    write_results(out_dir, "retention", data, md)
    return md


def main() -> None:
    parser = scenario_parser(__doc__, "retention", "6,000 keys at 2,000/s, retention 1 s")
    run_scenario(run, parser.parse_args())


if __name__ == "__main__":
    main()
