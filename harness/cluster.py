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

from .process import SidecarProcess
from .zookeeper import LocalZooKeeper

__all__ = ["main"]


ZK_PORT = 2181  # the README's ports: cachectl --zk 127.0.0.1:2181, curl 127.0.0.1:7070
SIDECAR_PORT = 7070  # sidecar-N listens on SIDECAR_PORT + N - 1
HOST = "127.0.0.1"


def port_taken(port: int, host: str = HOST) -> bool:
    """True if a listener holds ``host:port``, tested the way the servers bind it.

    ZooKeeper and aiohttp set ``SO_REUSEADDR`` before binding, so connections
    of a previous run left in TIME_WAIT do not stop them; only a socket that
    listens does.  A bind test without ``SO_REUSEADDR`` would fail on the
    former too (and moved the ports after every quick restart).
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def taken_port_message(ports: list[tuple[int, str, str]]) -> str | None:
    """One line for the first of ``(port, who, flag)`` that is taken, or None if all are free."""
    for port, who, flag in ports:
        if port_taken(port):
            return (
                f"dev cluster not started: {HOST}:{port} ({who}) is in use by another program "
                f"(see: ss -ltnp 'sport = :{port}'); stop it, or pick another port with {flag}"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    """Start the cluster and wait for Ctrl-C; returns the exit status."""
    parser = argparse.ArgumentParser(prog="scripts/dev.sh", description=__doc__)
    parser.add_argument("--sidecars", type=int, default=2, help="how many sidecars (default 2)")
    parser.add_argument("--dir", default=".local", help="where data and logs go (default .local)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument(
        "--zk-port", type=int, default=ZK_PORT, help=f"ZooKeeper port (default {ZK_PORT}; unused with ZKCACHE_ZK)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=SIDECAR_PORT,
        help=f"sidecar-1's port; sidecar-N gets PORT+N-1 (default {SIDECAR_PORT})",
    )
    args = parser.parse_args(argv)
    hosts = os.environ.get("ZKCACHE_ZK")
    wanted = [] if hosts else [(args.zk_port, "ZooKeeper", "--zk-port")]
    wanted += [(args.port + i, f"sidecar-{i + 1}", "--port") for i in range(args.sidecars)]
    taken = taken_port_message(wanted)
    if taken is not None:
        # Fail rather than move: the README's curl and cachectl lines name these ports.
        print(taken, file=sys.stderr)
        return 2

    base = Path(args.dir).resolve()
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping and not started:
            # Ctrl-C while ZooKeeper or a sidecar is still starting: stop waiting for it.
            stopping = True
            raise KeyboardInterrupt
        stopping = True

    started = False
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    zk: LocalZooKeeper | None = None
    sidecars: list[SidecarProcess] = []
    try:
        if not hosts:
            zk = LocalZooKeeper(base / "zookeeper", host=HOST, port=args.zk_port)
            print(f"starting ZooKeeper on {zk.hosts} (data in {zk.data_dir})", flush=True)
            zk.start()
            hosts = zk.hosts
        origin = f"sqlite:///{base / 'zkcache.db'}"
        for i in range(args.sidecars):
            sc = SidecarProcess(
                logs,
                f"sidecar-{i + 1}",
                {"port": args.port + i, "zk": hosts, "origin": origin, "namespace": args.namespace},
            )
            sidecars.append(sc)
            sc.start()
        started = True
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
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        if stopping:  # a sidecar that got the terminal's Ctrl-C too exited while we waited for it
            return 130
        print(f"dev cluster failed: {exc}", file=sys.stderr)
        return 1
    finally:
        # Stopping is bounded (SIGKILL after a timeout): another Ctrl-C must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
