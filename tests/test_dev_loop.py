"""scripts/dev.sh's cluster (``python -m harness.cluster``): stable ports, a clean stop, a quick restart.

The README's lines (``cachectl --zk 127.0.0.1:2181``, ``curl 127.0.0.1:7070``)
only work if the cluster keeps its ports: a port held by a listener is one
clear line and a non-zero exit, never a silent move to another port; a port
whose last connections are still in TIME_WAIT (a quick Ctrl-C and restart) is
used as the servers themselves bind it, with SO_REUSEADDR.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from harness import free_port
from harness.cluster import port_taken, taken_port_message

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKCACHE_") or k == "ZKCACHE_ZKSERVER"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _cluster(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cluster", *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _leave_in_time_wait(port: int) -> None:
    """Leave a connection whose local port is ``port`` in TIME_WAIT, as a stopped server does."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: it is the one left in TIME_WAIT
        client.recv(1)
        client.close()


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("who", ["ZooKeeper", "sidecar-1"])
def test_a_port_held_by_a_listener_is_one_clear_line_and_no_start(tmp_path: Path, held_port: int, who: str) -> None:
    other = free_port()
    zk_port, sc_port = (held_port, other) if who == "ZooKeeper" else (other, held_port)
    flag = "--zk-port" if who == "ZooKeeper" else "--port"
    proc = _cluster(tmp_path, "--dir", str(tmp_path / "local"), "--zk-port", str(zk_port), "--port", str(sc_port))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert f"127.0.0.1:{held_port} ({who}) is in use" in lines[0] and flag in lines[0], out
    assert not (tmp_path / "local").exists(), "nothing is started or created when a port is taken"


def test_a_port_in_time_wait_counts_as_free(tmp_path: Path) -> None:
    port = free_port()
    _leave_in_time_wait(port)
    with socket.socket() as plain, pytest.raises(OSError):  # the old check: it moved the port
        plain.bind(("127.0.0.1", port))
    assert not port_taken(port)
    assert taken_port_message([(port, "ZooKeeper", "--zk-port")]) is None


class _Output:
    """The cluster's output, read on a thread so waiting for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stdout: IO[str]) -> None:
        with stdout:
            for line in stdout:
                self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return "".join(self.seen)
        raise AssertionError(f"no {text!r} within {timeout:g}s:\n{''.join(self.seen)}")


def _ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
        return bool(resp.status == 200)


@pytest.mark.slow
def test_ctrl_c_and_a_quick_restart_keep_the_same_ports(tmp_path: Path) -> None:
    zk_port, sc_port = free_port(), free_port()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for run in (1, 2):
        if run == 1:  # the second run finds whatever the first one's stop left in TIME_WAIT
            _leave_in_time_wait(zk_port)
            _leave_in_time_wait(sc_port)
        proc = _cluster(
            cwd, "--dir", str(tmp_path / "local"), "--sidecars", "1", "--zk-port", str(zk_port), "--port", str(sc_port)
        )
        out = _Output(proc)
        try:
            banner = out.wait_for("Ctrl-C stops everything", 90)
            assert f"ZooKeeper 127.0.0.1:{zk_port}," in banner, banner
            assert f"sidecar-1: http://127.0.0.1:{sc_port}\n" in banner, banner
            assert _ready(sc_port)
            proc.send_signal(signal.SIGINT)
            out.wait_for("stopped every process this script started", 40)
            assert proc.wait(10) == 0, "".join(out.seen)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            out.reader.join(10)  # the pipe is closed once the cluster is gone
        assert not port_taken(zk_port) and not port_taken(sc_port), f"run {run} left a listener behind"
    assert list(cwd.iterdir()) == [], "ZooKeeper and the sidecars write only under --dir"
