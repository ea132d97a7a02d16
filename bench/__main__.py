"""The benchmark suite: every scenario, one after the other, in one run.

    .venv/bin/python -m bench [--quick] [--out bench/results] [--only hit,write]

Each scenario starts what it measures (ZooKeeper, sidecars, redis-server, bare
servers), measures, stops it all, and returns a Markdown section; comparisons
are ratios measured in the same run.  The sections go to ``<out>/results.md``
with the machine's description, the raw figures to ``<out>/<scenario>.json``
(made by a run, not committed) and the plots to ``<out>/*.png``.  ``--quick`` is the smoke run CI makes: it
runs everything briefly and asserts nothing about timings.

Run it on an idle machine: scenarios pin servers and load generators to
different cores, and anything else running skews every figure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench import common

# In the order they run: the hit path first, on a machine nothing else has warmed.
SCENARIOS = ["hit", "batch", "write", "origins", "fanout", "memory", "watches", "recovery", "scale", "retention"]


def machine() -> str:
    """One line describing where the figures come from."""
    m = common.machine()
    loop = "uvloop" if m["uvloop_installed"] else "asyncio"
    return f"{m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, {loop}, commit {m['commit']}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: every scenario, briefly (CI)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where results go")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    args.out.mkdir(parents=True, exist_ok=True)

    command = (
        "python -m bench"
        + (" --quick" if args.quick else "")
        + (f" --only {','.join(chosen)}" if chosen != SCENARIOS else "")
    )
    sections = [
        "# zk-cache-sidecar benchmarks\n",
        f"`{command}` on {time.strftime('%Y-%m-%d')}: {machine()}.\n",
    ]
    if chosen != SCENARIOS:
        sections.append(
            f"This run measured {', '.join(chosen)}; the other sections are from the run that wrote them.\n"
        )
    started = time.monotonic()
    for name in SCENARIOS:
        if name not in chosen:
            # A partial run keeps the other scenarios' last sections (each names its own commit and date).
            previous = args.out / f"{name}.md"
            if previous.exists():
                sections.append(previous.read_text())
            continue
        print(f">> bench: {name}", file=sys.stderr, flush=True)
        began = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        sections.append(module.run(quick=args.quick, out_dir=args.out))
        print(f">> bench: {name} took {time.monotonic() - began:.0f}s", file=sys.stderr, flush=True)

    from bench import plots

    # Plots are drawn from the JSON this run wrote; a scenario left out keeps the
    # plot of the run that measured it (its raw JSON is not committed).
    made = {png.name for png in plots.make_all(args.out, chosen)}
    for name in SCENARIOS:
        png = args.out / f"{name}.png"
        if png.name in made or (name not in chosen and png.exists()):
            sections.append(f"![{png.stem}]({png.name})\n")
    report = "\n".join(sections)
    (args.out / "results.md").write_text(report)
    print(report)
    print(f">> bench: all done in {time.monotonic() - started:.0f}s; {args.out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
