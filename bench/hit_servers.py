"""Reference servers for ``bench.hit``: the same bytes as a sidecar hit, with less in between.

    python -m bench.hit_servers aiohttp --port P --body-file F --headers '[["X-Cache","hit"], ...]'
    python -m bench.hit_servers raw     --port P --body-file F --headers '[...]' [--server-header S]

``aiohttp``: one handler for ``GET /v1/keys/{key:.+}``, set up like the sidecar's
app (``AppRunner`` without access log, ``TCPSite``), no middleware, no cache
lookup: what aiohttp itself costs.

``raw``: an ``asyncio.Protocol`` that splits the byte stream on the blank line
ending each request and answers every ``GET /v1/keys/...`` with one prebuilt
response (pipelined requests in one write); the date is refreshed once a second,
as aiohttp does.  No HTTP parser: the limit for Python on this loop.

Both run on uvloop when it is installed and stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import cast

__all__ = ["main", "serve_aiohttp", "serve_raw"]


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_aiohttp(port: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    """Bare aiohttp: one route, one prebuilt header dict, the sidecar's runner settings."""
    from aiohttp import web

    fixed = dict(headers)

    async def get_key(request: web.Request) -> web.StreamResponse:
        # A new dict per response, as the sidecar builds one per hit.
        return web.Response(body=body, headers={**fixed})

    app = web.Application()
    app.router.add_get("/v1/keys/{key:.+}", get_key, allow_head=False)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await _until_signalled()
    finally:
        await runner.cleanup()


class _Prebuilt:
    """The full response bytes, rebuilt when the date changes (once a second)."""

    def __init__(self, body: bytes, headers: list[tuple[str, str]], server: str) -> None:
        self.body, self.headers, self.server = body, headers, server
        self.response = b""
        self.not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        self.refresh()

    def refresh(self) -> None:
        lines = [f"{k}: {v}" for k, v in self.headers]
        lines += [f"Content-Length: {len(self.body)}", f"Date: {formatdate(usegmt=True)}", f"Server: {self.server}"]
        self.response = ("HTTP/1.1 200 OK\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + self.body


class _RawHttp(asyncio.Protocol):
    def __init__(self, prebuilt: _Prebuilt) -> None:
        self.prebuilt = prebuilt
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, though it is one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        start = 0
        while (end := buf.find(b"\r\n\r\n", start)) >= 0:
            ok = buf.startswith(b"GET /v1/keys/", start)
            out.append(self.prebuilt.response if ok else self.prebuilt.not_found)
            start = end + 4
        self.buf = buf[start:]
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


async def serve_raw(port: int, body: bytes, headers: list[tuple[str, str]], server: str) -> None:
    """A keep-alive HTTP/1.1 responder with no parser: the Python-on-this-loop limit."""
    loop = asyncio.get_running_loop()
    prebuilt = _Prebuilt(body, headers, server)

    def tick() -> None:
        prebuilt.refresh()
        loop.call_later(1.0, tick)

    loop.call_later(1.0, tick)
    srv = await loop.create_server(lambda: _RawHttp(prebuilt), "127.0.0.1", port, reuse_address=True)
    try:
        await _until_signalled()
    finally:
        srv.close()


def _runner() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run  # type: ignore[return-value]
    return uvloop.run  # type: ignore[return-value]


def main() -> None:
    """Parse the command line and serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["aiohttp", "raw"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--headers", required=True, help="JSON list of [name, value] pairs, in order")
    parser.add_argument("--server-header", default="Python/3 raw-protocol", help="raw only: the Server header value")
    args = parser.parse_args()
    body = args.body_file.read_bytes()
    headers = [(str(k), str(v)) for k, v in json.loads(args.headers)]
    run = _runner()
    if args.kind == "aiohttp":
        run(serve_aiohttp(args.port, body, headers))
    else:
        run(serve_raw(args.port, body, headers, args.server_header))


if __name__ == "__main__":
    main()
