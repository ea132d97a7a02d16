"""PNG plots of a benchmark run, drawn from the ``<scenario>.json`` files it wrote.

    .venv/bin/python -m bench.plots [--out bench/results]

Each plot is drawn only if its scenario's JSON is there, so a partial run
(``--only``) plots what it measured.  The JSON files are a run's raw output and
are not committed: redraw after running the scenario.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.axes import Axes

__all__ = ["make_all"]


def _load(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cdf(ax: Axes, samples: list[float], label: str) -> None:
    """Latency distribution as a CDF on a log axis: tails stay visible."""
    if not samples:
        return
    ordered = sorted(samples)
    n = len(ordered)
    ax.plot(ordered, [(i + 1) / n for i in range(n)], label=f"{label} (n={n})")


def _finish(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _hit(data: dict[str, Any], out_dir: Path) -> Path | None:
    rows = data.get("servers") or []
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in rows]
    for offset, conns in ((-0.2, "c1"), (0.2, "c32")):
        values = [(r.get(conns) or {}).get("rps", 0) / 1000 for r in rows]
        left.bar([i + offset for i in range(len(rows))], values, width=0.4, label=f"{conns[1:]} connection(s)")
    left.set_xticks(range(len(rows)), names, rotation=15)
    left.set_ylabel("thousand requests/s")
    left.set_title("Hit throughput, 1 KiB values")
    left.legend()
    for r in rows:
        cell = r.get("c32") or {}
        if cell.get("p50_ms") is not None:
            right.plot(
                [50, 90, 99], [cell["p50_ms"], cell.get("p90_ms", math.nan), cell["p99_ms"]], "o-", label=r["name"]
            )
    right.set_xlabel("percentile")
    right.set_ylabel("ms")
    right.set_title("Hit latency at 32 connections")
    right.legend()
    return _finish(fig, out_dir / "hit.png")


def _write(data: dict[str, Any], out_dir: Path) -> Path | None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("miss", "GET miss"), ("put", "PUT"), ("cas", "PUT If-Match"), ("fresh", "PUT new key")):
        _cdf(left, (data.get(name) or {}).get("latency_ms", []), label)
    left.set_xscale("log")
    left.set_xlabel("ms (log)")
    left.set_ylabel("fraction of requests")
    left.set_title("Miss and write-through latency")
    left.legend(fontsize=8)
    ops = [n for n in ("put", "cas", "fresh") if (data.get(n) or {}).get("phases")]
    bottom = [0.0] * len(ops)
    phase_names: list[str] = []
    for op in ops:
        phase_names += [p for p in data[op]["phases"] if p not in phase_names]
    for phase in phase_names:
        values = [data[op]["phases"].get(phase, {}).get("p50", 0.0) for op in ops]
        right.bar(ops, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_ylabel("ms (p50 of each phase, Server-Timing)")
    right.set_title("Where a write's time goes")
    right.legend(fontsize=8)
    return _finish(fig, out_dir / "write.png")


def _fanout(data: dict[str, Any], out_dir: Path) -> Path | None:
    results = data.get("results") or []
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [r["sidecars"] for r in results]
    for key, label in (("p50", "p50"), ("p99", "p99")):
        ax.plot(
            sizes,
            # The watchers' own stamps (rounds without polling) when the run has them.
            [
                r.get("stamped", r["sidecar"]).get("sent_to_applied_summary", r["sidecar"]["sent_to_drop_summary"])[key]
                for r in results
            ],
            "o-",
            label=f"sidecar, PUT sent -> dropped, {label}",
        )
        ax.plot(
            sizes,
            [r["floor"]["set_to_callback_summary"][key] for r in results],
            "s--",
            label=f"raw ZooKeeper, set -> watch, {label}",
        )
    ax.set_xlabel("sidecars (one writer, the rest watching)")
    ax.set_ylabel("ms")
    ax.set_title("Invalidation fan-out")
    ax.legend(fontsize=8)
    return _finish(fig, out_dir / "fanout.png")


def _scale(data: dict[str, Any], out_dir: Path) -> Path | None:
    steps = data.get("steps") or []
    if not steps:
        return None
    keys = [s["keys"] for s in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("p50", "p99"):
        left.plot(keys, [s["miss"]["latency"][key] for s in steps], "o-", label=f"miss {key}")
        left.plot(
            keys,
            [s["propagation"]["sent_to_drop_summary"][key] for s in steps],
            "s--",
            label=f"PUT sent -> dropped {key}",
        )
    left.set_xscale("log")
    left.set_xlabel("keys (version znodes; cached entries up to 10^5)")
    left.set_ylabel("ms")
    left.set_title("Latency against key count")
    left.legend(fontsize=8)
    right.plot(keys, [s["rss"]["b"] / 2**20 for s in steps], "o-", label="sidecar RSS")
    right.plot(keys, [s["rss"]["zookeeper"] / 2**20 for s in steps], "s--", label="ZooKeeper RSS")
    right.set_xscale("log")
    right.set_xlabel("keys")
    right.set_ylabel("MiB")
    right.set_title("Memory against key count")
    right.legend(fontsize=8)
    return _finish(fig, out_dir / "scale.png")


def _memory(data: dict[str, Any], out_dir: Path) -> Path | None:
    rows = data.get("sizes") or []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['value_bytes']} B values" for r in rows]
    width = 0.25
    for i, (field, label) in enumerate(
        (
            ("payload_per_entry", "payload"),
            ("accounted_per_entry", "cache's accounting"),
            ("rss_per_entry", "RSS growth"),
        )
    ):
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [r.get(field, 0) for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("bytes per cached entry")
    ax.set_title("Memory per cached entry")
    ax.legend()
    return _finish(fig, out_dir / "memory.png")


_PLOTS: dict[str, Callable[[dict[str, Any], Path], Path | None]] = {
    "hit": _hit,
    "write": _write,
    "fanout": _fanout,
    "memory": _memory,
    "scale": _scale,
}


def make_all(out_dir: Path, names: Collection[str] | None = None) -> list[Path]:
    """Draw every plot (of ``names``, default all) whose data is in ``out_dir``; return the PNG paths."""
    made = []
    for name, plot in _PLOTS.items():
        if names is not None and name not in names:
            continue
        data = _load(out_dir, name)
        if data is None:
            continue
        try:
            png = plot(data, out_dir)
        except (KeyError, TypeError, ValueError) as exc:  # a scenario changed its JSON: say so, keep going
            print(f"plots: skipped {name}: {exc!r}")
            continue
        if png is not None:
            made.append(png)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    for png in make_all(parser.parse_args().out):
        print(png)


if __name__ == "__main__":
    main()
