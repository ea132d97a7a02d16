"""An asyncio face on one kazoo client: async znode calls and state changes.

Only this package touches kazoo, and only through :mod:`sidecar.bridge`.  Every
call here is non-blocking for the loop and bounded by ``op_timeout`` (kazoo
queues requests while it reconnects, so an unbounded await could hang for as
long as ZooKeeper is away).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.protocol.states import Callback, ZnodeStat
from kazoo.retry import KazooRetry
from kazoo.security import CREATOR_ALL_ACL
from prometheus_client import Histogram

from .. import bridge
from ..config import TlsSettings
from ..errors import CoordinationError, NotConnected, ZkAccessDenied
from .tls import diagnose_hosts

__all__ = ["ZkSession", "ZkState", "ZnodeStat"]

log = logging.getLogger(__name__)

# Exceptions meaning "the call may or may not have been applied; the
# connection is gone": callers decide whether to retry.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionLoss,
    SessionExpiredError,
    ConnectionClosedError,
    OperationTimeoutError,
)


class ZkState(enum.Enum):
    """The sidecar's view of its ZooKeeper session (see README, "Connection states")."""

    CONNECTING = "connecting"  # never connected yet
    CONNECTED = "connected"
    SUSPENDED = "suspended"  # connection lost, the session may survive
    LOST = "lost"  # session expired (kazoo reconnects with a new one)


_KAZOO_STATES = {
    KazooState.CONNECTED: ZkState.CONNECTED,
    KazooState.SUSPENDED: ZkState.SUSPENDED,
    KazooState.LOST: ZkState.LOST,
}


def _auth_options(auth: str | None) -> dict[str, Any]:
    # With credentials, every znode we create is open only to that identity
    # (ZooKeeper's "auth" ACL scheme = the authenticated creator).
    if not auth:
        return {}
    scheme, _, credential = auth.partition(":")
    return {"auth_data": [(scheme, credential)], "default_acl": CREATOR_ALL_ACL}


