"""Plumbing for ``tests/test_model.py``: a blocking HTTP client and a three-sidecar cluster.

Hypothesis runs stateful rules synchronously, so everything here blocks (with
a bound on every wait) instead of being a coroutine.  The cluster is real:
one ZooKeeper, one :class:`~harness.TcpProxy` per sidecar between it and
ZooKeeper (so one sidecar's link can be cut, healed or slowed alone), three
``cache-sidecar`` processes, and one SQLite file they all read and write.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kazoo.client import KazooClient

from harness import SidecarProcess, TcpProxy

__all__ = ["Cluster", "Reply", "request", "wait_until"]

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``check()`` until it returns something truthy, or fail saying what was awaited.

    The blocking twin of ``tests.conftest.eventually``: every wait in the
    model test is bounded and names what it waited for.
    """
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, read to the end."""

    status: int
    headers: dict[str, str]
    body: bytes
    sent: float = 0.0  # time.monotonic() just before the request went out

    @property
    def source(self) -> str:
        """``X-Cache``: hit, miss, bypass, or empty (errors, writes)."""
        return self.headers.get("x-cache", "")

    @property
    def etag(self) -> int | None:
        """The ETag as a number, or ``None`` without one."""
        raw = self.headers.get("etag")
        return None if raw is None else int(raw.strip().removeprefix("W/").strip('"'))

    def json(self) -> Any:
        """The body parsed as JSON (``None`` if it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def __repr__(self) -> str:
        # What a failing assertion shows: short, and with the problem detail.
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return f"<{self.status} X-Cache={self.source or '-'} ETag={self.headers.get('etag', '-')} body={body!r}>"


def request(
    base_port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a fresh loopback connection (cheap, and no state shared between threads)."""
    conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=timeout)
    try:
        conn.connect()
        sent = time.monotonic()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, sent)
    finally:
        conn.close()


class Cluster:
    """Three sidecars, each behind its own proxy to one ZooKeeper, on one SQLite origin.

    Started once per test function (starting processes is the slow part);
    the state machine resets what it needs between examples through
    :meth:`restore`.
    """

    def __init__(
        self,
        *,
        zk_hosts: str,
        namespace: str,
        sqlite_path: str,
        proxies: list[TcpProxy],
        sidecars: list[SidecarProcess],
    ) -> None:
        self.zk_hosts = zk_hosts
        self.members_path = f"/zkcache/{namespace}/members"  # the default zk_root
        self.sqlite_path = sqlite_path
        self.proxies = proxies
        self.sidecars = sidecars
        self._admin = KazooClient(hosts=zk_hosts)
        self._admin.start(15)

    def close(self) -> None:
        """Stop the admin client and the proxies (the sidecars belong to their fixture)."""
        self._admin.stop()
        self._admin.close()
        for proxy in self.proxies:
            proxy.stop()

    # -- HTTP ---------------------------------------------------------------
    def call(self, i: int, method: str, path: str, **kw: Any) -> Reply:
        """A request to sidecar ``i``."""
        return request(self.sidecars[i].port, method, path, **kw)

    # -- the origin, behind the sidecars' backs -------------------------------
    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.sqlite_path, timeout=10, isolation_level=None)

    def origin_get(self, key: str) -> bytes | None:
        """The origin's value of ``key`` right now (what an application reads from its store)."""
        db = self._db()
        try:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])
        finally:
            db.close()

    def origin_set(self, key: str, value: bytes | None) -> None:
        """Write (or, with ``None``, delete) ``key`` in the origin directly, as another application would."""
        db = self._db()
        try:
            if value is None:
                db.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO kv (key, value, content_type, updated_at) VALUES (?, ?, 'text/plain', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "content_type = excluded.content_type, updated_at = excluded.updated_at",
                    (key, value, time.time()),
                )
        finally:
            db.close()

    # -- links and processes --------------------------------------------------
    def ready(self, i: int) -> bool:
        """``/readyz`` of sidecar ``i`` is 200."""
        return self.sidecars[i].is_ready()

    def wait_ready(self, i: int, timeout: float = 20.0) -> None:
        """Bounded wait for sidecar ``i`` to be ready (connected, watches armed)."""
        wait_until(lambda: self.ready(i), timeout=timeout, what=f"sidecar {i} ready")

    def cut(self, i: int) -> None:
        """Partition sidecar ``i`` from ZooKeeper and wait until it says it is not ready.

        Cut twice: a connection the proxy was still opening upstream when the
        first cut ran would otherwise survive it.
        """
        self.proxies[i].cut()
        wait_until(lambda: not self.ready(i), timeout=10, what=f"sidecar {i} noticing its link was cut")
        self.proxies[i].cut()

    def heal(self, i: int) -> None:
        """Restore sidecar ``i``'s link (no added latency either); does not wait."""
        self.proxies[i].heal()

    def slow(self, i: int, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk between sidecar ``i`` and ZooKeeper."""
        self.proxies[i].delay(seconds)

    def repairs(self, i: int) -> int:
        """Revalidations completed plus sessions set up by sidecar ``i`` (``/v1/stats``).

        Either one ends a loss of watches: entries re-checked, or none left.
        """
        stats = self.stats(i)
        return int(stats["revalidation"]["count"]) + int(stats["zookeeper"]["sessions"])

    def stats(self, i: int) -> dict[str, Any]:
        """``/v1/stats`` of sidecar ``i``."""
        return self.call(i, "GET", "/v1/stats").json()  # type: ignore[no-any-return]

    def connections(self, i: int) -> int:
        """Connections the proxy of sidecar ``i`` has forwarded so far."""
        return self.proxies[i].connections

    def member_alive(self, i: int) -> bool:
        """Sidecar ``i``'s ephemeral member znode exists (its session is live in ZooKeeper)."""
        return self._admin.exists(f"{self.members_path}/{self.sidecars[i].name}") is not None

    def restart(self, i: int) -> None:
        """Stop sidecar ``i`` gracefully and start it again on the same port; wait until ready."""
        proc = self.sidecars[i]
        proc.stop()
        proc.start(wait_ready=True, timeout=30)

    def restore(self, probe_key: str) -> None:
        """Bring the cluster back to "every link healthy, every sidecar ready and confirming".

        A sidecar whose acknowledgements are wedged (a daemon bug the model
        reports in the example that caused it) would fail every later
        example; it is restarted, so each example is judged on its own.
        """
        for i in range(len(self.proxies)):
            self.heal(i)
        for i in range(len(self.sidecars)):
            self.wait_ready(i)
        if self._acknowledging(probe_key):
            return
        for proc in self.sidecars:
            proc.stop()
        for proc in self.sidecars:
            proc.start(wait_ready=False)
        for i in range(len(self.sidecars)):
            self.wait_ready(i, timeout=30)
        if not self._acknowledging(probe_key):
            raise AssertionError("a ?wait=true invalidation is not confirmed even after restarting every sidecar")

    def _acknowledging(self, probe_key: str) -> bool:
        body = json.dumps({"keys": [probe_key]}).encode()
        reply = self.call(0, "POST", "/v1/invalidate?wait=true&timeout=3", body=body)
        return reply.status == 200
