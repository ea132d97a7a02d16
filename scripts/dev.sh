#!/usr/bin/env bash
# Run zk-cache-sidecar on this machine: a local ZooKeeper (data in .local/)
# and two sidecars on the embedded SQLite origin. Foreground; Ctrl-C stops all.
# Set ZKCACHE_ZK=host:port to use a ZooKeeper you already run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
[ -n "${ZKCACHE_ZK:-}" ] || ensure_zookeeper
ensure_venv
exec .venv/bin/python -m harness.cluster "$@"
