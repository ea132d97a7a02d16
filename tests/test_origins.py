"""Origins on their own: the SQLite file shared by several sidecars of one host."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from sidecar.errors import OriginTimeout
from sidecar.origins import OriginValue, open_origin
from sidecar.origins.sqlite import SqliteOrigin


async def test_many_sidecars_opening_one_new_sqlite_file_at_once(tmp_path: Path) -> None:
    # Separate processes, as in a dev cluster or a benchmark starting 10 sidecars:
    # the first opener switches the file to WAL while the others are connecting.
    # Every process opens the same fresh files at the same instants.
    urls = [f"sqlite:///{tmp_path / f'shared{i}.db'}" for i in range(10)]
    script = (
        "import asyncio, sys, time\n"
        "from sidecar.origins import open_origin\n"
        "async def main():\n"
        "    start = float(sys.argv[1])\n"
        "    for i, url in enumerate(sys.argv[2:]):\n"
        "        time.sleep(max(0.0, start + 0.2 * i - time.time()))\n"
        "        origin = await open_origin(url, 5.0, 1024)\n"
        "        await origin.close()\n"
        "asyncio.run(main())\n"
    )
    start = str(time.time() + 1.5)  # time for every process to be up and waiting
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", script, start, *urls, stderr=asyncio.subprocess.PIPE)
        for _ in range(8)
    ]
    results = await asyncio.gather(*(p.communicate() for p in procs))
    failures = [err.decode() for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert failures == [], failures[0]
    origin = await open_origin(urls[0], 5.0, 1024)
    try:
        await origin.put("k", OriginValue(b"v", "text/plain"))
        assert (await origin.get("k")) == OriginValue(b"v", "text/plain")
    finally:
        await origin.close()


async def test_a_sqlite_write_that_timed_out_never_lands_later(tmp_path: Path) -> None:
    """Hole 6: a write that had started kept running in its thread after
    ``wait_for`` gave up (504), and committed after the writer had released
    the key's lock. Now, when ``put`` returns or raises, the write can no
    longer land: what the file holds then is final."""
    path = tmp_path / "o.db"
    origin = SqliteOrigin(f"sqlite:///{path}", timeout=0.3)
    await origin.open()
    try:
        await origin.put("k", OriginValue(b"before"))
        # A trigger that burns about a second of CPU inside the write's
        # transaction: a write that has started and is slow, deterministically.
        db = sqlite3.connect(path)
        db.execute(
            "CREATE TRIGGER slow AFTER UPDATE ON kv BEGIN "
            "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 3000000) SELECT x FROM c); END"
        )
        db.commit()
        db.close()
        try:
            await origin.put("k", OriginValue(b"late"))
        except OriginTimeout:
            pass
        answered = await origin.get("k")
        await asyncio.to_thread(origin._pool.shutdown, True)  # every thread has finished
        final = await asyncio.to_thread(_read, path, "k")
        expected = answered.value if answered is not None else None
        assert final == expected, "the write landed after put() had answered"
    finally:
        await origin.close()


def _read(path: Path, key: str) -> bytes | None:
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])
    finally:
        db.close()
