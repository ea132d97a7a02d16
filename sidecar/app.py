"""Process lifecycle: start in order, stop in reverse.

Start: origin -> service (ZooKeeper connects in the background) -> HTTP site.
The HTTP site comes up before ZooKeeper is ready so that /healthz answers and
/readyz can say why it is not ready.  Stop (SIGTERM/SIGINT): stop accepting
requests and finish those in flight, finish writes in progress, close the
ZooKeeper session (the member znode disappears at once), close the origin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from .config import Config
from .http_api import make_app
from .origins import open_origin
from .service import CacheService

__all__ = ["SHUTDOWN_TIMEOUT", "serve"]

log = logging.getLogger(__name__)

# Kubernetes' terminationGracePeriodSeconds must exceed this (the chart does).
SHUTDOWN_TIMEOUT = 10.0


async def serve(config: Config, started: asyncio.Event | None = None) -> None:
    """Run the sidecar until SIGTERM or SIGINT (or until cancelled)."""
    origin = await open_origin(config.origin, config.origin_timeout, config.max_value_bytes)
    service = CacheService(config, origin)
    app = make_app(service)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    listen = config.listen
    site: web.BaseSite
    if listen.unix_path is not None:
        _remove_stale_socket(listen.unix_path)
        site = web.UnixSite(runner, listen.unix_path)
    else:
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await site.start()
        service.start()
        log.info(
            "member %s serving %s on %s, origin %s, zookeeper %s%s",
            config.member_id,
            config.namespace,
            listen,
            origin.name,
            config.zk,
            config.namespace_root,
        )
        if started is not None:
            started.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await service.stop()


def _remove_stale_socket(path: str) -> None:
    # A socket file left by a previous run would make bind() fail.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
