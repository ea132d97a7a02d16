"""Fixtures: a real ZooKeeper, real sidecar processes, real origins.

Like kazoo's test harness, one ZooKeeper serves the whole session and each
test gets its own namespace (its own subtree), so tests cannot see each
other's znodes.  Tests that stop or pause ZooKeeper get a private server.
On failure, the logs of every process the test started are printed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness import LocalZooKeeper, SidecarProcess
from harness.redis import LocalRedis
from harness.upstream import UpstreamProcess


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


def _dump_logs_if_failed(request: pytest.FixtureRequest, name: str, tail: Callable[[], str]) -> None:
    if request.node.stash.get(_FAILED, False):
        sys.stderr.write(f"\n----- log of {name} -----\n{tail()}\n")


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalZooKeeper]:
    """One real ZooKeeper for the session (do not stop it in a test)."""
    server = LocalZooKeeper(tmp_path_factory.mktemp("zk-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zk_private(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalZooKeeper]:
    """A ZooKeeper of this test's own, free to be stopped, killed or paused."""
    server = LocalZooKeeper(tmp_path / "zk")
    server.start()
    yield server
    _dump_logs_if_failed(request, "zookeeper", server.log_tail)
    server.stop()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made by trustme for one TLS ZooKeeper: its CA, a client certificate, and a stranger CA."""

    ca: str
    cert: str
    key: str
    other_ca: str
    # Another client of the same CA: another x509 identity (ZooKeeper authenticates
    # a session by its certificate's subject too, so the sidecars' own certificate
    # would pass the ACLs their "auth" scheme grants it).
    stranger_cert: str
    stranger_key: str


def make_tls_files(where: Path) -> TlsFiles:
    import trustme
    from cryptography.hazmat.primitives import serialization

    where.mkdir(parents=True, exist_ok=True)
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    # ZooKeeper's PEM keystore: a PKCS#8 key (trustme writes SEC1) and the chain, in one file.
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (where / "server.pem").write_bytes(pkcs8 + b"".join(blob.bytes() for blob in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    stranger.cert_pem.write_to_path(str(where / "other-ca.pem"))
    client = ca.issue_cert("zkcache-sidecar")
    client.private_key_pem.write_to_path(str(where / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(where / "client.crt"))
    stranger_client = ca.issue_cert("someone-else")
    stranger_client.private_key_pem.write_to_path(str(where / "stranger.key"))
    stranger_client.cert_chain_pems[0].write_to_path(str(where / "stranger.crt"))
    return TlsFiles(
        ca=str(where / "ca.pem"),
        cert=str(where / "client.crt"),
        key=str(where / "client.key"),
        other_ca=str(where / "other-ca.pem"),
        stranger_cert=str(where / "stranger.crt"),
        stranger_key=str(where / "stranger.key"),
    )


@pytest.fixture(scope="session")
def zk_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalZooKeeper, TlsFiles]]:
    """A real ZooKeeper with a TLS client port that requires client certificates (ssl.clientAuth=need)."""
    base = tmp_path_factory.mktemp("zk-tls")
    files = make_tls_files(base / "certs")
    server = LocalZooKeeper(base / "zk", tls_dir=base / "certs", client_auth="need")
    server.start()
    yield server, files
    server.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite origin file for this test."""
    return f"sqlite:///{tmp_path / 'origin.db'}"


SidecarFactory = Callable[..., SidecarProcess]


class _Sidecars:
    """Starts sidecar processes with the fixtures' defaults; stops them all at the end."""

    def __init__(self, where: Path, zk: str, namespace: str, origin: str) -> None:
        self.where, self.defaults = (
            where,
            {
                "zk": zk,
                "namespace": namespace,
                "origin": origin,
                "zk_session_timeout": "4s",
                "log_level": "debug",
            },
        )
        self.started: list[SidecarProcess] = []

    def __call__(self, name: str, wait_ready: bool = True, **settings: Any) -> SidecarProcess:
        proc = SidecarProcess(self.where / "logs", name, {**self.defaults, **settings})
        self.started.append(proc)
        proc.start(wait_ready=wait_ready)
        return proc

    def stop(self, request: pytest.FixtureRequest) -> None:
        for proc in self.started:
            _dump_logs_if_failed(request, f"sidecar {proc.name}", proc.log_tail)
            proc.stop()


