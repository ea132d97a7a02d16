"""HTTP for the benchmarks: a raw keep-alive HTTP/1.1 client, one-off requests, sequential GETs.

aiohttp's client spends a few hundred microseconds of CPU per request; for
sequential latency samples and back-to-back polls that is noise on every
figure, so :class:`RawConn` writes requests as bytes and parses answers by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import summary

__all__ = [
    "RawConn",
    "RawResponse",
    "Sequential",
    "http_request",
    "key_path",
    "raw_response",
    "read_response",
    "sequential_gets",
    "server_timing",
]


def key_path(key: str) -> str:
    """The API path of a key (bench keys need no escaping)."""
    return f"/v1/keys/{key}"


def server_timing(header: str) -> dict[str, float]:
    """``lock;dur=1.2, check;dur=0.1`` -> ``{"lock": 1.2, "check": 0.1}`` (milliseconds)."""
    phases: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            k, _, v = param.strip().partition("=")
            if k == "dur" and name:
                phases[name] = float(v)
    return phases


# -- blocking, one at a time ------------------------------------------------------
def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request on a fresh connection: status, headers in order, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def raw_response(port: int, path: str) -> bytes:
    """The exact bytes of one keep-alive ``GET`` response (as wrk sends it), headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return read_response(sock, bytearray())[0]


def read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytearray]:
    """One response from a blocking socket: headers up to the blank line, then Content-Length bytes.

    Returns the response and whatever followed it (for pipelined reads).
    """
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        buf += chunk
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", bytes(buf[:end]))
    total = end + 4 + (int(m.group(1)) if m else 0)
    while len(buf) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        buf += chunk
    return bytes(buf[:total]), buf[total:]


# -- asyncio, keep-alive ------------------------------------------------------------
@dataclass
class RawResponse:
    """Status, headers (lower-case names) and body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes


class RawConn:
    """One keep-alive HTTP/1.1 connection with the least client work per request.

    Answers are read by Content-Length or chunked (aiohttp's server sends
    nothing else).
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.timeout = timeout  # per response: a hung sidecar must not hang the benchmark
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> RawConn:
        """Connect (TCP_NODELAY: every request is one small write)."""
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Write one request (no await: the bytes are handed to the transport now)."""
        assert self._writer is not None, "not open"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    async def receive(self) -> RawResponse:
        """Read one response."""
        async with asyncio.timeout(self.timeout):
            return await self._receive()

    async def _receive(self) -> RawResponse:
        reader = self._reader
        assert reader is not None, "not open"
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            body = b"".join(parts)
        else:
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        return RawResponse(status, headers, body)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> RawResponse:
        """Send one request and read its response."""
        self.send(method, path, body, headers)
        return await self.receive()


@dataclass
class Sequential:
    """Per-request samples of a sequential run."""

    latency: list[float] = field(default_factory=list)  # ms, request written -> response read
    outside: list[float] = field(default_factory=list)  # ms, latency minus the sum of Server-Timing phases
    phases: dict[str, list[float]] = field(default_factory=dict)  # Server-Timing, ms
    statuses: Counter[int] = field(default_factory=Counter)
    x_cache: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        """Samples and summaries."""
        return {
            "latency_ms": self.latency,
            "latency": summary(self.latency),
            "phases_ms": self.phases,
            "outside_phases_ms": self.outside,
            "phases": {name: summary(v) for name, v in self.phases.items()},
            "statuses": dict(self.statuses),
            "x_cache": dict(self.x_cache),
        }


async def sequential_gets(port: int, keys: Sequence[str], deadline: float) -> Sequential:
    """GET each key once, back to back on one keep-alive connection (until ``deadline``, monotonic)."""
    out = Sequential()
    conn = await RawConn(port).open()
    try:
        for key in keys:
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            resp = await conn.request("GET", key_path(key))
            out.latency.append((time.perf_counter() - t) * 1000)
            out.statuses[resp.status] += 1
            out.x_cache[resp.headers.get("x-cache", "-")] += 1
    finally:
        await conn.close()
    return out
