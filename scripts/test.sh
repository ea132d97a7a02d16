#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what is missing, then: lint, type check, tests against a real
# ZooKeeper and real sidecar processes, and a smoke run of the benchmarks
# (python -m bench --quick: it asserts nothing about timings, it only has to
# run; recovery and retention are left to full runs, see below). Extra
# arguments go to pytest; with any, the benchmark smoke is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
ensure_zookeeper
ensure_bench_tools
ensure_venv

echo ">> ruff" >&2
.venv/bin/ruff check sidecar cli tests bench
.venv/bin/ruff format --check sidecar cli tests bench
echo ">> mypy --strict" >&2
.venv/bin/mypy
echo ">> pytest" >&2
.venv/bin/python -m pytest -q -ra --durations=25 "$@"
if [ $# = 0 ]; then
  # Every benchmark but the two slowest (recovery's rolling restart and
  # retention's two ZooKeepers, 90 s together), to keep CI within its 15
  # minutes; run those with: python -m bench --quick --only recovery,retention
  echo ">> python -m bench --quick (smoke; results in .local/bench-quick)" >&2
  .venv/bin/python -m bench --quick --out .local/bench-quick --only hit,write,origins,fanout,memory,watches,scale
fi
