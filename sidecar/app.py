"""Process lifecycle: start in order, stop in reverse.

Start: origin -> service (ZooKeeper connects in the background) -> HTTP site.
The HTTP site comes up before ZooKeeper is ready so that /healthz answers and
/readyz can say why it is not ready.  With ``ops_listen`` a second site serves
only probes and metrics (kubelet probes reach the pod IP, while the API stays
on loopback).  Stop (SIGTERM/SIGINT), bounded by ``shutdown_timeout``: stop
accepting requests and finish those in flight, finish writes in progress,
close the ZooKeeper session (the member znode disappears at once), close the
origin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from .config import Config, Listen
from .http_api import make_server
from .origins import open_origin
from .service import CacheService

__all__ = ["serve"]

log = logging.getLogger(__name__)

# Share of shutdown_timeout given to in-flight HTTP requests; the rest is for
# background writes and closing the ZooKeeper session.
_HTTP_DRAIN_SHARE = 0.6


async def open_service(config: Config) -> CacheService:
    """The service of a sidecar with these settings, its origin opened (not started: ``start()``)."""
    origin = await open_origin(config.origin, config.origin_timeout, config.max_value_bytes, config.origin_connections)
    return CacheService(config, origin)


async def serve(config: Config, started: asyncio.Event | None = None) -> None:
    """Run the sidecar until SIGTERM or SIGINT (or until cancelled)."""
    service = await open_service(config)
    drain = config.shutdown_timeout * _HTTP_DRAIN_SHARE
    # aiohttp (3.14) waits shutdown_timeout twice for a request in progress:
    # for its handler, then again after cancelling the request.
    runners = [web.ServerRunner(make_server(service, access_log=None), shutdown_timeout=drain / 2)]
    if config.ops_listen is not None:
        runners.append(web.ServerRunner(make_server(service, ops_only=True, access_log=None), shutdown_timeout=1))
    sites: list[web.BaseSite] = []
    for runner, listen in zip(runners, [config.listen, config.ops_listen], strict=False):
        assert listen is not None
        await runner.setup()
        sites.append(_site(runner, listen))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for site in sites:
            await site.start()
        service.start()
        log.info(
            "member %s serving %s on %s%s, origin %s, zookeeper %s%s",
            config.member_id,
            config.namespace,
            config.listen,
            f" (probes and metrics on {config.ops_listen})" if config.ops_listen else "",
            service.origin.name,
            config.zk,
            config.namespace_root,
        )
        if started is not None:
            started.set()
        await stop.wait()
        log.info("shutting down (bound %.1fs)", config.shutdown_timeout)
    finally:
        deadline = loop.time() + config.shutdown_timeout
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        service.refuse_writes()  # writes still waiting answer now, instead of holding the drain up
        for runner in runners:
            await runner.cleanup()
        log.debug("HTTP drained; stopping the service")
        await service.stop(timeout=max(0.5, deadline - loop.time()))
        log.debug("stopped")


def _site(runner: web.BaseRunner, listen: Listen) -> web.BaseSite:
    if listen.unix_path is not None:
        _remove_stale_socket(listen.unix_path)
        return web.UnixSite(runner, listen.unix_path)
    return web.TCPSite(runner, listen.host, listen.port, reuse_address=True)


def _remove_stale_socket(path: str) -> None:
    # A socket file left by a previous run would make bind() fail.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
