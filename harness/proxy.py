"""A TCP proxy on loopback that a test owns: pass traffic, or cut it.

Put it between one sidecar and ZooKeeper to partition that sidecar alone
while others stay connected.  It runs its own event loop in a thread, so the
test may block (poll a process, sleep) without stalling the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``.

    Faults: :meth:`cut` (reset and refuse: a crash or a firewall REJECT),
    :meth:`blackhole` (connections stay open, bytes vanish: a firewall DROP or
    a hung peer, which only timeouts reveal), :meth:`delay` (added latency per
    chunk, order kept).  :meth:`heal` restores plain forwarding.

    ``observe(connection, to_target, data)``, if given, sees every chunk once it
    is forwarded, on the proxy's thread: ``connection`` numbers the accepted
    connections from 1, ``to_target`` is the direction (the benchmarks decode
    ZooKeeper's protocol with it).
    """

    def __init__(
        self, target_host: str, target_port: int, observe: Callable[[int, bool, bytes], None] | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self.observe = observe
        self.port = 0
        self.accepting = True
        self.dropping = False
        self.latency = 0.0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` to give the client instead of the target."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        """``with TcpProxy(host, port) as proxy:`` starts it, and stops it on the way out."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen on a free loopback port, serving from a thread of its own."""
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._listen())
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("proxy did not start")

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close everything and stop the thread (nothing to do if never started)."""
        if self._loop is None or self._thread is None:
            return
        self.cut()

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (a partition)."""
        done = threading.Event()

        def do_cut() -> None:
            self.accepting = False
            for writer in list(self._pipes):
                writer.transport.abort()
            self._pipes.clear()
            done.set()

        self._running_loop().call_soon_threadsafe(do_cut)
        done.wait(10)

    def blackhole(self) -> None:
        """Keep every connection open but deliver nothing, either way."""
        self._running_loop().call_soon_threadsafe(setattr, self, "dropping", True)

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk forwarded."""
        self._running_loop().call_soon_threadsafe(setattr, self, "latency", seconds)

    def heal(self) -> None:
        """Accept and forward again, without added latency."""

        def do_heal() -> None:
            self.accepting, self.dropping, self.latency = True, False, 0.0

        self._running_loop().call_soon_threadsafe(do_heal)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the proxy is not running: start() it first")
        return self._loop

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self.accepting:
            client_w.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        number = self.connections
        self._pipes.update((client_w, up_w))
        await asyncio.gather(self._pipe(client_r, up_w, number, True), self._pipe(up_r, client_w, number, False))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: int, to_target: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.dropping:
                    continue  # black hole: swallowed, the sender is not told
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                if self.observe is not None:
                    self.observe(connection, to_target, data)  # after forwarding: watching must not delay it
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pipes.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()
