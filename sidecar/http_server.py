"""HTTP connections: how many, for how long, and what a malformed request gets.

aiohttp's low-level server does the protocol; this module bounds what one
misbehaving or hostile local client can hold, and makes the errors that
aiohttp's parser raises (a NUL in the path, a 100 KB URL, a body that is not
valid chunked encoding) look like every other error of the API:
``application/problem+json``, logged at debug level, not as tracebacks.

- **Idle connections** (no request in progress, including one still sending
  its headers: slowloris) are closed after ``http_idle_timeout``.  aiohttp's
  keep-alive timer already starts when a connection opens and closes it if no
  complete request arrived, so this is its ``keepalive_timeout``.
- **Open connections** are bounded by ``max_connections``.  At the bound a new
  connection closes the longest idle one (as nginx reuses idle keep-alive
  connections), so an idle flood cannot shut out probes; if every connection
  has a request in progress, the new one gets a 503 and is closed.  Either is
  logged, at most every ten seconds.

Bytes in flight (request bodies, batch responses) are bounded by
:class:`sidecar.budget.ByteBudget`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import TooManyConnections

__all__ = ["Connection", "HttpServer", "ProblemRenderer", "raise_fd_limit"]

log = logging.getLogger(__name__)

# (status, title, detail) -> the problem response; http_api owns the rendering.
ProblemRenderer = Callable[[int, str, str], web.Response]

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/problem+json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
)
_BUSY = TooManyConnections("every connection has a request in progress (max_connections); retry")
_REFUSED_BODY = orjson.dumps(
    {"type": _BUSY.type_uri, "title": _BUSY.title, "status": _BUSY.status, "detail": _BUSY.detail}
)
_LOG_EVERY = 10.0
# File descriptors kept for what is not an HTTP connection: ZooKeeper, the
# origin's pool, SQLite, logs.
FD_RESERVE = 256


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft file-descriptor limit to the hard one; the connections that then fit.

    A process at its descriptor limit cannot accept anything, probes
    included, and says nothing: the bound on connections must sit below it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, max_connections + FD_RESERVE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(16, soft - FD_RESERVE)
    if max_connections > fits:
        log.warning(
            "max_connections %d does not fit the file-descriptor limit %d; using %d", max_connections, soft, fits
        )
        return fits
    return max_connections


class Connection(RequestHandler):
    """One HTTP connection; errors of aiohttp's parser become problem documents.

    A client that stops reading its response holds the response's bytes in
    our send buffer; aiohttp has no write timeout and arms no idle timer while
    a request is in progress.  So when the transport pauses writing (its
    buffer over the high-water mark) and does not resume within the send
    timeout, the connection is aborted.
    """

    _send_timer: asyncio.TimerHandle | None = None
    # Whether a line ended since this connection's last request began: an
    # over-long line before any is the request line (414), after, a header (431).
    line_ended = False
    _unended = 0  # bytes since this request began, while no line has ended

    def data_received(self, data: bytes) -> None:
        # Bytes of a body whose handler runs are not a request line's.
        if not self.line_ended and not self._request_in_progress:
            end = data.find(b"\n")
            if end < 0:
                self._unended += len(data)
            elif self._unended + end <= self.max_line_size + 1:
                self.line_ended = True
        super().data_received(data)

    def request_began(self) -> None:
        """What arrives from now on belongs to this request's body or to the next request."""
        self.line_ended = False
        self._unended = 0

    def pause_writing(self) -> None:
        super().pause_writing()
        manager = self._manager
        if self._send_timer is None and isinstance(manager, HttpServer):
            self._send_timer = self._loop.call_later(manager.send_timeout, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_stalled(self) -> None:
        self._send_timer = None
        log.debug("client stopped reading its response; aborting the connection")
        if self.transport is not None:
            self.transport.abort()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            log.debug("client went away during %s %s", request.method, request.path)
        elif status >= 500:
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
        else:
            # A malformed request is the client's problem: no traceback in our log.
            log.debug("malformed request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        detail = " ".join((message or HTTPStatus(status).phrase).split())[:200]
        if isinstance(exc, LineTooLong):
            # aiohttp says 400 for both; RFC 9110 has a status for each.
            target = not self.line_ended
            status = 414 if target else 431
            detail = f"the {'request target' if target else 'header section'} exceeds {self.max_line_size} bytes"
        elif isinstance(exc, BadHttpMethod):
            status = 501  # RFC 9110 15.6.2: a method the server does not recognize
        title = HTTPStatus(status).phrase
        manager = self._manager
        render: ProblemRenderer = manager.render if isinstance(manager, HttpServer) else _fallback
        resp = render(status, title, detail)
        resp.force_close()
        return resp


def _fallback(status: int, title: str, detail: str) -> web.Response:  # pragma: no cover - after close
    return web.Response(status=status, text=detail)


def _refuse(handler: RequestHandler, transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.write(_REFUSED + b"Content-Length: %d\r\n\r\n" % len(_REFUSED_BODY) + _REFUSED_BODY)
    handler.force_close()


class HttpServer(web.Server):
    """aiohttp's low-level server with a bound on open connections."""

    def __init__(
        self, handler: Any, *, max_connections: int, send_timeout: float, render: ProblemRenderer, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        self.render = render
        self.closed_idle = 0
        self.refused = 0
        self._logged_at = 0.0

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        victim = self._longest_idle(handler)
        if victim is not None:
            self.closed_idle += 1
            victim.force_close()
            self._log_bound("closed the longest idle connection")
            return
        self.refused += 1
        self._log_bound("refused a new connection with 503: every connection has a request in progress")
        # Not now: aiohttp starts the connection's task after this returns, and
        # that task must run before the close it would otherwise find.
        asyncio.get_running_loop().call_soon(_refuse, handler, transport)

    def _longest_idle(self, newcomer: RequestHandler) -> RequestHandler | None:
        # Insertion order is age.  Idle is aiohttp's own notion, from its
        # keep-alive check: waiting for a request (its headers still coming
        # in, maybe) with none parsed and queued.  A request popped from the
        # queue but whose handler has not started yet is not idle.
        for conn in self._connections:
            # Connections closing already stay listed until their task ends.
            if conn is newcomer or conn._force_close or conn.transport is None or conn.transport.is_closing():
                continue
            waiter = conn._waiter
            if waiter is not None and not waiter.done() and not conn._messages:
                return conn
        return None

    def _log_bound(self, what: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.warning(
                "max_connections (%d) reached: %s (since start: %d idle closed, %d refused)",
                self.max_connections,
                what,
                self.closed_idle,
                self.refused,
            )
