"""cachectl, through click's CliRunner, against the real ZooKeeper."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from kazoo.client import KazooClient

from cli.main import cli
from sidecar.coordination.layout import Layout
from sidecar.dev import LocalZooKeeper, free_port


@pytest.fixture
def run(zk_server: LocalZooKeeper, namespace: str):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(cli, ["--zk", zk_server.hosts, "--namespace", namespace, *args], env=env)

    return invoke


def test_invalidate_publishes_without_any_sidecar(run, zk_server: LocalZooKeeper, namespace: str) -> None:  # type: ignore[no-untyped-def]
    result = run("invalidate", "a/1", "b", "--prefix", "a/", "--all")
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.output)
    assert set(receipt["keys"]) == {"a/1", "b"} and receipt["all"] is True
    layout = Layout(f"/zkcache/{namespace}")
    kz = KazooClient(hosts=zk_server.hosts)
    kz.start(10)
    try:
        _, stat = kz.get(layout.version_path("a/1"))
        assert stat.mzxid == receipt["keys"]["a/1"]
        assert any(n.startswith("a%2F~") for n in kz.get_children(layout.prefixes))
        assert kz.exists(layout.epoch).mzxid == receipt["epoch"]
    finally:
        kz.stop()
        kz.close()


def test_members_empty_namespace(run) -> None:  # type: ignore[no-untyped-def]
    result = run("members")
    assert result.exit_code == 0 and "no live sidecars" in result.output


def test_usage_errors_exit_2_with_one_line(run) -> None:  # type: ignore[no-untyped-def]
    result = run("invalidate")
    assert result.exit_code == 2 and "nothing to invalidate" in result.output
    result = CliRunner().invoke(cli, ["--zk", "not a host", "members"])
    assert result.exit_code == 2 and "--zk" in result.output
    result = run("invalidate", "x" * 2000)
    assert result.exit_code == 2 and "1024" in result.output


def test_unreachable_zookeeper_exits_3_with_one_line() -> None:
    result = CliRunner().invoke(cli, ["--zk", f"127.0.0.1:{free_port()}", "--timeout", "1", "members"])
    assert result.exit_code == 3
    assert result.output.strip().count("\n") == 0 and "could not connect to ZooKeeper" in result.output


def test_get_from_an_absent_sidecar_exits_3() -> None:
    result = CliRunner().invoke(cli, ["--sidecar", f"http://127.0.0.1:{free_port()}", "get", "k"])
    assert result.exit_code == 3 and "cannot reach the sidecar" in result.output


def test_env_vars_configure_the_cli(zk_server: LocalZooKeeper) -> None:
    result = CliRunner().invoke(cli, ["members"], env={"ZKCACHE_ZK": zk_server.hosts, "ZKCACHE_NAMESPACE": "envns"})
    assert result.exit_code == 0 and "'envns'" in result.output
