"""The embedded default origin: one SQLite file, shareable by sidecars on a host.

WAL mode lets readers in other processes proceed during a write, and
``busy_timeout`` makes writers from several sidecars queue instead of failing.
``synchronous=FULL``: a write is acknowledged only once it is on disk, since
an acknowledged write must survive a crash of the host.  sqlite3 blocks, so
every call runs in a small pool with one connection per thread.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from ..errors import OriginTimeout, OriginUnavailable
from .base import OriginValue
from .monitor import probe_read

__all__ = ["SqliteOrigin", "sqlite_path"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key          TEXT PRIMARY KEY,
    value        BLOB NOT NULL,
    content_type TEXT NOT NULL,
    updated_at   REAL NOT NULL
) WITHOUT ROWID
"""


def sqlite_path(url: str) -> str:
    """``sqlite:///./a.db`` -> ``./a.db``; ``sqlite:////abs/a.db`` -> ``/abs/a.db``."""
    return urlsplit(url).path[1:]


class SqliteOrigin:
    """Key-value table ``kv`` in a SQLite database file."""

    def __init__(self, url: str, timeout: float, threads: int = 4) -> None:
        self.path = sqlite_path(url)
        self.name = f"sqlite:{self.path}"
        self.applies_late = False  # one process's transaction: applied before we answer, or never
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sqlite")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            self._set_up(conn)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        # Several sidecars opening one new file at once race for the switch to
        # WAL, and SQLite answers "database is locked" there without waiting
        # for busy_timeout. WAL is a property of the file: only its first
        # opener has to switch; the others retry briefly (a pool thread sleeps,
        # never the loop).
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(lambda f: f(self._conn()), fn)
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, call), self._timeout)
        except TimeoutError:
            raise OriginTimeout(f"{self.name}: no answer within {self._timeout:g}s") from None
        except sqlite3.Error as exc:
            raise OriginUnavailable(f"{self.name}: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Run a write so that, when this returns or raises, it can no longer land.

        A thread cannot be stopped, and ``wait_for`` only stops waiting: a
        write that timed out in the queue would still run later, after the
        writer released the key's lock, and overwrite a later writer's value.
        So past the timeout a write that has not started is cancelled (nothing
        written), and one that has started is waited for: its transaction
        either commits or fails within SQLite's own ``busy_timeout``.
        """
        job = self._pool.submit(lambda: fn(self._conn()))
        pending = asyncio.wrap_future(job)
        try:
            await asyncio.wait_for(asyncio.shield(pending), self._timeout)
            return
        except TimeoutError:
            if job.cancel():
                raise OriginTimeout(
                    f"{self.name}: write not started within {self._timeout:g}s; nothing written"
                ) from None
        except sqlite3.Error as exc:
            raise OriginUnavailable(f"{self.name}: {exc}") from exc
        try:
            await pending  # started: its real outcome, however late
        except sqlite3.Error as exc:
            raise OriginUnavailable(f"{self.name}: {exc}") from exc

    async def open(self) -> None:
        """Create the file and table if needed; fail early on a bad path."""
        await self._run(lambda c: None)

    async def get(self, key: str) -> OriginValue | None:
        """Read the value of ``key``."""

        def read(c: sqlite3.Connection) -> OriginValue | None:
            row = c.execute("SELECT value, content_type FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else OriginValue(bytes(row[0]), row[1])

        return await self._run(read)

    async def put(self, key: str, value: OriginValue) -> None:
        """Insert or replace ``key``'s value (durable on return)."""

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO kv (key, value, content_type, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                "content_type = excluded.content_type, updated_at = excluded.updated_at",
                (key, value.value, value.content_type, time.time()),
            )

        await self._write(write)

    async def delete(self, key: str) -> None:
        """Delete ``key`` if present."""
        await self._write(lambda c: c.execute("DELETE FROM kv WHERE key = ?", (key,)) and None)

    async def health(self) -> list[str]:
        """One read of a key nobody writes."""
        return await probe_read(self)

    async def close(self) -> None:
        """Close every thread's connection and stop the pool."""
        # Queued calls are cancelled (a write must not land once its writer
        # stopped waiting for it); running ones finish first.
        await asyncio.to_thread(functools.partial(self._pool.shutdown, wait=True, cancel_futures=True))
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
