"""Revalidation after a reconnect: how long until a sidecar with N cached keys is ready again.

    .venv/bin/python -m bench.revalidation [--keys 10000]

Starts ZooKeeper and one sidecar that reaches it through a TCP proxy, fills the
sidecar's cache with N keys (rows written straight into the SQLite origin, then
read through the sidecar), cuts the proxy until the sidecar notices, heals it,
and reports what the sidecar measured: the time to hand N watches back with
``setWatches`` (the server fires for keys changed since the loss and re-arms the
rest), and the time from healing to ``/readyz``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from harness import LocalZooKeeper, SidecarProcess, TcpProxy

from .common import seed_origin


async def fill(url: str, keys: int) -> None:
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def one(i: int) -> None:
            async with sem, http.get(f"{url}/v1/keys/k{i}") as resp:
                await resp.read()
                assert resp.status == 200, resp.status

        await asyncio.gather(*(one(i) for i in range(keys)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zkcache-bench-") as tmp:
        db = Path(tmp) / "origin.db"
        asyncio.run(seed_origin(db, ((f"k{i}", b"x" * 100) for i in range(args.keys))))
        zk = LocalZooKeeper(Path(tmp) / "zk")
        zk.start()
        proxy = TcpProxy(zk.host, zk.port)
        proxy.start()
        sc = SidecarProcess(
            tmp,
            "a",
            {
                "zk": proxy.address,
                "origin": f"sqlite:///{db}",
                "namespace": "bench",
                "log_level": "warning",
                "zk_session_timeout": "10s",
                "max_entries": str(max(args.keys, 1000)),
            },
        )
        try:
            sc.start()
            started = time.monotonic()
            asyncio.run(fill(sc.url, args.keys))
            filled = time.monotonic() - started
            assert sc.stats()["entries"] == args.keys
            proxy.cut()
            sc.wait_ready(30, ready=False)
            healed = time.monotonic()
            proxy.heal()
            sc.wait_ready(60)
            ready_after = time.monotonic() - healed
            reval = sc.stats()["revalidation"]
        finally:
            sc.stop()
            proxy.stop()
            zk.stop()
    print(
        f"Revalidation after reconnect, {args.keys} cached keys, ZooKeeper 3.8 standalone, loopback, 2 cores "
        f"({time.strftime('%Y-%m-%d')}; `python -m bench.revalidation --keys {args.keys}`)\n\n"
        "| measurement | value |\n|---|---|\n"
        f"| entries revalidated | {reval['entries']} (dropped {reval['dropped']}) |\n"
        f"| restore (setWatches), measured by the sidecar | {reval['seconds'] * 1000:.0f} ms "
        f"({reval['seconds'] / max(reval['entries'], 1) * 1e6:.1f} us per key) |\n"
        f"| heal -> /readyz 200 (includes kazoo's reconnect backoff) | {ready_after * 1000:.0f} ms |\n"
        f"| filling the cache through the sidecar, for scale | {filled:.1f} s ({args.keys / filled:.0f} misses/s) |"
    )


if __name__ == "__main__":
    main()
