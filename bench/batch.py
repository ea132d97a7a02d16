"""Batch reads against single GETs, side by side: keys per second at 32 connections.

    .venv/bin/python -m bench.batch [--quick] [--out bench/results]

One ZooKeeper and one sidecar (pinned to core 0) on the SQLite origin, 64
keys of 1 KiB written and cached; wrk (pinned to core 1) then runs, in the
same run and against the same sidecar:

1. **single GET**: each request reads one of the 64 keys (rotating);
2. **batch of N** (1, 16, 64): each request is ``POST /v1/batch/get`` with N
   of the keys, every one a hit.

Keys per second is requests per second times keys per request.  The issue's
goal: a batch of 64 reads at least 5x the keys per second of single GETs.
All are hits: a miss costs the same origin and ZooKeeper round trips either
way, and would measure those instead.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import LocalZooKeeper

from .common import (
    PinnedSidecar,
    machine,
    machine_line,
    merge_wrk,
    run_scenario,
    run_wrk,
    scenario_parser,
    write_results,
)
from .lib.stats import fmt

__all__ = ["main", "run"]

KEYS = [f"batch/{i:03d}" for i in range(64)]
VALUE = b"v" * 1024
CONNECTIONS = 32
SIZES = (1, 16, 64)


def _single_lua() -> str:
    paths = ", ".join(f'"/v1/keys/{key}"' for key in KEYS)
    return f"""
local paths = {{{paths}}}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def _batch_lua(size: int) -> str:
    body = json.dumps({"keys": KEYS[:size]}).replace('"', '\\"')
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = "{body}"
"""


def _prepare(base: str) -> None:
    for key in KEYS:
        put = urllib.request.Request(f"{base}/v1/keys/{key}", data=VALUE, method="PUT")
        with urllib.request.urlopen(put, timeout=10) as resp:
            assert resp.status == 200
    # Until every key is a hit (the writer refills its own entry in the background).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{base}/v1/batch/get", data=json.dumps({"keys": KEYS}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            results = json.load(resp)["results"]
        if all(r["status"] == 200 and r["cache"] == "hit" for r in results):
            return
    raise RuntimeError("the 64 keys did not all become hits within 10 s")


def run(quick: bool, out_dir: Path) -> str:
    """Measure single GETs and batches of 1, 16 and 64; write ``batch.json``/``batch.md``; return the Markdown."""
    seconds, rounds = (2, 1) if quick else (5, 3)
    info = machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-batch-") as tmpdir:
        tmp = Path(tmpdir)
        zk = LocalZooKeeper(tmp / "zk")
        zk.start()
        sidecar = PinnedSidecar(
            tmp,
            "sidecar",
            {"zk": zk.hosts, "namespace": "bench", "origin": f"sqlite:///{tmp}/o.db", "log_level": "warning"},
        )
        try:
            sidecar.start()
            _prepare(sidecar.url)
            cells = {"single GET": ("/v1/keys/" + KEYS[0], _single_lua(), 1)}
            for size in SIZES:
                cells[f"batch of {size}"] = ("/v1/batch/get", _batch_lua(size), size)
            # Rounds interleave the cells, so drift in the machine's speed touches each alike.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cells}
            for _ in range(rounds):
                for name, (path, lua, _) in cells.items():
                    runs[name].append(run_wrk(sidecar.url + path, CONNECTIONS, seconds, tmp, requests_lua=lua))
            for name, (_, _, size) in cells.items():
                merged = merge_wrk(runs[name])
                bad = sum(merged["errors"].values())
                if bad:
                    raise RuntimeError(f"{name}: {bad} errors from wrk: {merged['errors']}")
                results[name] = {**merged, "keys_per_request": size, "keys_per_s": merged["rps"] * size}
        finally:
            sidecar.stop()
            zk.stop()
    single = results["single GET"]["keys_per_s"]
    rows = [
        f"| {name} | {fmt(r['rps'], 0)} | {fmt(r['keys_per_s'], 0)} | {r['keys_per_s'] / single:.2f}x "
        f"| {fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} |"
        for name, r in results.items()
    ]
    goal = results["batch of 64"]["keys_per_s"] / single
    command = f"python -m bench.batch{' --quick' if quick else ''}"
    markdown = "\n".join(
        [
            "## Batch reads against single GETs (hits, 32 connections)\n",
            machine_line(command, info) + "\n",
            f"64 keys of 1 KiB, all cached; wrk -c{CONNECTIONS}, {rounds} round(s) of {seconds} s per cell, "
            "interleaved.\n",
            "| request | requests/s | keys/s | keys/s vs single GET | latency p50 / p99 ms |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"A batch of 64 reads **{goal:.1f}x** the keys per second of single GETs (goal: at least 5x).\n",
        ]
    )
    write_results(out_dir, "batch", {"machine": info, "results": results}, markdown)
    return markdown


def main() -> None:
    """``python -m bench.batch``."""
    run_scenario(run, scenario_parser(__doc__, "batch", "2 s per cell, one round").parse_args())


if __name__ == "__main__":
    main()
