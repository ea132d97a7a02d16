"""A real ``cache-sidecar`` process, started and stopped by its owner."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "SidecarProcess", "die_with_parent", "free_port"]


def die_with_parent() -> Callable[[], None] | None:
    """The ``preexec_fn`` for a child that must not outlive its owner (Linux), or None.

    A test run that is killed must not leave ZooKeepers and sidecars behind, so
    the child asks for SIGTERM when its parent dies; the setting survives exec,
    so it also covers the JVM that zkServer.sh execs.  Linux sends it when the
    *thread* that forked the child ends, not the process: a child started from
    a worker thread (``asyncio.to_thread``) would be stopped as soon as that
    thread is reaped.  Such children go without it.
    """
    return _set_death_signal if threading.current_thread() is threading.main_thread() else None


def _set_death_signal() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: best effort


_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server child process the caller owns, with the fault handles tests use.

    Subclasses start ``proc`` and write their log to ``log_path``.
    """

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; waits for the exit."""
        if self.proc is None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash) and wait for the exit."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class SidecarProcess:
    """``python -m sidecar`` with the given settings, on a free loopback port."""

    def __init__(self, log_dir: str | Path, name: str, settings: dict[str, Any]) -> None:
        self.name = name
        self.port = int(settings.pop("port", 0)) or free_port()
        self.settings = {"listen": f"127.0.0.1:{self.port}", "member_id": name, **settings}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The command line that starts this sidecar."""
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in self.settings.items()]
        return [sys.executable, "-m", "sidecar", *flags]

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> None:
        """Start the process; by default wait until ``/readyz`` answers 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZKCACHE_")}
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=die_with_parent(),
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0, ready: bool = True) -> None:
        """Wait until ``/readyz`` is 200 (or, with ``ready=False``, not 200)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_ready() == ready:
                return
            time.sleep(0.05)
        state = "ready" if ready else "not ready"
        raise TimeoutError(f"{self.name} not {state} within {timeout:g}s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        """True if ``/readyz`` answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``."""
        with urllib.request.urlopen(self.url + "/v1/stats", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def setting_up(self, *, other_than_session: str | None = None) -> bool:
        """Connected to ZooKeeper but not ready yet: its session set-up is under way.

        ``other_than_session``: only in a session other than this one (``/v1/stats``'s ``0x...``).
        """
        zk = self.stats()["zookeeper"]
        return zk["state"] == "connected" and not zk["ready"] and zk["session"] != other_than_session

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        self.resume()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash; its ZooKeeper session lives on until it expires."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP the process (a long GC pause, a frozen VM)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """The end of this sidecar's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
