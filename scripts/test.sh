#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what is missing, then: lint, type check, tests against a real
# ZooKeeper and real sidecar processes, and a smoke run of the benchmarks
# (python -m bench --quick: it asserts nothing about timings, it only has to
# run; the slowest are left to full runs, see below). Extra
# arguments go to pytest; with any, the benchmark smoke is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
ensure_zookeeper
ensure_bench_tools
ensure_venv test

echo ">> ruff" >&2
.venv/bin/ruff check sidecar cli harness tests bench examples
.venv/bin/ruff format --check sidecar cli harness tests bench examples
echo ">> mypy --strict" >&2
.venv/bin/mypy
echo ">> pytest" >&2
# Two workers, a test file each at a time (module fixtures stay in one
# process); ZKCACHE_TEST_WORKERS=0 runs them in this process, one by one.
.venv/bin/python -m pytest -q -ra --durations=25 -n "${ZKCACHE_TEST_WORKERS:-2}" --dist loadfile "$@"
if [ $# = 0 ]; then
  # The quick benchmarks, as a smoke run (each under 25 s); CI has 15
  # minutes in all and the tests take about 7. The others (write, memory,
  # recovery, retention, scale: 3 min together) run in full runs, or:
  # python -m bench --quick --only write,memory,recovery,retention,scale
  echo ">> python -m bench --quick (smoke; results in .local/bench-quick)" >&2
  .venv/bin/python -m bench --quick --out .local/bench-quick --only hit,batch,origins,fanout,watches
fi
