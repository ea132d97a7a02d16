"""``cachectl``: operate a zk-cache-sidecar fleet.

``invalidate`` and ``members`` talk to ZooKeeper directly through the
coordination layer, so they work with no sidecar running.  ``get`` and ``put``
go through a sidecar's HTTP API.  Errors end with one line on stderr and an
exit status chosen in one place (:func:`_exit_code`):

    0 success · 1 operation failed · 2 usage error · 3 ZooKeeper or sidecar unreachable
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import click

from sidecar.config import LIVE_SETTINGS, load_config, parse_duration, parse_zk_auth, parse_zk_hosts
from sidecar.coordination import (
    InvalidationReceipt,
    Layout,
    LiveConfigChange,
    ZkSession,
    await_acknowledgement,
    list_members,
    publish_invalidation,
    read_live_config,
    update_live_config,
    validate_key,
)
from sidecar.coordination.health import Finding, check_ensemble, check_namespace, check_origin
from sidecar.errors import ConfigError, CoordinationError, SidecarError

__all__ = ["main"]

T = TypeVar("T")
_ENV = "ZKCACHE"


class Unreachable(SidecarError):
    """The sidecar's HTTP API could not be reached."""


def _exit_code(exc: SidecarError) -> int:
    if isinstance(exc, (CoordinationError, Unreachable)):
        return 3
    return 1


def _fail(exc: SidecarError) -> None:
    click.echo(f"cachectl: {exc.detail}", err=True)
    sys.exit(_exit_code(exc))