@pytest.fixture
def sidecars(
    tmp_path: Path,
    zk_server: LocalZooKeeper,
    namespace: str,
    sqlite_url: str,
    request: pytest.FixtureRequest,
) -> Iterator[SidecarFactory]:
    """Start real sidecar processes: ``sidecars("a", zk=..., origin=...)``.

    Defaults: the shared ZooKeeper, this test's namespace and SQLite file.
    Every process is stopped (and its log printed on failure) at teardown.
    """
    started = _Sidecars(tmp_path, zk_server.hosts, namespace, sqlite_url)
    yield started
    started.stop(request)


@pytest.fixture(scope="module")
def module_sidecars(
    tmp_path_factory: pytest.TempPathFactory, zk_server: LocalZooKeeper, request: pytest.FixtureRequest
) -> Iterator[SidecarFactory]:
    """As ``sidecars``, for the tests of one module together: its own namespace and SQLite file."""
    where = tmp_path_factory.mktemp("module-sidecars")
    started = _Sidecars(where, zk_server.hosts, f"t-{uuid.uuid4().hex[:12]}", f"sqlite:///{where / 'origin.db'}")
    yield started
    started.stop(request)


@pytest.fixture
def upstream(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A real HTTP origin process (harness/upstream.py); yields its base URL."""
    server = UpstreamProcess(tmp_path / "upstream.log")
    yield server.base
    _dump_logs_if_failed(request, "upstream", server.log)
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """One real redis-server for the session (do not stop it in a test: use ``redis_private``)."""
    server = LocalRedis(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis, namespace: str) -> str:
    """A Redis origin URL on the shared server whose keys no other test uses (a key prefix)."""
    return f"{redis_server.url}?prefix={namespace}:"


@pytest.fixture
def redis_private(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalRedis]:
    """A redis-server of this test's own, free to be killed or paused."""
    server = LocalRedis(tmp_path / "redis")
    server.start()
    yield server
    _dump_logs_if_failed(request, "redis", server.log_tail)
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for talking to sidecars."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def eventually(
    check: Callable[[], Any], *, timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Await ``check()`` (sync or async) until it returns a truthy value, or fail.

    For conditions that are reached through an event in another process (a
    watch firing, a session moving): a bounded wait with a clear message.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:g}s (last: {last!r})")


def cachectl(zk: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``cachectl`` CLI against ``zk``/``namespace``."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--zk", zk, "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cachectl_bytes(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``cachectl`` with raw arguments; output as bytes (for ``get``)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, timeout=60)


def member_ids(zk: str, namespace: str) -> set[str]:
    """Ids of the live members, as ``cachectl members --json`` reports them."""
    run = cachectl(zk, namespace, "members", "--json")
    assert run.returncode == 0, run.stderr
    return {m["member_id"] for m in json.loads(run.stdout)}


@asynccontextmanager
async def held_origin_put(
    http: aiohttp.ClientSession, upstream: str, key: str, *, before: bool = False
) -> AsyncIterator[Callable[[], Any]]:
    """Make the upstream hold the next PUT of ``key`` *after* storing it (``before``: before storing it).

    Yields ``until_held()``, which waits until a PUT is being held; the PUT is
    released when the block ends.
    """
    async with http.post(f"{upstream}/_control/hold-put/{key}" + ("?before=true" if before else "")):
        pass

    async def held() -> bool:
        async with http.get(f"{upstream}/_control/held/put:{key}") as resp:
            return bool((await resp.json())["held"])

    async def until_held() -> None:
        await eventually(held, what=f"an origin PUT of {key} being held after it was stored")

    try:
        yield until_held
    finally:
        async with http.post(f"{upstream}/_control/release/put:{key}"):
            pass
