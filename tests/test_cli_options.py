"""cachectl's global options (before or after the command), its one-line errors, its completion.

In-process through click's CliRunner where that proves the point; as a real
process where stderr itself is the point (kazoo's log lines, tracebacks).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from harness import LocalZooKeeper, free_port
from tests.test_cli import join

CACHECTL = Path(sys.executable).parent / "cachectl"


@pytest.fixture
def joined(zk_server: LocalZooKeeper, namespace: str) -> str:
    """This test's namespace, laid out as a sidecar joining it would (none runs)."""
    return join(zk_server.hosts, namespace)


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, input=input, prog_name="cachectl")


def one_line(result: Result | subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr, which starts with 'cachectl: '."""
    err = result.stderr
    assert err.count("\n") == 1 and err.startswith("cachectl: ") and "Traceback" not in err, err
    return str(err)


# -- 1. global options after the command ----------------------------------------------
def test_global_options_work_after_the_command_and_win_over_the_groups_and_the_env(
    zk_server: LocalZooKeeper, joined: str
) -> None:
    hosts = zk_server.hosts
    # The issue's probe: "No such option '--zk'" before.
    result = invoke("invalidate", "k1", "--zk", hosts, "--namespace", joined)
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["keys"]) == ["k1"]
    # After the command wins over before it, which wins over the environment.
    env = {"ZKCACHE_ZK": f"127.0.0.1:{free_port()}", "ZKCACHE_NAMESPACE": "not-this-one"}
    result = invoke("--zk", "127.0.0.1:1", "invalidate", "k2", "--zk", hosts, "--namespace", joined, env=env)
    assert result.exit_code == 0, result.output
    result = invoke("--zk", hosts, "members", env=env | {"ZKCACHE_NAMESPACE": joined})
    assert result.exit_code == 0 and f"namespace '{joined}'" in result.stdout, result.output
    # Nested groups: before the group, between, after the leaf.
    for args in (
        ["config", "get", "--json", "--zk", hosts, "--namespace", joined],
        ["config", "--zk", hosts, "get", "--namespace", joined, "--json"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0 and json.loads(result.stdout) == {"settings": {}, "version": None}, result.output


COMMANDS = [["invalidate"], ["members"], ["stats"], ["watch"], ["doctor"], ["get"], ["put"]]
COMMANDS += [["config", "get"], ["config", "set"], ["config", "diff"], ["config"]]


def test_every_global_option_is_accepted_after_every_command_and_help_stays_short(tmp_path: Path) -> None:
    pem = str(tmp_path / "x.pem")
    every = ["--zk", "h:1", "--namespace", "n", "--zk-root", "/r", "--zk-auth", "digest:a:b", "--timeout", "2"]
    every += ["--sidecar", "http://h:1", "--auth-token", "t", "--zk-tls", "--no-zk-tls", "--zk-tls-ca", pem]
    every += ["--zk-tls-cert", pem, "--zk-tls-key", pem, "--zk-tls-verify", "--no-zk-tls-verify", "-v", "--verbose"]
    for command in COMMANDS:
        result = invoke(*command, *every, "--help")
        assert result.exit_code == 0, (command, result.output)
        help_text = result.stdout
        assert "Global options (here or before the command" in help_text, help_text
        assert "--zk-tls-verify, -v" in help_text and "--zk-tls-ca TEXT" not in help_text, help_text
    top = invoke("--help").stdout
    assert "Global options (before or after the command" in top and "--zk-tls-ca TEXT" in top, top


# -- 2. one line, exit 2 for bad usage or configuration ------------------------------
def test_the_issues_probe_bad_sidecar_url_is_one_line_and_exit_2() -> None:
    run = subprocess.run([CACHECTL, "--sidecar", "garbage", "get", "k"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    assert "'--sidecar': 'garbage' is not an http(s) URL" in one_line(run)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sidecar", "http://[::1", "get", "k"], "Invalid IPv6 URL"),
        (["get", "k", "--sidecar", "ftp://h"], "is not an http(s) URL"),
        (["--sidecar", "http://127.0.0.1:99999", "get", "k"], "out of range"),
        (["put", "k", "--file", "/nonexistent", "--sidecar", "http://h"], "'--file'"),
        (["--zk", "not a host", "members"], "'--zk'"),
        (["members", "--zk", "h:1//"], "bad chroot"),
        (["members", "--zk-root", "zkcache"], "'--zk-root': an absolute ZooKeeper path"),
        (["members", "--zk-root", "/zkcache/"], "'--zk-root'"),
        (["members", "--namespace", "a/b"], "'--namespace': 1-64 characters"),
        (["members", "--zk-auth", "nocolon"], "'--zk-auth': use scheme:credential"),
        (["members", "--zk-tls-ca", "/nonexistent.pem", "--zk-tls"], "'--zk-tls-ca': no readable file"),
        (["members", "--timeout", "0"], "'--timeout'"),
        (["members", "--nope"], "No such option"),
        (["invalidate", "x" * 2000], "1024"),
        (["invalidate"], "nothing to invalidate"),
        (["config", "set", "listen=0.0.0.0:80"], "not a live setting"),
        (["watch", "--count", "0"], "'--count'"),
    ],
)
def test_bad_usage_and_configuration_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in one_line(result)


def test_a_bad_key_file_names_its_line_and_exits_2(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("ok/1\n# a comment\n\n" + "y" * 1025 + "\n")
    result = invoke("invalidate", "--from-file", str(keys))
    assert result.exit_code == 2 and f"{keys}:4: key must be 1 to 1024 bytes" in one_line(result)
    keys.write_bytes(b"ok/1\n\xff\xfe\n")
    result = invoke("invalidate", "--from-file", str(keys))
    assert result.exit_code == 2 and f"{keys}:2: not UTF-8" in one_line(result)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_unreachable_things_are_one_line_and_exit_3(zk_server: LocalZooKeeper, silent_port: int) -> None:
    zk_host, zk_port = zk_server.hosts.split(":")
    cases = [
        (["--sidecar", f"http://127.0.0.1:{free_port()}", "get", "k"], "Connection refused"),
        (["--sidecar", f"http://{zk_host}:{zk_port}", "get", "k"], "cannot reach the sidecar"),  # not HTTP
        (["--sidecar", f"http://127.0.0.1:{silent_port}", "--timeout", "0.3", "get", "k"], "timed out"),
        (["put", "k", "--file", "-", "--sidecar", f"http://127.0.0.1:{free_port()}"], "Connection refused"),
        (["--zk", f"127.0.0.1:{free_port()}", "--timeout", "0.3", "invalidate", "k"], "could not connect"),
    ]
    for args, expected in cases:
        result = invoke(*args, input="v")
        assert result.exit_code == 3, (args, result.output)
        assert expected in one_line(result), args


def test_a_namespace_nobody_joined_is_refused_by_every_command_naming_those_that_exist(
    zk_server: LocalZooKeeper, joined: str
) -> None:
    typo = joined + "x"
    for command in (["invalidate", "k"], ["members"], ["stats"], ["watch", "--count", "1"], ["config", "get"]):
        result = invoke("--zk", zk_server.hosts, "--namespace", typo, *command)
        assert result.exit_code == 1, (command, result.output)
        line = one_line(result)
        assert f"namespace '{typo}' does not exist under /zkcache" in line and "namespaces there: " in line, line
        assert joined in line.partition("namespaces there: ")[2], line
    result = invoke("--zk", zk_server.hosts, "--namespace", typo, "--zk-root", "/elsewhere", "members")
    assert result.exit_code == 1 and "there are none under /elsewhere" in one_line(result)
    doctor = invoke("--zk", zk_server.hosts, "--namespace", typo, "doctor", "--json")
    assert doctor.exit_code == 1, doctor.output
    report = json.loads(doctor.stdout)
    assert report["ok"] is False and report["findings"][0]["problem"] is False, report
    assert any(f["problem"] and "does not exist" in f["text"] for f in report["findings"]), report


def test_kazoo_log_lines_reach_stderr_only_with_verbose() -> None:
    # A server that accepts and hangs up: kazoo logs every dropped connection, and reconnects.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        stop = threading.Event()

        def hang_up() -> None:
            sock.settimeout(0.05)
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        args = ["--zk", f"127.0.0.1:{sock.getsockname()[1]}", "--timeout", "0.5", "members"]
        quiet = subprocess.Popen([CACHECTL, *args], stderr=subprocess.PIPE, text=True)
        loud = subprocess.Popen([CACHECTL, *args, "-v"], stderr=subprocess.PIPE, text=True)
        quiet_err, loud_err = quiet.communicate(timeout=30)[1], loud.communicate(timeout=30)[1]
        stop.set()
        thread.join()
    assert quiet.returncode == 3 and loud.returncode == 3
    assert quiet_err.count("\n") == 1 and "could not connect to ZooKeeper" in quiet_err, quiet_err
    assert "kazoo.client: Connection dropped" in loud_err, loud_err


# -- 8. shell completion --------------------------------------------------------------
def test_shell_completion_completes_commands_and_options_after_them() -> None:
    script = subprocess.run(
        [CACHECTL], env={**os.environ, "_CACHECTL_COMPLETE": "bash_source"}, capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0 and "complete -o nosort -F _cachectl_completion cachectl" in script.stdout, script
    bash = shutil.which("bash")
    assert bash is not None
    # What bash does on <TAB>: the function the script defines asks cachectl.
    probe = script.stdout + (
        "COMPREPLY=(); COMP_WORDS=(cachectl inval); COMP_CWORD=1; _cachectl_completion cachectl\n"
        'echo "${COMPREPLY[*]}"\n'
        "COMPREPLY=(); COMP_WORDS=(cachectl invalidate --zk-r); COMP_CWORD=2; _cachectl_completion cachectl\n"
        'echo "${COMPREPLY[*]}"\n'
    )
    env = {**os.environ, "PATH": f"{CACHECTL.parent}:{os.environ['PATH']}"}
    out = subprocess.run([bash, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["invalidate", "--zk-root"], out
    zsh = invoke(env={"_CACHECTL_COMPLETE": "zsh_source"})
    assert zsh.exit_code == 0 and "#compdef cachectl" in zsh.stdout, zsh.output
