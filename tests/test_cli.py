"""cachectl, through click's CliRunner, against the real ZooKeeper."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from kazoo.client import KazooClient

from cli.main import cli
from harness import LocalEnsemble, LocalZooKeeper, free_port
from sidecar.coordination import ZkSession
from sidecar.coordination.layout import Layout
from sidecar.coordination.operations import ensure_layout
from tests.conftest import SidecarFactory, cachectl, eventually


def join(hosts: str, namespace: str) -> str:
    """Lay the namespace out as a sidecar joining it does (cachectl refuses a namespace nobody joined)."""

    async def lay_out() -> None:
        zk = ZkSession(hosts, 10.0)
        await zk.connect(10.0)
        try:
            await ensure_layout(zk, Layout(f"/zkcache/{namespace}"))
        finally:
            await zk.close()

    asyncio.run(lay_out())
    return namespace


@pytest.fixture
def joined(zk_server: LocalZooKeeper, namespace: str) -> str:
    """This test's namespace, laid out as if a sidecar had joined it (none runs)."""
    return join(zk_server.hosts, namespace)


@pytest.fixture
def run(zk_server: LocalZooKeeper, joined: str):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(cli, ["--zk", zk_server.hosts, "--namespace", joined, *args], env=env)

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


def test_env_vars_configure_the_cli(zk_server: LocalZooKeeper, joined: str) -> None:
    result = CliRunner().invoke(cli, ["members"], env={"ZKCACHE_ZK": zk_server.hosts, "ZKCACHE_NAMESPACE": joined})
    assert result.exit_code == 0 and f"no live sidecars in namespace '{joined}'" in result.output


# -- doctor -------------------------------------------------------------------


def test_doctor_reports_a_healthy_server_and_exits_0(zk_server: LocalZooKeeper, joined: str) -> None:
    namespace = joined
    out = cachectl(zk_server.hosts, namespace, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"ok {zk_server.hosts}: standalone, latency min/avg/max "), lines
    assert "znodes" in lines[0] and "watches" in lines[0]
    assert lines[1].startswith("ok ensemble: a standalone server"), lines
    assert lines[2:] == [
        f"ok namespace /zkcache/{namespace}: no leader: no sidecar stands, so nothing keeps ZooKeeper small",
        f"ok namespace /zkcache/{namespace}: no live sidecars",
    ]


async def test_doctor_names_the_leader_and_times_every_member_and_finds_one_that_does_not_apply(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str
) -> None:
    procs = [sidecars(name, housekeeping_interval="0.2s") for name in ("a", "b", "c")]
    await eventually(lambda: any(p.stats()["housekeeping"]["rounds"] for p in procs), what="the leader's first round")
    out = cachectl(zk_server.hosts, namespace, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    leader = next(p.name for p in procs if p.stats()["housekeeping"]["leader"])
    assert f"ok namespace /zkcache/{namespace}: leader {leader} (session 0x" in out.stdout, out.stdout
    assert "last housekeeping round" in out.stdout and "open, the oldest" in out.stdout
    for proc in procs:
        tag = " (leader)" if proc.name == leader else ""
        assert re.search(rf"^ok member {proc.name}{re.escape(tag)}: applied zxid 0x[0-9a-f]+ within \d+ ms$",
                         out.stdout, re.M), out.stdout  # fmt: skip
    frozen = next(p for p in procs if p.name != leader)
    frozen.pause()  # its session lives for a while, but it applies nothing
    try:
        out = cachectl(zk_server.hosts, namespace, "doctor")
    finally:
        frozen.resume()
    assert out.returncode == 1, out.stdout
    assert re.search(rf"^PROBLEM member {frozen.name}: did not confirm zxid 0x[0-9a-f]+ within 2s", out.stdout, re.M), (
        out.stdout
    )


def test_doctor_finds_a_session_timeout_the_servers_would_not_grant(zk_server: LocalZooKeeper, namespace: str) -> None:
    # The fixture's servers grant at most 60 s.
    out = cachectl(zk_server.hosts, namespace, "doctor", "--zk-session-timeout", "90s")
    assert out.returncode == 1, out.stdout
    expected = f"PROBLEM {zk_server.hosts}: maxSessionTimeout 60s is below the sidecars' zk_session_timeout 90s"
    assert expected in out.stdout


def test_doctor_finds_an_unreachable_server(zk_server: LocalZooKeeper, namespace: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    out = cachectl(f"{zk_server.hosts},{dead}", namespace, "doctor")
    assert out.returncode == 1, out.stdout
    assert f"PROBLEM {dead}: not reachable" in out.stdout
    assert f"ok {zk_server.hosts}: standalone" in out.stdout


def test_doctor_sees_an_ensemble_lose_its_quorum(tmp_path: Path, namespace: str) -> None:
    ensemble = LocalEnsemble(tmp_path / "zk")
    ensemble.start()
    try:
        join(ensemble.hosts, namespace)
        out = cachectl(ensemble.hosts, namespace, "doctor")
        assert out.returncode == 0, out.stdout
        assert "ok ensemble: 3 of 3 servers serve, one leader" in out.stdout.splitlines()
        leader = ensemble.leader()
        follower = next(s for s in ensemble.servers if s is not leader)
        leader.stop()
        follower.stop()
        out = cachectl(ensemble.hosts, namespace, "--timeout", "2", "doctor")
        assert out.returncode == 1, out.stdout
        assert f"PROBLEM {leader.hosts}: not reachable" in out.stdout
        assert f"PROBLEM namespace {namespace}: not checked: could not connect" in out.stdout
        assert "PROBLEM ensemble: no server of the connect string is leader" in out.stdout
    finally:
        ensemble.stop()


def test_doctor_finds_a_server_that_accepts_but_never_answers(zk_private: LocalZooKeeper, namespace: str) -> None:
    zk_private.pause()  # SIGSTOP: the kernel still accepts connections
    try:
        out = cachectl(zk_private.hosts, namespace, "--timeout", "1", "doctor")
    finally:
        zk_private.resume()
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"PROBLEM {zk_private.hosts}: no answer within 1s" in out.stdout, out.stdout
    assert f"PROBLEM namespace {namespace}: not checked" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr


async def test_doctor_reads_the_origin_the_members_report_and_finds_one_that_fails(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, namespace: str, upstream: str
) -> None:
    sidecars("a", origin=upstream + "/kv")
    out = cachectl(zk_server.hosts, namespace, "doctor")
    assert re.search(rf"^ok origin {re.escape(upstream)}/kv: answered a read in [\d.]+ ms$", out.stdout, re.M), (
        out.stdout
    )
    dead = f"http://127.0.0.1:{free_port()}/kv"
    out = cachectl(zk_server.hosts, namespace, "doctor", "--origin", dead)
    assert out.returncode == 1, out.stdout
    assert f"PROBLEM origin {dead}: a read failed" in out.stdout, out.stdout
