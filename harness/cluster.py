"""``python -m harness.cluster``: a local ZooKeeper and N sidecars, in the foreground.

This is what ``scripts/dev.sh`` runs.  Everything lives under ``.local/``
(ZooKeeper's data, the SQLite origin, logs); Ctrl-C stops every process it
started.  With ``ZKCACHE_ZK`` set, that ZooKeeper is used and none is started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from .process import SidecarProcess, free_port
from .zookeeper import LocalZooKeeper

__all__ = ["main"]


def _port(preferred: int) -> int:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", preferred))
        return preferred
    except OSError:
        return free_port()


def main(argv: list[str] | None = None) -> int:
    """Start the cluster and wait for Ctrl-C; returns the exit status."""
    parser = argparse.ArgumentParser(prog="scripts/dev.sh", description=__doc__)
    parser.add_argument("--sidecars", type=int, default=2, help="how many sidecars (default 2)")
    parser.add_argument("--dir", default=".local", help="where data and logs go (default .local)")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args(argv)

    base = Path(args.dir).resolve()
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    zk: LocalZooKeeper | None = None
    hosts = os.environ.get("ZKCACHE_ZK")
    sidecars: list[SidecarProcess] = []
    try:
        if not hosts:
            zk = LocalZooKeeper(base / "zookeeper", port=_port(2181))
            print(f"starting ZooKeeper on {zk.hosts} (data in {zk.data_dir})", flush=True)
            zk.start()
            hosts = zk.hosts
        origin = f"sqlite:///{base / 'zkcache.db'}"
        for i in range(args.sidecars):
            sc = SidecarProcess(
                logs,
                f"sidecar-{i + 1}",
                {"port": _port(7070 + i), "zk": hosts, "origin": origin, "namespace": args.namespace},
            )
            sidecars.append(sc)
            sc.start()
        _print_banner(hosts, args.namespace, sidecars, logs)
        while not stopping:
            for sc in sidecars:
                if sc.proc is not None and sc.proc.poll() is not None:
                    print(f"{sc.name} exited with {sc.proc.returncode}:\n{sc.log_tail()}", file=sys.stderr)
                    return 1
            if zk is not None and zk.proc is not None and zk.proc.poll() is not None:
                print(f"ZooKeeper exited:\n{zk.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"dev cluster failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping...", flush=True)
        for sc in sidecars:
            sc.stop()
        if zk is not None:
            zk.stop()
        print("stopped every process this script started", flush=True)


def _print_banner(hosts: str, namespace: str, sidecars: list[SidecarProcess], logs: Path) -> None:
    a = sidecars[0].url
    b = sidecars[-1].url
    env = f"ZKCACHE_ZK={hosts} ZKCACHE_NAMESPACE={namespace}"
    print(
        f"""
zk-cache-sidecar is running: ZooKeeper {hosts}, namespace {namespace!r}
{chr(10).join(f"  {sc.name}: {sc.url}" for sc in sidecars)}
logs: {logs}

Try it (write through one sidecar, read through the other):
  curl -i -X PUT {a}/v1/keys/user/42 -H 'Content-Type: application/json' -d '{{"name":"ada"}}'
  curl -i {b}/v1/keys/user/42        # X-Cache: miss, then hit
  curl -i -X PUT {a}/v1/keys/user/42 -H 'Content-Type: application/json' -d '{{"name":"grace"}}'
  curl -i {b}/v1/keys/user/42        # the new value: the write invalidated it everywhere
  curl -i -X POST {a}/v1/invalidate -d '{{"prefixes":["user/"]}}'
  curl -s {b}/v1/stats
  {env} .venv/bin/cachectl members
  {env} .venv/bin/cachectl invalidate user/42

Ctrl-C stops everything.""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
