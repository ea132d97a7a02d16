"""A real ZooKeeper server (Debian's ``zookeeper`` package) run as a child process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from sidecar.coordination.health import four_letter

from .process import ServerProcess, die_with_parent, free_port

__all__ = ["LocalEnsemble", "LocalZooKeeper", "find_zkserver"]

_CANDIDATES = ("/usr/share/zookeeper/bin/zkServer.sh", "/opt/zookeeper/bin/zkServer.sh")


def find_zkserver() -> str | None:
    """Path of ``zkServer.sh``: ``$ZKCACHE_ZKSERVER``, Debian's, or on ``PATH``."""
    explicit = os.environ.get("ZKCACHE_ZKSERVER")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return shutil.which("zkServer.sh")


class LocalZooKeeper(ServerProcess):
    """One standalone ZooKeeper on 127.0.0.1 with its own data dir.

    ``stop``/``kill``/``pause``/``resume`` are the fault-injection handles the
    tests use; ``start`` again on the same data dir restarts the same server
    (sessions survive a restart shorter than their timeout).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        tick_ms: int = 500,
        min_session_ms: int = 1000,
        max_session_ms: int = 60000,
        extra_config: str = "",
        myid: int | None = None,
        heap: str = "256m",
        tls_dir: str | Path | None = None,
        client_auth: str = "need",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.heap = heap  # JVM -Xmx: enough for tests; the scale benchmark needs more
        self.host = host
        self.port = port or free_port(host)
        self.tick_ms = tick_ms
        self.min_session_ms = min_session_ms
        self.max_session_ms = max_session_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "zookeeper.log"
        self.extra_config = extra_config
        self.myid = myid
        # TLS: a secure client port beside the plaintext one (which the
        # harness keeps for its own four-letter words). tls_dir holds
        # server.pem (PKCS#8 key + certificate chain, one file) and ca.pem
        # (the CA that client certificates must chain to).
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.secure_port = free_port(host) if tls_dir is not None else None
        self.client_auth = client_auth

    @property
    def hosts(self) -> str:
        """The connect string (no chroot)."""
        return f"{self.host}:{self.port}"

    @property
    def secure_hosts(self) -> str:
        """The connect string of the TLS port."""
        assert self.secure_port is not None, "started without tls_dir"
        return f"{self.host}:{self.secure_port}"

    def _tls_config(self) -> str:
        if self.tls_dir is None:
            return ""
        # Netty is the only connection factory that speaks TLS (NIO refuses to start).
        return (
            f"secureClientPort={self.secure_port}\n"
            f"secureClientPortAddress={self.host}\n"
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
            f"ssl.keyStore.location={self.tls_dir / 'server.pem'}\n"
            "ssl.keyStore.type=PEM\n"
            f"ssl.trustStore.location={self.tls_dir / 'ca.pem'}\n"
            "ssl.trustStore.type=PEM\n"
            f"ssl.clientAuth={self.client_auth}\n"
        )

    def _write_config(self) -> Path:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.data_dir / "zoo.cfg"
        cfg.write_text(
            f"tickTime={self.tick_ms}\n"
            f"dataDir={self.data_dir / 'data'}\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.host}\n"
            f"minSessionTimeout={self.min_session_ms}\n"
            f"maxSessionTimeout={self.max_session_ms}\n"
            "maxClientCnxns=0\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=*\n"
            "autopurge.purgeInterval=0\n" + self._tls_config() + self.extra_config
        )
        if self.myid is not None:
            (self.data_dir / "data" / "myid").write_text(f"{self.myid}\n")
        return cfg

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it answers ``ruok`` with ``imok``."""
        self.launch()
        self.wait_serving(timeout)

    def launch(self) -> None:
        """Start the JVM without waiting (an ensemble starts its servers side by side)."""
        script = find_zkserver()
        if script is None:
            raise RuntimeError(
                "zkServer.sh not found: install Debian's 'zookeeper' package "
                "(apt-get install -y zookeeper) or set ZKCACHE_ZKSERVER"
            )
        cfg = self._write_config()
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        # Every file the JVM writes goes under data_dir: zkServer.sh asks for a
        # heap dump on OutOfMemoryError (java_pid<pid>.hprof, hundreds of MB)
        # and a crash writes hs_err_pid<pid>.log, both into the working
        # directory unless told otherwise; jcmd/jmap leave .attach_pid<pid>
        # there too. Debian's zkEnv.sh overrides ZOO_LOG_DIR with
        # /var/log/zookeeper, so the log dir is also set as a property (the
        # last -D wins; JVMFLAGS come after the script's own). The paths are
        # relative to the working directory, data_dir: the script splits
        # JVMFLAGS on spaces, which a checkout's path may hold.
        jvm = (
            f"-Xmx{self.heap} -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
            " -XX:HeapDumpPath=logs -XX:ErrorFile=logs/hs_err_pid%p.log -Dzookeeper.log.dir=logs"
        )
        if self.tls_dir is not None:
            # Debian's zookeeper.jar lists every Netty jar it needs in its
            # manifest but netty-codec; without it every connection fails
            # (NoClassDefFoundError). The launcher takes the last -cp.
            jvm += " -cp /etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/netty-codec.jar"
        env = dict(os.environ, ZOO_LOG_DIR=str(logs), ZOO_LOG4J_PROP="INFO,CONSOLE", JVMFLAGS=jvm)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [script, "start-foreground", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.data_dir,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait until the launched server answers ``ruok`` with ``imok`` (and binds its TLS port)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_serving() and self._secure_port_bound():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"ZooKeeper did not answer ruok within {timeout:g}s:\n{self.log_tail()}")

    def mode(self) -> str | None:
        """``standalone``, ``leader`` or ``follower`` from ``srvr``; None if not serving."""
        try:
            for line in four_letter(self.host, self.port, "srvr", 0.5).splitlines():
                if line.startswith("Mode:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def mntr(self, timeout: float = 2.0) -> dict[str, str]:
        """ZooKeeper's ``mntr`` counters (``zk_watch_count``, ``zk_packets_received``...) by name."""
        out: dict[str, str] = {}
        for line in four_letter(self.host, self.port, "mntr", timeout).splitlines():
            name, sep, value = line.partition("\t")
            if sep:
                out[name.strip()] = value.strip()
        return out

    def watched_paths(self, session_id: int) -> set[str]:
        """The paths this server holds a watch on for session ``session_id`` (``wchc``)."""
        session = f"0x{session_id:x}"
        paths: set[str] = set()
        current = None
        for line in four_letter(self.host, self.port, "wchc", 2.0).splitlines():
            if line.startswith("0x"):
                current = line.strip()
            elif current == session and line.strip():
                paths.add(line.strip())
        return paths

    def _secure_port_bound(self) -> bool:
        # The secure port is bound after the plaintext one, once the database is loaded.
        if self.secure_port is None:
            return True
        try:
            socket.create_connection((self.host, self.secure_port), 0.5).close()
            return True
        except OSError:
            return False

    def is_serving(self) -> bool:
        """True if the server answers ``ruok`` with ``imok``."""
        try:
            return four_letter(self.host, self.port, "ruok", 0.5) == "imok"
        except OSError:
            return False


class LocalEnsemble:
    """A quorum of ZooKeeper servers on 127.0.0.1 (default 3), each its own process."""

    def __init__(self, base_dir: str | Path, size: int = 3, *, tick_ms: int = 500, max_session_ms: int = 60000) -> None:
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        peers = "".join(f"server.{i + 1}=127.0.0.1:{peer}:{election}\n" for i, (_, peer, election) in enumerate(ports))
        extra = "initLimit=10\nsyncLimit=5\n" + peers
        self.servers = [
            LocalZooKeeper(
                Path(base_dir) / f"zk{i + 1}",
                port=client,
                tick_ms=tick_ms,
                max_session_ms=max_session_ms,
                extra_config=extra,
                myid=i + 1,
            )
            for i, (client, _, _) in enumerate(ports)
        ]

    @property
    def hosts(self) -> str:
        """Connect string of every server."""
        return ",".join(s.hosts for s in self.servers)

    def start(self, timeout: float = 90.0) -> None:
        """Start every server side by side; return once one leads and the others follow."""
        for server in self.servers:
            server.launch()
        for server in self.servers:
            server.wait_serving(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            modes = sorted(str(s.mode()) for s in self.servers)
            if modes.count("leader") == 1 and modes.count("follower") == len(self.servers) - 1:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no quorum within {timeout:g}s: {[s.mode() for s in self.servers]}")

    def leader(self) -> LocalZooKeeper:
        """The server that currently leads."""
        for server in self.servers:
            if server.proc is not None and server.mode() == "leader":
                return server
        raise RuntimeError("no leader")

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers:
            server.stop()
