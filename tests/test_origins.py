"""Origins on their own: the SQLite file shared by several sidecars of one host."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

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
    """Hole 6: a write queued behind a busy pool timed out, was answered 504,
    and then ran anyway, after the writer had released the key's lock."""
    origin = SqliteOrigin(f"sqlite:///{tmp_path / 'o.db'}", timeout=0.3, threads=1)
    await origin.open()
    try:
        await origin.put("k", OriginValue(b"before"))
        release = threading.Event()
        blocker = origin._pool.submit(release.wait, 5)  # the one thread is busy
        with pytest.raises(OriginTimeout):
            await origin.put("k", OriginValue(b"late"))
        release.set()
        await asyncio.wrap_future(blocker)
        await asyncio.to_thread(origin._pool.submit(lambda: None).result, 5)  # the pool drained
        assert (await origin.get("k")) == OriginValue(b"before"), "a timed-out write landed afterwards"
    finally:
        await origin.close()