def _check_zk(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return parse_zk_hosts(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_zk_auth(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else parse_zk_auth(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for key in value:
        try:
            validate_key(key)
        except SidecarError as exc:
            raise click.BadParameter(f"{key[:40]!r}: {exc.detail}") from None
    return value


async def _with_zk(obj: dict[str, Any], action: Callable[[ZkSession, Layout], Awaitable[T]]) -> T:
    timeout = obj["timeout"]
    zk = ZkSession(obj["zk"], max(timeout, 4.0), op_timeout=timeout, auth=obj["zk_auth"], tls=obj["tls"])
    await zk.connect(obj["timeout"])
    try:
        return await action(zk, Layout(f"{obj['zk_root']}/{obj['namespace']}"))
    finally:
        await zk.close()


def _run_zk(obj: dict[str, Any], action: Callable[[ZkSession, Layout], Awaitable[T]]) -> T:
    try:
        return asyncio.run(_with_zk(obj, action))
    except SidecarError as exc:
        _fail(exc)
        raise AssertionError("unreachable") from exc


@click.group(context_settings={"auto_envvar_prefix": _ENV, "help_option_names": ["-h", "--help"]})
@click.option(
    "--zk",
    default="127.0.0.1:2181",
    show_default=True,
    callback=_check_zk,
    help="ZooKeeper connect string (env ZKCACHE_ZK).",
)
@click.option("--namespace", default="default", show_default=True, help="Cache namespace (env ZKCACHE_NAMESPACE).")
@click.option("--zk-root", default="/zkcache", show_default=True, help="Root znode (env ZKCACHE_ZK_ROOT).")
@click.option(
    "--zk-auth",
    default=None,
    callback=_check_zk_auth,
    help="ZooKeeper credentials scheme:credential, as the sidecars use (env ZKCACHE_ZK_AUTH).",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for ZooKeeper or the sidecar.",
)
@click.option(
    "--sidecar",
    default="http://127.0.0.1:7070",
    show_default=True,
    help="Sidecar base URL for get/put (env ZKCACHE_SIDECAR).",
)
@click.option("--auth-token", default=None, help="Bearer token of the sidecar API (env ZKCACHE_AUTH_TOKEN).")
@click.option("--zk-tls/--no-zk-tls", default=False, help="TLS to ZooKeeper, as zk_tls (env ZKCACHE_ZK_TLS).")
@click.option("--zk-tls-ca", default=None, help="PEM CA bundle of ZooKeeper's certificate (env ZKCACHE_ZK_TLS_CA).")
@click.option("--zk-tls-cert", default=None, help="PEM client certificate (env ZKCACHE_ZK_TLS_CERT).")
@click.option("--zk-tls-key", default=None, help="PEM key of --zk-tls-cert (env ZKCACHE_ZK_TLS_KEY).")
@click.option(
    "--zk-tls-verify/--no-zk-tls-verify",
    default=True,
    help="Verify ZooKeeper's certificate and host name (env ZKCACHE_ZK_TLS_VERIFY).",
)
@click.version_option(package_name="zk-cache-sidecar", prog_name="cachectl")
@click.pass_context
def cli(
    ctx: click.Context,
    zk: str,
    namespace: str,
    zk_root: str,
    zk_auth: str | None,
    timeout: float,
    sidecar: str,
    auth_token: str | None,
    zk_tls: bool,
    zk_tls_ca: str | None,
    zk_tls_cert: str | None,
    zk_tls_key: str | None,
    zk_tls_verify: bool,
) -> None:
    """Operate a zk-cache-sidecar fleet."""
    given = {"zk_tls": zk_tls, "zk_tls_ca": zk_tls_ca, "zk_tls_cert": zk_tls_cert, "zk_tls_key": zk_tls_key}
    try:  # the daemon's own parsers and checks of the same settings
        tls = load_config({**given, "zk_tls_verify": zk_tls_verify}, env={}).zk_tls_settings
    except ConfigError as exc:
        raise click.BadParameter(exc.detail.removeprefix("setting "), param_hint="--zk-tls") from None
    ctx.obj = {
        "tls": tls,
        "zk": zk,
        "namespace": namespace,
        "zk_root": zk_root.rstrip("/"),
        "zk_auth": zk_auth,
        "timeout": timeout,
        "sidecar": sidecar.rstrip("/"),
        "auth_token": auth_token,
    }


@cli.command()
@click.argument("keys", nargs=-1, callback=_check_keys)
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    callback=_check_keys,
    help="Invalidate every key starting with this (repeatable).",
)
@click.option("--all", "everything", is_flag=True, help="Invalidate every key of the namespace.")
@click.option("--wait", is_flag=True, help="Return only when every live sidecar confirmed it applied this.")
@click.option(
    "--wait-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=300),
    help="Seconds --wait waits before naming the sidecars that did not confirm.",
)
@click.pass_obj
def invalidate(
    obj: dict[str, Any],
    keys: tuple[str, ...],
    prefixes: tuple[str, ...],
    everything: bool,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Drop KEYS (and prefixes, or everything) from every sidecar's cache.

    The origin is not touched. Prints what was published as JSON. With --wait,
    exits 1 naming the sidecars that did not confirm in time.
    """
    if not keys and not prefixes and not everything:
        raise click.UsageError("nothing to invalidate: give KEYS, --prefix or --all")

    async def action(zk: ZkSession, layout: Layout) -> InvalidationReceipt:
        receipt = await publish_invalidation(
            zk, layout, keys=list(keys), prefixes=list(prefixes), everything=everything, by="cachectl"
        )
        if wait:
            receipt.ack = await await_acknowledgement(zk, layout, receipt.zxid, wait_timeout)
        return receipt

    receipt = _run_zk(obj, action)
    click.echo(json.dumps(receipt.as_json()))
    if receipt.ack is not None and not receipt.ack.complete:
        _fail(SidecarError(f"not confirmed within {wait_timeout:g}s by: {', '.join(receipt.ack.missing)}"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def members(obj: dict[str, Any], as_json: bool) -> None:
    """List the live sidecars of the namespace."""
    found = _run_zk(obj, lambda zk, layout: list_members(zk, layout, with_leader=True))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no live sidecars in namespace {obj['namespace']!r}")
        return
    click.echo(f"{'MEMBER':<32} {'ADDRESS':<24} {'SESSION':<20} VERSION")
    for m in found:
        name = f"{m.get('member_id', '?')}{' (leader)' if m.get('leader') else ''}"
        click.echo(f"{name:<32} {m.get('address', '?'):<24} {m.get('session', '?'):<20} {m.get('version', '?')}")
    if not any(m.get("leader") for m in found):
        click.echo("no leader: no live sidecar stands for housekeeping")


def _check_duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option(
    "--zk-session-timeout",
    default="10s",
    show_default=True,
    envvar="ZKCACHE_ZK_SESSION_TIMEOUT",
    callback=_check_duration,
    help="The sidecars' zk_session_timeout, checked against each server's maxSessionTimeout.",
)
@click.option(
    "--origin",
    default=None,
    envvar="ZKCACHE_ORIGIN",
    help="The sidecars' origin, read once to check it (default: the http(s) or redis origin every member reports).",
)
@click.pass_obj
def doctor(obj: dict[str, Any], zk_session_timeout: float, origin: str | None) -> None:
    """Check every ZooKeeper server of --zk, the namespace, the origin: one line per finding; exit 1 on any problem.

    The namespace part names the leader and its last housekeeping round, and
    times every member's confirmation of a fresh zxid (as invalidate --wait).
    """
    findings = check_ensemble(obj["zk"], zk_session_timeout, timeout=min(obj["timeout"], 5.0), tls=obj["tls"])
    for finding in findings:
        click.echo(str(finding))
    members: list[dict[str, Any]] = []

    async def namespace_part(zk: ZkSession, layout: Layout) -> list[Finding]:
        members.extend(await list_members(zk, layout))
        return await check_namespace(zk, layout)

    try:
        namespace = asyncio.run(_with_zk(obj, namespace_part))
    except SidecarError as exc:
        namespace = [Finding(f"namespace {obj['namespace']}", f"not checked: {exc.detail}", True)]
    reported = {str(m.get("origin", "")) for m in members}
    # A URL the members report can be checked from here (credentials are never reported, TLS
    # options neither: rediss:// needs --origin).
    checkable = ("http://", "https://", "redis://", "redis+sentinel://")
    if origin is None and len(reported) == 1 and next(iter(reported)).startswith(checkable):
        origin = next(iter(reported))
    if origin is not None:
        namespace += asyncio.run(check_origin(origin, timeout=min(obj["timeout"], 5.0)))
    elif members:
        namespace.append(Finding("origin", f"not checked: members report {sorted(reported)}; pass --origin URL"))
    for finding in namespace:
        click.echo(str(finding))
    if any(f.problem for f in [*findings, *namespace]):
        sys.exit(1)


# -- live settings -----------------------------------------------------------------
def _check_assignments(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in value:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: use NAME=VALUE, e.g. ttl=30s")
        if name not in LIVE_SETTINGS:
            raise click.BadParameter(f"{name!r} is not a live setting (live: {', '.join(LIVE_SETTINGS)})")
        settings[name] = raw
    return settings


def _check_unset(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    # Any name: also one a hand edit (or a newer cachectl) left in the znode, which no sidecar accepts.
    for name in value:
        if not name.strip():
            raise click.BadParameter("an empty setting name")
    return list(value)


def _show_change(change: LiveConfigChange, as_json: bool) -> None:
    if as_json:
        rows = [{"setting": n, "before": b, "after": a} for n, b, a in change.changes]
        click.echo(json.dumps({"changes": rows, "settings": change.after, "version": change.version}))
        return
    if not change.changes:
        click.echo("unchanged")
    for name, before, after in change.changes:
        click.echo(f"{name}: {'(unset)' if before is None else before} -> {'(unset)' if after is None else after}")


def _change_config(
    obj: dict[str, Any], settings: dict[str, str], unset: list[str], *, write: bool, replace: bool = False
) -> LiveConfigChange:
    if not settings and not unset and not replace:
        raise click.UsageError("nothing to change: give NAME=VALUE or --unset NAME")

    def action(zk: ZkSession, layout: Layout) -> Awaitable[LiveConfigChange]:
        return update_live_config(zk, layout, settings, unset, write=write, replace=replace)

    try:
        return asyncio.run(_with_zk(obj, action))
    except ConfigError as exc:
        click.echo(f"cachectl: {exc.detail}", err=True)
        sys.exit(2)
    except SidecarError as exc:
        _fail(exc)
    raise AssertionError("unreachable")


@cli.group()
def config() -> None:
    """Live settings of the namespace: a znode every sidecar watches and applies within milliseconds.

    The znode wins over the sidecars' flags, environment and files for the
    settings it holds; --unset brings each sidecar's own value back. A
    sidecar that finds the whole invalid keeps its settings and says so in
    /readyz and /metrics (zkcache_config_valid).
    """


@config.command("get")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config_get(obj: dict[str, Any], as_json: bool) -> None:
    """Print the live settings the namespace's config znode holds."""
    settings, version = _run_zk(obj, read_live_config)
    if as_json:
        click.echo(json.dumps({"settings": settings, "version": version}))
    elif not settings:
        click.echo("no live settings: every sidecar uses its own")
    else:
        for name in sorted(settings):
            click.echo(f"{name} = {settings[name]}")


_SETTINGS = click.argument("settings", nargs=-1, callback=_check_assignments)
_UNSET = click.option("--unset", multiple=True, callback=_check_unset, help="Remove this setting (repeatable).")


@config.command("set")
@_SETTINGS
@_UNSET
@click.option("--replace", is_flag=True, help="Hold exactly these settings afterwards, whatever the znode held.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config_set(obj: dict[str, Any], settings: dict[str, str], unset: list[str], replace: bool, as_json: bool) -> None:
    """Set live settings NAME=VALUE (checked by the sidecar's own parsers) and print what changed.

    Written with a version check: a concurrent change by someone else is
    merged, never overwritten. --replace drops everything else (also what a
    hand edit left that no sidecar reads; with no NAME=VALUE: nothing stays).
    """
    _show_change(_change_config(obj, settings, unset, write=True, replace=replace), as_json)


@config.command("diff")
@_SETTINGS
@_UNSET
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config_diff(obj: dict[str, Any], settings: dict[str, str], unset: list[str], as_json: bool) -> None:
    """Print what `config set` with these arguments would change; write nothing."""
    _show_change(_change_config(obj, settings, unset, write=False), as_json)


def _http(
    obj: dict[str, Any], method: str, key: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    url = f"{obj['sidecar']}/v1/keys/{quote(key, safe='')}"
    headers = dict(headers or {})
    if obj["auth_token"]:
        headers["Authorization"] = f"Bearer {obj['auth_token']}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=obj["timeout"]) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            detail = json.loads(payload).get("detail", err.reason)
        except ValueError:
            detail = err.reason
        _fail(SidecarError(f"{method} {key}: {err.code} {detail}"))
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        _fail(Unreachable(f"cannot reach the sidecar at {obj['sidecar']}: {reason}"))
    raise AssertionError("unreachable")


@cli.command()
@click.argument("key", callback=lambda c, p, v: _check_keys(c, p, (v,))[0])
@click.option("--etag", is_flag=True, help="Print the ETag on stderr.")
@click.pass_obj
def get(obj: dict[str, Any], key: str, etag: bool) -> None:
    """Print KEY's value (raw bytes) through the sidecar."""
    _, headers, body = _http(obj, "GET", key)
    if etag:
        click.echo(f"ETag: {headers.get('ETag')} X-Cache: {headers.get('X-Cache')}", err=True)
    sys.stdout.buffer.write(body)
    sys.stdout.buffer.flush()


@cli.command()
@click.argument("key", callback=lambda c, p, v: _check_keys(c, p, (v,))[0])
@click.option("--file", "source", type=click.File("rb"), required=True, help="File with the value ('-' for stdin).")
@click.option("--content-type", default="application/octet-stream", show_default=True)
@click.option("--if-match", default=None, help="Only write if the current version is this.")
@click.pass_obj
def put(obj: dict[str, Any], key: str, source: Any, content_type: str, if_match: str | None) -> None:
    """Write KEY through the sidecar (origin, then fleet-wide invalidation)."""
    headers = {"Content-Type": content_type}
    if if_match:
        headers["If-Match"] = if_match if if_match.startswith('"') else f'"{if_match}"'
    _, _, body = _http(obj, "PUT", key, source.read(), headers)
    click.echo(body.decode())


def main() -> None:
    """Entry point of the ``cachectl`` console script."""
    # kazoo logs every failed connection attempt (a stopped server of the
    # connect string) at WARNING; the findings already say it, once.
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    cli()


if __name__ == "__main__":
    main()
