"""Configuration: layering, parsing, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import load_config, parse_duration, parse_size, settings_help, unknown_env_names
from sidecar.errors import ConfigError


def test_defaults_are_loopback_and_sqlite() -> None:
    cfg = load_config({}, env={})
    assert str(cfg.listen) == "127.0.0.1:7070" and cfg.listen.is_loopback
    assert cfg.origin == "sqlite:///./zkcache.db"
    assert cfg.namespace_root == "/zkcache/default"
    assert cfg.max_value_bytes == 1024**2
    assert cfg.effective_suspended_grace == pytest.approx(cfg.zk_session_timeout / 3)


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[sidecar]\nmax_entries = 5\nnamespace = "fromfile"\nttl = "30s"\n')
    env = {"ZKCACHE_MAX_ENTRIES": "6", "ZKCACHE_CONFIG": str(f)}
    cfg = load_config({"max_entries": "7"}, env=env)
    assert (cfg.max_entries, cfg.namespace, cfg.ttl) == (7, "fromfile", 30.0)
    assert load_config({}, env=env).max_entries == 6


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_bytes": "-1"}, "setting 'max_bytes'"),
        ({"max_entries": "0"}, "setting 'max_entries': must be a positive integer"),
        ({"zk": "nohost"}, "setting 'zk'"),
        ({"origin": "ftp://x"}, "setting 'origin': unsupported origin 'ftp://x'"),
        ({"listen": "0.0.0.0:7070"}, "setting 'listen': 0.0.0.0:7070 is not a loopback address"),
        ({"namespace": "a/b"}, "setting 'namespace'"),
        ({"ttl": "soon"}, "setting 'ttl': not a duration"),
        ({"max_value_bytes": "2GiB"}, "setting 'max_value_bytes'"),
        ({"suspended_reads": "maybe"}, "setting 'suspended_reads'"),
        ({"suspended_grace": "4s"}, "setting 'suspended_grace': must not exceed a third"),
    ],
)
def test_invalid_settings_name_the_setting(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(flags, env={})
    assert message in err.value.detail
    assert "\n" not in err.value.detail


def test_wider_listen_is_allowed_with_a_token() -> None:
    cfg = load_config({"listen": "0.0.0.0:7070", "auth_token": "s3cret"}, env={})
    assert not cfg.listen.is_loopback


def test_unix_socket_listen() -> None:
    cfg = load_config({"listen": "unix:/tmp/zk.sock"}, env={})
    assert cfg.listen.unix_path == "/tmp/zk.sock" and cfg.listen.is_loopback


def test_units() -> None:
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size("10") == 10
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120


def test_every_setting_has_an_env_var_and_help() -> None:
    rows = settings_help()
    assert all(env.startswith("ZKCACHE_") and help_ for _, env, _, help_ in rows)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--max-bytes", "lots"], {}, "setting 'max_bytes': not a size"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        ([], {"ZKCACHE_LISTEN": "10.1.2.3:80"}, "setting 'listen'"),
        (["--config", "/nonexistent.toml"], {}, "setting 'config': cannot read"),
    ],
)
def test_daemon_exits_2_with_one_line(argv: list[str], env: dict[str, str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_kubernetes_quantities_and_new_deployment_settings() -> None:
    assert parse_size("64Mi") == parse_size("64MiB") == 64 * 1024**2
    cfg = load_config({"ops_listen": "0.0.0.0:7071", "zk_auth": "digest:app:pw", "shutdown_timeout": "3s"}, env={})
    assert cfg.ops_listen is not None and str(cfg.ops_listen) == "0.0.0.0:7071"
    assert cfg.shutdown_timeout == 3.0
    # Secrets stay out of repr (and so out of any log line that prints a Config).
    assert "digest:app:pw" not in repr(load_config({"zk_auth": "digest:app:pw", "auth_token": "t0ken"}, env={}))
    assert "t0ken" not in repr(load_config({"auth_token": "t0ken"}, env={}))
    assert load_config({"ops_listen": ""}, env={}).ops_listen is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ops_listen": "127.0.0.1:7070"}, "setting 'ops_listen': 127.0.0.1:7070 overlaps the API address"),
        ({"ops_listen": "0.0.0.0:7070"}, "setting 'ops_listen': 0.0.0.0:7070 overlaps the API address"),
        ({"zk_auth": "digest"}, "setting 'zk_auth': use scheme:credential"),
        ({"shutdown_timeout": "0s"}, "setting 'shutdown_timeout': must be greater than zero"),
    ],
)
def test_invalid_deployment_settings(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(flags, env={})
    assert message in err.value.detail


def test_unknown_zkcache_variables_are_reported() -> None:
    env = {"ZKCACHE_MAX_ENTRIEZ": "5", "ZKCACHE_MAX_ENTRIES": "5", "ZKCACHE_CONFIG": "x", "ZKCACHE_SIDECAR": "y"}
    assert unknown_env_names(env) == ["ZKCACHE_MAX_ENTRIEZ"]
