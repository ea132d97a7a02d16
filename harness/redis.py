"""Real ``redis-server`` and ``redis-sentinel`` processes (Debian's packages) on 127.0.0.1.

Every server writes an append-only file with ``appendfsync always``, so that a
write Redis acknowledged survives a kill and restart (the checker compares
final values with what Redis holds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from .process import ServerProcess, die_with_parent, free_port
from .proxy import TcpProxy

__all__ = ["LocalRedis", "LocalSentinelGroup", "find_redis_server"]


def find_redis_server() -> str | None:
    """Path of ``redis-server`` (Debian's ``redis-server`` package), if installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def _client(host: str, port: int, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


class _Process(ServerProcess):
    """A redis-server (or Sentinel) child process with fault handles."""

    def __init__(self, data_dir: Path, port: int, config: str, sentinel: bool = False) -> None:
        self.data_dir = data_dir
        self.host = "127.0.0.1"
        self.port = port
        self.config = config
        self.sentinel = sentinel
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "redis.log"

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart on the same data) and wait until it answers PING."""
        server = find_redis_server()
        if server is None:
            raise RuntimeError("redis-server not found: apt-get install -y redis-server redis-sentinel")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.data_dir / "redis.conf"
        if not cfg.exists() or not self.sentinel:  # Sentinel rewrites its own config: keep it across restarts
            cfg.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir}\nlogfile {self.log_path}\n"
                "daemonize no\nprotected-mode no\n" + self.config
            )
        argv = [server, str(cfg)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis did not answer PING within {timeout:g}s:\n{self.log_tail()}")

    def answers(self) -> bool:
        """True if the server answers PING."""
        try:
            with _client(self.host, self.port, 0.5) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def client(self) -> redis.Redis:
        """A synchronous redis-py client of this process (close it, or use ``with``)."""
        return _client(self.host, self.port)


_DURABLE = 'appendonly yes\nappendfsync always\nsave ""\n'


class LocalRedis(_Process):
    """One standalone redis-server with an fsync-always append-only file."""

    def __init__(self, data_dir: str | Path, port: int | None = None, extra_config: str = "") -> None:
        super().__init__(Path(data_dir).resolve(), port or free_port(), _DURABLE + extra_config)

    @property
    def url(self) -> str:
        """The origin URL of database 0."""
        return f"redis://{self.address}/0"


class LocalSentinelGroup:
    """A primary, one replica and three Sentinels (quorum 2) watching service ``service``.

    The primary refuses writes unless a replica is connected
    (``min-replicas-to-write 1``), so that an old primary cut off from the
    rest cannot acknowledge anything either.  The replica replicates through
    :attr:`link`, a TCP proxy the test owns: black-holing it leaves writes
    on the primary alone, as a partition between the two would.
    """

    def __init__(self, base_dir: str | Path, service: str = "zkcache", down_after_ms: int = 1000) -> None:
        base = Path(base_dir).resolve()
        self.service = service
        primary_port = free_port()
        replica_cfg = "min-replicas-to-write 1\nmin-replicas-max-lag 10\n"
        self.primary = LocalRedis(base / "primary", primary_port, replica_cfg)
        self.link = TcpProxy("127.0.0.1", primary_port)
        self.link.start()
        self.replica = LocalRedis(base / "replica", None, replica_cfg + f"replicaof 127.0.0.1 {self.link.port}\n")
        self.servers = [self.primary, self.replica]
        self.sentinels = [
            _Process(
                base / f"sentinel{i + 1}",
                free_port(),
                f"sentinel monitor {service} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                # Sentinel re-points a replica replicating from another address
                # (the proxy) once failover-timeout has passed: longer than a test.
                f"sentinel failover-timeout {service} 120000\n"
                f"sentinel parallel-syncs {service} 1\n",
                sentinel=True,
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        """The origin URL through the Sentinels, database 0."""
        return f"redis+sentinel://{','.join(s.address for s in self.sentinels)}/{self.service}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start both servers and the Sentinels; return once the replica is in sync and every Sentinel sees it."""
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._replica_synced() and all(self._sentinel_sees_replica(s) for s in self.sentinels):
                return
            time.sleep(0.1)
        raise RuntimeError("the Sentinel group did not settle:\n" + self.primary.log_tail())

    def _replica_synced(self) -> bool:
        try:
            with self.replica.client() as r:
                return bool(r.info("replication").get("master_link_status") == "up")
        except (redis.RedisError, OSError):
            return False

    def _sentinel_sees_replica(self, sentinel: _Process) -> bool:
        try:
            with sentinel.client() as r:
                return int(r.sentinel_master(self.service).get("num-slaves", 0)) >= 1
        except (redis.RedisError, OSError):
            return False

    def current_primary(self) -> LocalRedis:
        """The server the first Sentinel names as primary now."""
        with self.sentinels[0].client() as r:
            _, port = r.sentinel_get_master_addr_by_name(self.service)
        for server in self.servers:
            if server.port == int(port):
                return server
        raise RuntimeError(f"Sentinel names an unknown primary on port {port}")

    def stop(self) -> None:
        """Stop every process."""
        for p in [*self.sentinels, *self.servers]:
            p.stop()
        self.link.stop()
