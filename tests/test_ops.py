"""What a deployment relies on: the probe port, ZooKeeper credentials, a bounded stop."""

from __future__ import annotations

import signal
import subprocess
import time

import aiohttp
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from harness import LocalZooKeeper, free_port
from sidecar.coordination import Layout
from tests.conftest import SidecarFactory, cachectl
from tests.test_coherence import get_hit, put

pytestmark = pytest.mark.slow


async def test_ops_listener_serves_probes_and_metrics_but_no_data(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    a = sidecars("a", auth_token="s3cret", ops_listen=f"127.0.0.1:{port}")
    ops = f"http://127.0.0.1:{port}"
    # No token needed on the ops port: it has nothing but probes and metrics.
    for path, status in [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/v1/keys/k", 404)]:
        async with http.get(ops + path) as resp:
            assert resp.status == status, f"ops {path}: {resp.status}"
    async with http.get(ops + "/metrics") as resp:
        assert "zkcache_" in await resp.text()
    # The API itself still wants the token.
    async with http.get(a.url + "/v1/stats") as resp:
        assert resp.status == 401


async def test_zk_auth_closes_the_namespace_to_other_identities(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, http: aiohttp.ClientSession
) -> None:
    auth = "digest:app:s3cret"
    a = sidecars("a", zk_auth=auth)
    await put(http, a.url, "k", b"v1")
    await get_hit(http, a.url, "k")

    path = Layout(f"/zkcache/{namespace}").version_path("k")
    owner = KazooClient(hosts=zk_server.hosts, auth_data=[("digest", "app:s3cret")])
    stranger = KazooClient(hosts=zk_server.hosts)
    for client in (owner, stranger):
        client.start(timeout=10)
    try:
        acls, _ = owner.get_acls(path)
        assert [(acl.id.scheme, acl.id.id.split(":")[0]) for acl in acls] == [("digest", "app")], acls
        with pytest.raises(NoAuthError):
            stranger.get(path)
        with pytest.raises(NoAuthError):
            stranger.set(path, b"")
    finally:
        for client in (owner, stranger):
            client.stop()
            client.close()

    # cachectl needs the same credentials; without them it fails in one line.
    denied = cachectl(zk_server.hosts, namespace, "invalidate", "k")
    assert denied.returncode != 0 and len(denied.stderr.strip().splitlines()) == 1, denied
    allowed = cachectl(zk_server.hosts, namespace, "--zk-auth", auth, "invalidate", "k")
    assert allowed.returncode == 0, allowed.stderr


def test_stop_is_bounded_when_zookeeper_hangs(zk_private: LocalZooKeeper, sidecars: SidecarFactory) -> None:
    # A frozen server (not a dead one) is the hard case: the socket stays open
    # and closing the session waits for an answer that never comes.
    a = sidecars("a", zk=zk_private.hosts, shutdown_timeout="2s", zk_session_timeout="10s")
    zk_private.pause()
    assert a.proc is not None
    started = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    try:
        code = a.proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sidecar still running 8s after SIGTERM with shutdown_timeout=2s:\n{a.log_tail()}")
    elapsed = time.monotonic() - started
    zk_private.resume()
    assert code == 0, a.log_tail()
    assert elapsed < 4.0, f"stop took {elapsed:.1f}s against a 2s bound"
