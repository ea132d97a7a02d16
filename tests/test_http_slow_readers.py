"""Clients that send a request and never read the answer (found by a hostile review).

1. Memory: a batch response was released from max_inflight_bytes when the
   handler returned, before aiohttp wrote it; a client that does not read
   left it in the transport's buffer: 30 such clients grew RSS by 320 MiB
   against a 16 MiB budget.  Now the budget is held until the bytes left.
2. DoS: such a connection had a request "in progress" forever (aiohttp has
   no write timeout and arms no idle timer during a request), so it was
   never idle, never closed, and at max_connections every newcomer,
   /healthz included, got 503.  Now a send stalled for http_body_timeout
   aborts the connection.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from harness import SidecarProcess
from tests.conftest import SidecarFactory

N = 30


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError


def raw(method: str, target: str, body: bytes = b"", close: bool = True) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + ("Connection: close\r\n" if close else "")
    head += f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
    return head.encode() + body


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


pytestmark = pytest.mark.slow


@pytest.fixture
def sidecar(sidecars: SidecarFactory) -> SidecarProcess:
    return sidecars(
        "slow",
        zk_session_timeout="10s",
        log_level="info",
        http_idle_timeout="2s",
        http_body_timeout="3s",
        max_connections=str(N),
        max_inflight_bytes="16MiB",
    )


def test_clients_that_never_read_hold_neither_memory_nor_connections(sidecar: SidecarProcess) -> None:
    keys = [f"big/{i}" for i in range(4)]
    for k in keys:
        assert exchange(sidecar.port, raw("PUT", f"/v1/keys/{k}", b"x" * (1024 * 1024 - 100))).startswith(
            b"HTTP/1.1 200"
        )
    body = json.dumps({"keys": keys}).encode()
    assert exchange(sidecar.port, raw("POST", "/v1/batch/get", body)).startswith(b"HTTP/1.1 200")
    assert sidecar.proc is not None
    before = rss(sidecar.proc.pid)
    socks = []
    for _ in range(N):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        s.connect(("127.0.0.1", sidecar.port))
        s.sendall(raw("POST", "/v1/batch/get", body, close=False))
        socks.append(s)
    try:
        time.sleep(5)  # > the send timeout (http_body_timeout, 3 s): nothing to wait on from outside
        grown = rss(sidecar.proc.pid) - before
        probe = exchange(sidecar.port, raw("GET", "/healthz"))
        open_still = 0
        for s in socks:
            s.setblocking(False)
            try:
                s.recv(1, socket.MSG_PEEK)
                open_still += 1
            except BlockingIOError:
                open_still += 1
            except OSError:
                pass
        print(f"RSS grew {grown / 2**20:.0f} MiB; {open_still}/{N} stuck connections open; /healthz: {probe[:40]!r}")
        assert probe.startswith(b"HTTP/1.1 200"), (
            f"/healthz refused while {open_still} non-reading clients hold every slot"
        )
        assert grown < 32 * 2**20, f"{N} non-reading batch clients grew RSS by {grown / 2**20:.0f} MiB (budget 16 MiB)"
    finally:
        for s in socks:
            s.close()
