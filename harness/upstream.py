"""A real HTTP origin for tests and the checker: ``python -m harness.upstream PORT``.

Stores values in memory under ``/kv/{key}``.  Control endpoints let a test
hold GETs of a key (the value is read when the GET arrives, returned on
release), or make every request fail with 500 or hang.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from .process import die_with_parent, free_port

STORE: dict[str, tuple[bytes, str]] = {}
HOLD: set[str] = set()
HOLD_PUT: dict[str, asyncio.Event] = {}  # one-shot: the next PUT of the key is held after storing
HOLD_PUT_BEFORE: dict[str, asyncio.Event] = {}  # one-shot: ... held before storing (?before=true)
HELD: dict[str, int] = {}
RELEASE: dict[str, asyncio.Event] = {}
MODE = {"mode": "ok"}


async def _faults() -> None:
    if MODE["mode"] == "500":
        raise web.HTTPInternalServerError(text="upstream broken on purpose")
    if MODE["mode"] == "hang":
        await asyncio.sleep(3600)


async def get(request: web.Request) -> web.Response:
    await _faults()
    key = request.match_info["key"]
    stored = STORE.get(key)  # read first: a held GET returns what it read
    if key in HOLD:
        HELD[key] = HELD.get(key, 0) + 1
        await RELEASE.setdefault(key, asyncio.Event()).wait()
        HELD[key] -= 1
    if stored is None:
        raise web.HTTPNotFound()
    return web.Response(body=stored[0], content_type=None, headers={"Content-Type": stored[1]})


async def put(request: web.Request) -> web.Response:
    await _faults()
    key = request.match_info["key"]
    body = await request.read()
    early = HOLD_PUT_BEFORE.pop(key, None)
    if early is not None:  # not stored yet: it lands when released (a late write)
        HELD[f"put:{key}"] = 1
        await early.wait()
        HELD[f"put:{key}"] = 0
    STORE[key] = (body, request.headers.get("Content-Type", "application/octet-stream"))
    release = HOLD_PUT.pop(key, None)
    if release is not None:  # stored, but the writer does not hear so yet
        HELD[f"put:{key}"] = 1
        await release.wait()
        HELD[f"put:{key}"] = 0
    return web.Response(status=204)


async def delete(request: web.Request) -> web.Response:
    await _faults()
    if STORE.pop(request.match_info["key"], None) is None:
        raise web.HTTPNotFound()
    return web.Response(status=204)


async def hold(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    HOLD.add(key)
    RELEASE[key] = asyncio.Event()
    return web.Response(status=204)


async def hold_put(request: web.Request) -> web.Response:
    event = asyncio.Event()
    holds = HOLD_PUT_BEFORE if request.query.get("before") == "true" else HOLD_PUT
    holds[request.match_info["key"]] = event
    RELEASE["put:" + request.match_info["key"]] = event
    return web.Response(status=204)


async def release(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    HOLD.discard(key)
    RELEASE.setdefault(key, asyncio.Event()).set()
    return web.Response(status=204)


async def held(request: web.Request) -> web.Response:
    return web.json_response({"held": HELD.get(request.match_info["key"], 0)})


async def mode(request: web.Request) -> web.Response:
    MODE["mode"] = request.match_info["mode"]
    return web.Response(status=204)


class UpstreamProcess:
    """This server as a child process on a free loopback port, started and stopped by its owner."""

    def __init__(self, log_path: Path | None = None, timeout: float = 20.0) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.upstream", str(port)],
                # harness/ is not an installed package: it runs from the checkout.
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.base + "/_control/held/x", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"upstream did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        """What the process wrote, if it had a log file."""
        return self.log_path.read_text(errors="replace") if self.log_path else "(no log)"

    def stop(self) -> None:
        """SIGTERM; SIGKILL if a held request keeps it from exiting."""
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main() -> None:
    app = web.Application()
    app.router.add_get("/kv/{key:.+}", get)
    app.router.add_put("/kv/{key:.+}", put)
    app.router.add_delete("/kv/{key:.+}", delete)
    app.router.add_post("/_control/hold/{key:.+}", hold)
    app.router.add_post("/_control/hold-put/{key:.+}", hold_put)
    app.router.add_post("/_control/release/{key:.+}", release)
    app.router.add_get("/_control/held/{key:.+}", held)
    app.router.add_post("/_control/mode/{mode}", mode)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