def _set_result(future: asyncio.Future[str | None], result: str | None) -> None:
    if not future.done():
        future.set_result(result)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ZkSession:
    """One kazoo client used from asyncio.

    State changes are delivered on the loop to ``on_state(ZkState)``.
    """

    def __init__(
        self,
        hosts: str,
        session_timeout: float,
        *,
        op_timeout: float | None = None,
        auth: str | None = None,
        tls: TlsSettings | None = None,
        on_state: Callable[[ZkState], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.op_timeout = op_timeout or session_timeout
        self.state = ZkState.CONNECTING
        # loop.time() of the last reply from the server (any answer, errors
        # included). kazoo sends no pings while requests flow, so a silently
        # dead link is only noticed here (see Coordinator's heartbeat).
        self.last_heard = float("-inf")  # time.monotonic()
        # time.monotonic() when the current connection came up: a last_heard
        # older than this was heard on an earlier connection.
        self.connected_at = float("inf")
        self._on_state = on_state
        # The zxid of the last reply read before the latest connection loss:
        # every event for a change up to it was read before that reply.
        self.loss_zxid = 0
        self._connected_waiters: list[asyncio.Future[None]] = []
        # Request to answer on the loop (kazoo's queue, the network, the
        # server, the hop back); unregistered: the sidecar's collector exports it.
        self.latency = Histogram(
            "zkcache_zookeeper_request_seconds",
            "ZooKeeper requests of this sidecar, from sent to answered on the event loop",
            registry=None,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        # Reconnect forever with capped backoff: the sidecar outlives outages.
        # Commands kazoo retries itself (client.retry) use the same cap but give
        # up after two session timeouts: kazoo's default backs off to an hour.
        self.client = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
            command_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0, deadline=2 * session_timeout),
            logger=logging.getLogger("kazoo.client"),
            **_auth_options(auth),
            **(tls.kazoo_options() if tls is not None else {}),
        )
        self.tls = tls
        self._hosts = hosts
        self.client.add_listener(self._kazoo_listener)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background; states arrive through ``on_state``."""
        self.client.start_async()

    async def connect(self, timeout: float) -> None:
        """Start and wait until connected, or raise :class:`NotConnected` saying why in one line."""
        self.start()
        try:
            await self.wait_connected(timeout)
        except NotConnected as exc:
            await self.close()
            why = await self.diagnose(budget=min(timeout, 6.0))
            raise NotConnected(f"{exc.detail}: {why}" if why else exc.detail) from None

    async def diagnose(self, budget: float = 6.0) -> str | None:
        """Why no server of the connect string answers as configured (TLS or not), or None.

        kazoo reports every failed connection as a timeout; this probes the
        servers itself, within ``budget`` seconds in all, on a daemon thread:
        a probe still running must not hold up the process's exit (an
        executor thread would: asyncio.run waits for it).
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str | None] = loop.create_future()

        def probe() -> None:
            try:
                result: str | None = diagnose_hosts(self._hosts, self.tls, budget)
            except Exception as exc:  # a probe must not take the sidecar down
                result = f"probing failed: {exc}"
            try:
                loop.call_soon_threadsafe(_set_result, answer, result)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody is waiting

        threading.Thread(target=probe, name="zk-diagnose", daemon=True).start()
        return await answer

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the session is connected, or raise :class:`NotConnected`."""
        if self.state is ZkState.CONNECTED:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._connected_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise NotConnected(f"could not connect to ZooKeeper at {self._hosts} within {timeout:g}s") from None
        finally:
            if fut in self._connected_waiters:
                self._connected_waiters.remove(fut)

    async def close(self, timeout: float | None = None) -> None:
        """Close the session (ephemeral znodes go at once) and stop kazoo's threads.

        With a ``timeout``, give up waiting after that many seconds: against
        a dead server kazoo's stop() can take long, and a daemon thread does
        not hold up the exit (``asyncio.to_thread`` would, in ``asyncio.run``).
        """
        done: asyncio.Future[None] = self.loop.create_future()

        def run() -> None:
            try:
                self._stop_and_close()
            finally:
                bridge.post(self.loop, _set_done, done)

        threading.Thread(target=run, name="zk-close", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            log.warning("closing the ZooKeeper session took over %.1fs; leaving it to expire", timeout)

    def _stop_and_close(self) -> None:
        try:
            self.client.stop()
        finally:
            self.client.close()

    @property
    def session_id(self) -> int | None:
        """The current session id, if any."""
        sid = self.client.client_id
        return sid[0] if sid else None

    # -- state --------------------------------------------------------------
    def _kazoo_listener(self, kstate: str) -> None:
        # Runs on kazoo's connection thread: never block, never touch state here.
        # On a loss, last_zxid is still the dead connection's last reply: read
        # it now, before any reply on the next connection moves it.
        bridge.post(self.loop, self._apply_state, _KAZOO_STATES[kstate], int(self.client.last_zxid or 0))

    def _apply_state(self, state: ZkState, last_zxid: int = 0) -> None:
        if state is not ZkState.CONNECTED:
            self.loss_zxid = last_zxid
        else:
            self.connected_at = time.monotonic()
        self.state = state
        log.info("zookeeper session state: %s (session 0x%x)", state.value, self.session_id or 0)
        if state is ZkState.CONNECTED:
            for fut in self._connected_waiters:
                if not fut.done():
                    fut.set_result(None)
        if self._on_state is not None:
            self._on_state(state)

    # -- znode calls --------------------------------------------------------
    async def call(self, async_result: Any, what: str, sent: float | None = None) -> Any:
        """Await a kazoo ``*_async`` result, bounded by ``op_timeout``.

        Connection errors become :class:`CoordinationError`; ZooKeeper's own
        errors (``NoNodeError``, ``BadVersionError``...) pass through unchanged.
        ``sent``: when the request was queued, if earlier than this call.
        """
        # The request went out no later than now. Its answer proves we hold
        # every event for changes committed before the server processed it, so
        # "heard at the send time" is a safe (early) stamp, unaffected by loop lag.
        if sent is None:
            sent = time.monotonic()
        try:
            result = await asyncio.wait_for(bridge.wait(async_result, self.loop), self.op_timeout)
        except TimeoutError:
            raise CoordinationError(f"ZooKeeper {what} timed out after {self.op_timeout:g}s") from None
        except KazooException as exc:
            error = self._translate(exc, what, sent)
            if error is exc:
                self.latency.observe(time.monotonic() - sent)  # answered, with an error
                raise
            raise error from exc
        self.last_heard = max(self.last_heard, sent)
        self.latency.observe(time.monotonic() - sent)
        return result

    async def call_all(self, *calls: tuple[Any, str]) -> list[Any]:
        """Await several kazoo ``*_async`` results sent back to back (a pipeline).

        Every call is awaited before the first error is raised, so none is
        left with an exception nobody retrieves.
        """
        # Stamped now, not when gather first runs each call (a loop stall
        # in between would make the stamp later than the truth).
        sent = time.monotonic()
        results = await asyncio.gather(*(self.call(res, what, sent) for res, what in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _translate(self, exc: BaseException, what: str, sent: float) -> BaseException:
        # The one mapping of kazoo's errors: connection trouble -> CoordinationError,
        # refused access -> ZkAccessDenied, ZooKeeper's own answers (NoNode,
        # BadVersion...) unchanged; any answer from the server stamps last_heard.
        if isinstance(exc, CONNECTION_ERRORS):
            return CoordinationError(f"ZooKeeper {what} failed: {type(exc).__name__}")
        self.last_heard = max(self.last_heard, sent)
        if isinstance(exc, NoAuthError | AuthFailedError):
            return ZkAccessDenied(
                f"ZooKeeper refused {what}: {type(exc).__name__} (are zk_auth and the znodes' ACLs the same identity?)"
            )
        return exc

    async def exists(self, path: str, watch: Callable[[Any], None] | None = None) -> ZnodeStat | None:
        """``exists`` (arming a data watch if ``watch`` is given)."""
        return await self.call(self.client.exists_async(path, watch=watch), "exists")

    async def get(self, path: str, watch: Callable[[Any], None] | None = None) -> tuple[bytes, ZnodeStat]:
        """``getData`` (arming a data watch if ``watch`` is given)."""
        return await self.call(self.client.get_async(path, watch=watch), "get")  # type: ignore[no-any-return]

    async def get_children(self, path: str, watch: Callable[[Any], None] | None = None) -> list[str]:
        """``getChildren`` (arming a child watch if ``watch`` is given)."""
        return await self.call(self.client.get_children_async(path, watch=watch), "get_children")  # type: ignore[no-any-return]

    async def get_children_stat(
        self, path: str, watch: Callable[[Any], None] | None = None
    ) -> tuple[list[str], ZnodeStat]:
        """``getChildren2``: the children and the parent's stat (``cversion``, ``pzxid``)."""
        result = self.client.get_children_async(path, watch=watch, include_data=True)
        return await self.call(result, "get_children")  # type: ignore[no-any-return]

    async def set(self, path: str, data: bytes, version: int = -1) -> ZnodeStat:
        """``setData``; ``version`` >= 0 makes it a compare-and-set."""
        return await self.call(self.client.set_async(path, data, version), "set")

    async def create(
        self,
        path: str,
        data: bytes = b"",
        *,
        ephemeral: bool = False,
        sequence: bool = False,
        makepath: bool = False,
    ) -> tuple[str, ZnodeStat]:
        """``create2``: returns the created path and its stat."""
        result = self.client.create_async(
            path, data, ephemeral=ephemeral, sequence=sequence, makepath=makepath, include_data=True
        )
        return await self.call(result, "create")  # type: ignore[no-any-return]

    async def delete(self, path: str, version: int = -1) -> None:
        """``delete``; ``version`` >= 0 makes it conditional."""
        await self.call(self.client.delete_async(path, version), "delete")

    async def commit(self, transaction: Any, what: str) -> list[Any]:
        """Commit a kazoo transaction (``client.transaction()``, built off-loop-safe: no I/O).

        Returns one result per operation; a failed multi reports its errors
        as exception *values* in that list (nothing is raised for them).
        """
        return await self.call(transaction.commit_async(), what)  # type: ignore[no-any-return]

    async def drain_events(self) -> None:
        """Return once every watch event kazoo had received is delivered to the loop.

        kazoo runs watch callbacks in order on one thread; a marker queued
        behind them reaches the loop (through the same ``call_soon_threadsafe``
        FIFO) after all of them.
        """
        fut: asyncio.Future[None] = self.loop.create_future()

        def release() -> None:
            if not fut.done():
                fut.set_result(None)

        def marker() -> None:
            bridge.post(self.loop, release)

        self.client.handler.dispatch_callback(Callback("barrier", marker, ()))
        await asyncio.wait_for(fut, self.op_timeout)

    async def ensure_path(self, path: str) -> None:
        """Create ``path`` and its parents if missing."""
        await self.call(self.client.ensure_path_async(path), "ensure_path")
