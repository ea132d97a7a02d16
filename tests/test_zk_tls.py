"""TLS to ZooKeeper against a real secure client port (Netty, ssl.clientAuth=need) and real sidecars.

Certificates are made by trustme for each test session (tests/conftest.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from harness import LocalZooKeeper, SidecarProcess
from sidecar.coordination.tls import diagnose
from tests.conftest import SidecarFactory, TlsFiles, eventually

pytestmark = pytest.mark.slow


def _tls_settings(files: TlsFiles, **overrides: str) -> dict[str, str]:
    return {"zk_tls": "true", "zk_tls_ca": files.ca, "zk_tls_cert": files.cert, "zk_tls_key": files.key, **overrides}


def _cachectl(zk: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--zk", zk, "--timeout", "3", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _tls_flags(files: TlsFiles, ca: str | None = None, client_cert: bool = True) -> list[str]:
    flags = ["--zk-tls", "--zk-tls-ca", ca or files.ca]
    if client_cert:
        flags += ["--zk-tls-cert", files.cert, "--zk-tls-key", files.key]
    return flags


async def test_sidecars_over_tls_stay_coherent_and_digest_acls_hold(
    zk_tls: tuple[LocalZooKeeper, TlsFiles], sidecars: SidecarFactory, namespace: str, http: aiohttp.ClientSession
) -> None:
    zk, files = zk_tls
    common = {"zk": zk.secure_hosts, "zk_auth": "digest:app:s3cret", **_tls_settings(files)}
    a, b = sidecars("a", **common), sidecars("b", **common)
    async with http.put(f"{a.url}/v1/keys/k", data=b"one") as resp:
        assert resp.status < 300
    async with http.get(f"{b.url}/v1/keys/k") as resp:
        assert await resp.read() == b"one"
    async with http.put(f"{a.url}/v1/keys/k", data=b"two") as resp:
        assert resp.status < 300

    async def b_has_two() -> bool:
        async with http.get(f"{b.url}/v1/keys/k") as resp:
            return await resp.read() == b"two"

    await eventually(b_has_two, what="b dropping its entry on the watch event that came over TLS")

    member = f"/zkcache/{namespace}/members/a"
    # Both present another client certificate: the sidecars' own would pass as their x509 identity.
    tls = {"use_ssl": True, "ca": files.ca, "certfile": files.stranger_cert, "keyfile": files.stranger_key}
    stranger = KazooClient(hosts=zk.secure_hosts, check_hostname=True, **tls)
    friend = KazooClient(hosts=zk.secure_hosts, check_hostname=True, auth_data=[("digest", "app:s3cret")], **tls)
    for client in (stranger, friend):
        client.start(10)
    try:
        with pytest.raises(NoAuthError):
            stranger.get(member)
        assert friend.get(member)[0], "the same identity reads what the sidecar created"
    finally:
        for client in (stranger, friend):
            client.stop()
            client.close()
    members = _cachectl(
        zk.secure_hosts, "--namespace", namespace, "--zk-auth", "digest:app:s3cret", *_tls_flags(files), "members"
    )
    assert members.returncode == 0 and "a " in members.stdout, members


async def test_a_sidecar_that_does_not_trust_the_server_says_so(
    zk_tls: tuple[LocalZooKeeper, TlsFiles], sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    zk, files = zk_tls
    sc = sidecars("a", wait_ready=False, zk=zk.secure_hosts, **_tls_settings(files, zk_tls_ca=files.other_ca))

    async def says_why() -> str | None:
        try:
            async with http.get(f"{sc.url}/readyz") as resp:
                detail = (await resp.json())["detail"]
                return detail if resp.status == 503 and "not trusted" in detail else None
        except aiohttp.ClientError:
            return None  # not listening yet

    detail = await eventually(says_why, timeout=20, what="/readyz naming the untrusted certificate")
    assert files.other_ca in detail, detail
    assert "cannot reach ZooKeeper" in sc.log_tail() and "not trusted" in sc.log_tail()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown CA", "certificate is not trusted by zk_tls_ca"),
        ("no client certificate", "requires a client certificate: set zk_tls_cert and zk_tls_key"),
        ("TLS to a plaintext port", "is a plaintext port, not a TLS one"),
        ("plaintext to a TLS port", "is a TLS port (secureClientPort): set zk_tls"),
    ],
)
def test_cachectl_names_what_is_wrong_with_the_tls_connection_in_one_line(
    zk_tls: tuple[LocalZooKeeper, TlsFiles], case: str, expected: str
) -> None:
    zk, files = zk_tls
    args = {
        "unknown CA": (zk.secure_hosts, _tls_flags(files, ca=files.other_ca)),
        "no client certificate": (zk.secure_hosts, _tls_flags(files, client_cert=False)),
        "TLS to a plaintext port": (zk.hosts, _tls_flags(files)),
        "plaintext to a TLS port": (zk.secure_hosts, []),
    }[case]
    run = _cachectl(args[0], *args[1], "members")
    assert run.returncode == 3, run
    assert expected in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_doctor_speaks_tls_to_a_secure_port(zk_tls: tuple[LocalZooKeeper, TlsFiles]) -> None:
    zk, files = zk_tls
    run = _cachectl(zk.secure_hosts, *_tls_flags(files), "doctor")
    assert "ok 127.0.0.1:" in run.stdout and "standalone" in run.stdout, run.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--zk-tls-cert", "/etc/hostname"], "set zk_tls to use it"),
        (["--zk-tls", "--zk-tls-cert", "/etc/hostname"], "give zk_tls_cert and zk_tls_key together"),
        (["--zk-tls", "--zk-tls-ca", "/nonexistent.pem"], "no readable file"),
        (["--zk-tls", "--zk-tls-ca", "/etc/hostname"], "cannot load the TLS files"),
    ],
)
def test_bad_tls_settings_are_one_line_usage_errors(flags: list[str], message: str) -> None:
    run = _cachectl("127.0.0.1:1", *flags, "members")
    assert run.returncode == 2 and message in run.stderr, run.stderr
    daemon = subprocess.run(
        [sys.executable, "-m", "sidecar", *["--zk-tls=true" if f == "--zk-tls" else f for f in flags]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert daemon.returncode == 2 and message in daemon.stderr and daemon.stderr.count("\n") == 1, daemon.stderr


@pytest.fixture
def silent_servers() -> Iterator[str]:
    """A connect string of three servers that accept connections and never answer (paused JVMs)."""
    socks = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        socks.append(sock)
    yield ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks)
    for sock in socks:
        sock.close()


def test_cachectl_keeps_to_its_timeout_when_no_server_answers(
    zk_tls: tuple[LocalZooKeeper, TlsFiles], silent_servers: str
) -> None:
    """The diagnosis probed each server for twice its own 3 s, one after another: 22 s for --timeout 2."""
    _, files = zk_tls
    began = time.monotonic()
    run = _cachectl(silent_servers, *_tls_flags(files), "members")  # --timeout 3
    elapsed = time.monotonic() - began
    assert run.returncode == 3 and "did not complete the TLS handshake within" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1
    assert elapsed < 3 + 3 + 3, f"--timeout 3 took {elapsed:.1f}s"  # connect, diagnosis budget, process start


def test_a_sidecar_stops_promptly_while_probing_servers_that_never_answer(
    zk_tls: tuple[LocalZooKeeper, TlsFiles], silent_servers: str, tmp_path: Path
) -> None:
    """A probe ran on asyncio's executor, which asyncio.run waits for at exit: SIGTERM took 18 s."""
    _, files = zk_tls
    sc = SidecarProcess(
        tmp_path, "prober", {"zk": silent_servers, "shutdown_timeout": "2s", "origin": "none", **_tls_settings(files)}
    )
    sc.start(wait_ready=False)
    try:
        time.sleep(3.0)  # the first probe starts 2 s after the start
        assert sc.proc is not None
        began = time.monotonic()
        sc.proc.terminate()
        sc.proc.wait(30)
        elapsed = time.monotonic() - began
        assert elapsed < 2 + 2, f"stopping took {elapsed:.1f}s with shutdown_timeout 2s"
    finally:
        sc.stop()


def test_a_server_that_never_answers_is_named_so(silent_servers: str) -> None:
    host, _, port = silent_servers.split(",")[0].rpartition(":")
    problem = diagnose(host, int(port), None, 0.3)
    assert problem is not None and "did not answer within 0.3s" in problem, problem
