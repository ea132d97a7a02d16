#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what is missing, then: lint, type check, tests against a real
# ZooKeeper and real sidecar processes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
ensure_zookeeper
ensure_venv

echo ">> ruff" >&2
.venv/bin/ruff check sidecar cli tests bench
.venv/bin/ruff format --check sidecar cli tests bench
echo ">> mypy --strict" >&2
.venv/bin/mypy
echo ">> pytest" >&2
exec .venv/bin/python -m pytest -q -ra "$@"
