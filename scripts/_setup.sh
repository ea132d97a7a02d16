# Sourced by dev.sh and test.sh: install what is missing, idempotently.
# - ZooKeeper from Debian's 'zookeeper' package, unless one is installed
#   (zkServer.sh found) or configured (ZKCACHE_ZK / ZKCACHE_ZKSERVER set);
# - wrk and redis-server from Debian (the Redis origin's tests and the benchmarks;
#   Sentinel is redis-server --sentinel);
# - a project virtualenv in .venv: `ensure_venv` installs what running needs
#   (dev.sh), `ensure_venv test` adds the test, lint and benchmark tools.

_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

have_zkserver() {
  [ -n "${ZKCACHE_ZKSERVER:-}" ] && [ -x "${ZKCACHE_ZKSERVER}" ] && return 0
  [ -x /usr/share/zookeeper/bin/zkServer.sh ] && return 0
  command -v zkServer.sh >/dev/null 2>&1
}

ensure_zookeeper() {
  if have_zkserver; then return 0; fi
  echo ">> installing ZooKeeper (Debian package 'zookeeper')" >&2
  _sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive _sudo apt-get install -y -qq zookeeper >/dev/null
  have_zkserver || { echo "ZooKeeper install failed: zkServer.sh not found" >&2; return 1; }
}

ensure_bench_tools() {
  local missing=()
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
  [ ${#missing[@]} = 0 ] && return 0
  echo ">> installing ${missing[*]} (Debian) for the benchmarks" >&2
  _sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive _sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {
  local extras=${1:-} target=.
  [ -n "$extras" ] && target=".[$extras]"
  local stamp=.venv/.installed-${extras:-run}-$(sha1sum pyproject.toml | cut -c1-12)
  if [ ! -x .venv/bin/python ]; then
    echo ">> creating .venv" >&2
    python3 -m venv .venv
  fi
  if [ ! -e "$stamp" ]; then
    echo ">> installing Python dependencies into .venv (log: .venv/pip.log)" >&2
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e "$target" >.venv/pip.log 2>&1; then
      tail -30 .venv/pip.log >&2
      echo "pip install failed; full log in .venv/pip.log" >&2
      return 1
    fi
    # A test install holds everything a plain one does.
    rm -f .venv/.installed-*
    touch "$stamp"
    [ -z "$extras" ] || touch ".venv/.installed-run-${stamp##*-}"
  fi
}
