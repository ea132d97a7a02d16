"""``cachectl``: operate a zk-cache-sidecar fleet.

``invalidate``, ``members``, ``watch``, ``config`` and ``doctor`` talk to
ZooKeeper directly through the coordination layer, so they work with no
sidecar running (in a namespace sidecars joined: another is refused, with the
namespaces that exist).  ``stats`` asks every live member over HTTP; ``get``
and ``put`` go through one sidecar's HTTP API.  Global options go before or
after the command (:mod:`cli.options`).  Errors end with one line on stderr
and an exit status chosen in one place (:func:`cli.options.exit_code`):

    0 success · 1 operation failed · 2 usage or configuration error · 3 ZooKeeper or sidecar unreachable
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import click

from sidecar.config import LIVE_SETTINGS, parse_duration
from sidecar.coordination import (
    InvalidationReceipt,
    Layout,
    LiveConfigChange,
    ZkSession,
    ZkState,
    await_acknowledgement,
    list_members,
    publish_invalidation,
    read_live_config,
    update_live_config,
    validate_key,
)
from sidecar.errors import SidecarError

from .options import CachectlGroup, Settings, fail, global_options, settings, start_logging
from .sidecar_http import key_request, member_stats
from .watch import Event, Watch

__all__ = ["cli", "main"]

T = TypeVar("T")
_ENV = "ZKCACHE"
# Most keys per publish_invalidation call: the per-request limit of POST /v1/invalidate.
INVALIDATE_BATCH = 1000
# A batch publishes one key at a time (a few round trips each, writes among
# them), and ZooKeeper answers a session's requests in order, a read waiting
# for the writes before it: batches run side by side over a few sessions.
INVALIDATE_SESSIONS = 4
INVALIDATE_WORKERS_PER_SESSION = 4
_LISTED_NAMESPACES = 20


class NamespaceMissing(SidecarError):
    """The namespace was never joined by a sidecar (most likely a typo)."""


def _zk_settings(ctx: click.Context) -> Settings:
    s = settings(ctx)
    start_logging(ctx)
    return s


def _check_keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for key in value:
        try:
            validate_key(key)
        except SidecarError as exc:
            raise click.BadParameter(f"{key[:40]!r}: {exc.detail}") from None
    return value


async def _namespaces(zk: ZkSession, root: str) -> list[str] | None:
    """Namespaces under ``root`` that sidecars joined (their ``layout`` znode), or None if unreadable."""
    try:
        if await zk.exists(root) is None:
            return []
        names = sorted(await zk.get_children(root))[:200]
        found = await zk.call_all(*((zk.client.exists_async(Layout(f"{root}/{n}").layout), "exists") for n in names))
    except Exception:  # access denied, or gone: the list is a courtesy
        return None
    return [name for name, stat in zip(names, found, strict=True) if stat is not None]


async def require_namespace(zk: ZkSession, s: Settings, layout: Layout) -> None:
    """Raise :class:`NamespaceMissing` unless a sidecar joined the namespace (it wrote the layout znode)."""
    if await zk.exists(layout.layout) is not None:
        return
    what = f"namespace {s.namespace!r} does not exist under {s.zk_root}"
    if await zk.exists(layout.root) is not None:
        what += " (the znode exists, but no sidecar of this version ever joined it)"
    else:
        what += " (no sidecar ever joined it)"
    found = await _namespaces(zk, s.zk_root)
    if found:
        shown = ", ".join(found[:_LISTED_NAMESPACES])
        more = f" and {len(found) - _LISTED_NAMESPACES} more" if len(found) > _LISTED_NAMESPACES else ""
        what += f"; namespaces there: {shown}{more}"
    elif found == []:
        what += f"; there are none under {s.zk_root}"
    raise NamespaceMissing(what)


async def _with_zk(
    s: Settings,
    action: Callable[[ZkSession, Layout], Awaitable[T]],
    *,
    namespace: bool = True,
    on_state: Callable[[ZkState], None] | None = None,
) -> T:
    zk = _session(s, on_state)
    await zk.connect(s.timeout)
    try:
        layout = Layout(s.namespace_root)
        if namespace:
            await require_namespace(zk, s, layout)
        return await action(zk, layout)
    finally:
        await zk.close(timeout=s.timeout)


def _run_zk(s: Settings, action: Callable[[ZkSession, Layout], Awaitable[T]], **kwargs: Any) -> T:
    try:
        return asyncio.run(_with_zk(s, action, **kwargs))
    except SidecarError as exc:
        fail(exc)


def _echo_json(doc: Any, *, indent: int | None = None) -> None:
    click.echo(json.dumps(doc, indent=indent))


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (errors stay one line on stderr).")


@click.group(
    cls=CachectlGroup,
    context_settings={"auto_envvar_prefix": _ENV, "help_option_names": ["-h", "--help"]},
)
@global_options
@click.version_option(package_name="zk-cache-sidecar", prog_name="cachectl")
def cli() -> None:
    """Operate a zk-cache-sidecar fleet.

    Shell completion: eval "$(_CACHECTL_COMPLETE=bash_source cachectl)" (zsh_source, fish_source).
    """


# -- invalidate ----------------------------------------------------------------------
def _keys_of_file(source: IO[bytes]) -> list[str]:
    """One key per line of UTF-8 (the line ending dropped); blank lines and lines starting with '#' skipped."""
    name = getattr(source, "name", "-")
    name = "<stdin>" if name in ("-", "<stdin>", 0) else name
    keys: list[str] = []
    for lineno, raw in enumerate(source, 1):
        try:
            key = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"{name}:{lineno}: not UTF-8 ({exc.reason})", param_hint="'--from-file'") from None
        if not key.strip() or key.lstrip().startswith("#"):
            continue
        try:
            keys.append(validate_key(key))
        except SidecarError as exc:
            raise click.BadParameter(f"{name}:{lineno}: {exc.detail}", param_hint="'--from-file'") from None
    return list(dict.fromkeys(keys))


def _session(s: Settings, on_state: Callable[[ZkState], None] | None = None) -> ZkSession:
    return ZkSession(s.zk, max(s.timeout, 4.0), op_timeout=s.timeout, auth=s.zk_auth, tls=s.tls, on_state=on_state)


async def _publish_batches(
    zk: ZkSession, s: Settings, layout: Layout, keys: list[str], progress: Callable[[int], None]
) -> InvalidationReceipt:
    """``publish_invalidation`` over ``keys`` in batches of at most :data:`INVALIDATE_BATCH`, side by side."""
    receipt = InvalidationReceipt()
    workers = INVALIDATE_SESSIONS * INVALIDATE_WORKERS_PER_SESSION
    size = max(1, min(INVALIDATE_BATCH, -(-len(keys) // workers)))
    pending = iter([keys[i : i + size] for i in range(0, len(keys), size)])
    extra = [_session(s) for _ in range(INVALIDATE_SESSIONS - 1)]

    async def worker(session: ZkSession) -> None:
        for batch in pending:
            done = await publish_invalidation(session, layout, keys=batch, prefixes=[], everything=False, by="cachectl")
            receipt.keys.update(done.keys)
            receipt.zxid = max(receipt.zxid, done.zxid)
            progress(len(batch))

    tasks: list[asyncio.Future[None]] = []
    try:
        await asyncio.gather(*(session.connect(s.timeout) for session in extra))
        sessions = [zk, *extra]
        tasks = [asyncio.ensure_future(worker(x)) for x in sessions for _ in range(INVALIDATE_WORKERS_PER_SESSION)]
        await asyncio.gather(*tasks)
    except SidecarError as exc:
        raise type(exc)(f"{exc.detail} (after {len(receipt.keys)} of {len(keys)} keys were invalidated)") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(session.close(timeout=s.timeout) for session in extra))
    return receipt


class _Progress:
    """click's progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        if total > INVALIDATE_BATCH and sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label="invalidating", file=sys.stderr, show_pos=True)
            self.bar.__enter__()

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


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
@click.option(
    "--from-file",
    "from_file",
    type=click.File("rb"),
    default=None,
    help="Also the keys in this file, one a line ('-': stdin; blank lines and '#' lines skipped).",
)
@click.option("--wait", is_flag=True, help="Return only when every live sidecar confirmed it applied this.")
@click.option(
    "--wait-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=300),
    help="Seconds --wait waits before naming the sidecars that did not confirm.",
)
@_JSON
@global_options
@click.pass_context
def invalidate(
    ctx: click.Context,
    keys: tuple[str, ...],
    prefixes: tuple[str, ...],
    everything: bool,
    from_file: IO[bytes] | None,
    wait: bool,
    wait_timeout: float,
    as_json: bool,
) -> None:
    """Drop KEYS (and prefixes, or everything) from every sidecar's cache.

    The origin is not touched. Prints what was published as JSON (--json or
    not). --from-file publishes in batches of 1000 keys, with a progress bar
    when stderr is a terminal. With --wait, exits 1 naming the sidecars that
    did not confirm in time.
    """
    listed = list(dict.fromkeys([*keys, *(_keys_of_file(from_file) if from_file is not None else [])]))
    if not listed and not prefixes and not everything:
        raise click.UsageError("nothing to invalidate: give KEYS, --from-file, --prefix or --all")
    s = _zk_settings(ctx)
    progress = _Progress(len(listed))

    async def action(zk: ZkSession, layout: Layout) -> InvalidationReceipt:
        if len(listed) <= INVALIDATE_BATCH:
            receipt = await publish_invalidation(
                zk, layout, keys=listed, prefixes=list(prefixes), everything=everything, by="cachectl"
            )
        else:
            receipt = await _publish_batches(zk, s, layout, listed, progress)
            if prefixes or everything:
                rest = await publish_invalidation(
                    zk, layout, keys=[], prefixes=list(prefixes), everything=everything, by="cachectl"
                )
                receipt.prefixes, receipt.all, receipt.epoch = rest.prefixes, rest.all, rest.epoch
                receipt.zxid = max(receipt.zxid, rest.zxid)
        if wait:
            receipt.ack = await await_acknowledgement(zk, layout, receipt.zxid, wait_timeout)
        return receipt

    try:
        receipt = _run_zk(s, action)
    finally:
        progress.close()
    _echo_json(receipt.as_json())
    if receipt.ack is not None and not receipt.ack.complete:
        fail(SidecarError(f"not confirmed within {wait_timeout:g}s by: {', '.join(receipt.ack.missing)}"))


# -- members, stats, watch -----------------------------------------------------------------
@cli.command()
@_JSON
@global_options
@click.pass_context
def members(ctx: click.Context, as_json: bool) -> None:
    """List the live sidecars of the namespace."""
    s = _zk_settings(ctx)
    found = _run_zk(s, lambda zk, layout: list_members(zk, layout, with_leader=True))
    if as_json:
        _echo_json(found, indent=2)
        return
    if not found:
        click.echo(f"no live sidecars in namespace {s.namespace!r}")
        return
    click.echo(f"{'MEMBER':<32} {'ADDRESS':<24} {'SESSION':<20} VERSION")
    for m in found:
        name = f"{m.get('member_id', '?')}{' (leader)' if m.get('leader') else ''}"
        click.echo(f"{name:<32} {m.get('address', '?'):<24} {m.get('session', '?'):<20} {m.get('version', '?')}")
    if not any(m.get("leader") for m in found):
        click.echo("no leader: no live sidecar stands for housekeeping")


_STATS_COLUMNS = (
    ("ENTRIES", "entries"),
    ("BYTES", "bytes"),
    ("HITS", "hits"),
    ("MISSES", "misses"),
    ("INV-RECV", "invalidations_received"),
    ("INV-PUB", "invalidations_published"),
    ("EVICTIONS", "evictions"),
    ("WRITES", "writes"),
)


@cli.command()
@_JSON
@global_options
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Every live member's counters (GET /v1/stats at the address it registered), one row each.

    A member that cannot be asked is a row with the error, and the exit
    status is 1. --json: [{"member_id", "address", "stats": <its /v1/stats>
    or "error"}].
    """
    s = _zk_settings(ctx)
    found = _run_zk(s, lambda zk, layout: list_members(zk, layout))
    rows = member_stats(found, s)
    if as_json:
        _echo_json(rows, indent=2)
    elif not rows:
        click.echo(f"no live sidecars in namespace {s.namespace!r}")
    else:
        width = max(12, *(len(r["member_id"]) for r in rows))
        click.echo(f"{'MEMBER':<{width}} " + " ".join(f"{h:>10}" for h, _ in _STATS_COLUMNS) + f" {'HIT%':>6} ZK")
        totals = [0] * len(_STATS_COLUMNS)
        for row in rows:
            doc = row.get("stats")
            if doc is None:
                click.echo(f"{row['member_id']:<{width}} error: {row['error']}")
                continue
            values = [int(doc.get(field) or 0) for _, field in _STATS_COLUMNS]
            totals = [t + v for t, v in zip(totals, values, strict=True)]
            zk_state = str((doc.get("zookeeper") or {}).get("state", "?"))
            cells = " ".join(f"{v:>10}" for v in values)
            click.echo(f"{row['member_id']:<{width}} {cells}{_ratio(values, zk_state)}")
        ok = [r for r in rows if "stats" in r]
        if len(ok) > 1:
            click.echo(f"{'TOTAL':<{width}} " + " ".join(f"{v:>10}" for v in totals) + _ratio(totals, ""))
    if any("error" in r for r in rows):
        sys.exit(1)


def _ratio(values: list[int], zk_state: str) -> str:
    hits, misses = values[2], values[3]
    ratio = f"{100 * hits / (hits + misses):.1f}" if hits + misses else "-"
    return f" {ratio:>6} {zk_state}".rstrip()


@cli.command()
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this long.")
@_JSON
@global_options
@click.pass_context
def watch(ctx: click.Context, count: int | None, seconds: float | None, as_json: bool) -> None:
    """Print the namespace's invalidations as they are published, one line each, until Ctrl-C.

    A line: time (the znode's, UTC), kind (key, prefix or all), the key or
    prefix, the version published, and what its data says (op, by; a write's
    intent shows as op intent). --json: one JSON object per line. Needs
    ZooKeeper 3.6 or later (persistent recursive watches).
    """
    s = _zk_settings(ctx)

    def emit(event: Event) -> None:
        click.echo(json.dumps(event.as_json()) if as_json else event.as_text())

    watcher: Watch | None = None

    def on_state(state: ZkState) -> None:
        if watcher is not None:
            watcher.on_state(state)

    async def action(zk: ZkSession, layout: Layout) -> None:
        nonlocal watcher
        watcher = Watch(layout, emit, count=count, seconds=seconds)
        await watcher.run(zk)

    _run_zk(s, action, on_state=on_state)


# -- doctor ------------------------------------------------------------------------------
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
@_JSON
@global_options
@click.pass_context
def doctor(ctx: click.Context, zk_session_timeout: float, origin: str | None, as_json: bool) -> None:
    """Check every ZooKeeper server of --zk, the namespace, the origin: one line per finding; exit 1 on any problem.

    The namespace part names the leader and its last housekeeping round, and
    times every member's confirmation of a fresh zxid (as invalidate --wait).
    --json: {"ok": bool, "findings": [{"subject", "text", "problem"}]}.
    """
    from sidecar.coordination.health import Finding, check_ensemble, check_namespace, check_origin  # aiohttp: slow

    s = _zk_settings(ctx)
    findings = check_ensemble(s.zk, zk_session_timeout, timeout=min(s.timeout, 5.0), tls=s.tls)
    if not as_json:
        for finding in findings:
            click.echo(str(finding))
    members: list[dict[str, Any]] = []

    async def namespace_part(zk: ZkSession, layout: Layout) -> list[Finding]:
        try:
            await require_namespace(zk, s, layout)
        except NamespaceMissing as exc:
            return [Finding(f"namespace {layout.root}", exc.detail, True)]
        members.extend(await list_members(zk, layout))
        return await check_namespace(zk, layout)

    try:
        namespace = asyncio.run(_with_zk(s, namespace_part, namespace=False))
    except SidecarError as exc:
        namespace = [Finding(f"namespace {s.namespace}", f"not checked: {exc.detail}", True)]
    reported = {str(m.get("origin", "")) for m in members}
    # A URL the members report can be checked from here (credentials are never reported, TLS
    # options neither: rediss:// needs --origin).
    checkable = ("http://", "https://", "redis://", "redis+sentinel://")
    if origin is None and len(reported) == 1 and next(iter(reported)).startswith(checkable):
        origin = next(iter(reported))
    if origin is not None:
        namespace += asyncio.run(check_origin(origin, timeout=min(s.timeout, 5.0)))
    elif members:
        namespace.append(Finding("origin", f"not checked: members report {sorted(reported)}; pass --origin URL"))
    everything = [*findings, *namespace]
    if as_json:
        _echo_json({"ok": not any(f.problem for f in everything), "findings": [_finding(f) for f in everything]})
    else:
        for finding in namespace:
            click.echo(str(finding))
    if any(f.problem for f in everything):
        sys.exit(1)


def _finding(f: Any) -> dict[str, Any]:
    return {"subject": f.subject, "text": f.text, "problem": f.problem}


# -- live settings -----------------------------------------------------------------
def _check_assignments(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    settings_: dict[str, str] = {}
    for item in value:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: use NAME=VALUE, e.g. ttl=30s")
        if name not in LIVE_SETTINGS:
            raise click.BadParameter(f"{name!r} is not a live setting (live: {', '.join(LIVE_SETTINGS)})")
        settings_[name] = raw
    return settings_


def _check_unset(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    # Any name: also one a hand edit (or a newer cachectl) left in the znode, which no sidecar accepts.
    for name in value:
        if not name.strip():
            raise click.BadParameter("an empty setting name")
    return list(value)


def _show_change(change: LiveConfigChange, as_json: bool) -> None:
    if as_json:
        rows = [{"setting": n, "before": b, "after": a} for n, b, a in change.changes]
        _echo_json({"changes": rows, "settings": change.after, "version": change.version})
        return
    if not change.changes:
        click.echo("unchanged")
    for name, before, after in change.changes:
        click.echo(f"{name}: {'(unset)' if before is None else before} -> {'(unset)' if after is None else after}")


def _change_config(
    ctx: click.Context, assigned: dict[str, str], unset: list[str], *, write: bool, replace: bool = False
) -> LiveConfigChange:
    if not assigned and not unset and not replace:
        raise click.UsageError("nothing to change: give NAME=VALUE or --unset NAME")
    s = _zk_settings(ctx)

    def action(zk: ZkSession, layout: Layout) -> Awaitable[LiveConfigChange]:
        return update_live_config(zk, layout, assigned, unset, write=write, replace=replace)

    return _run_zk(s, action)


@cli.group()
@global_options
def config() -> None:
    """Live settings of the namespace: a znode every sidecar watches and applies within milliseconds.

    The znode wins over the sidecars' flags, environment and files for the
    settings it holds; --unset brings each sidecar's own value back. A
    sidecar that finds the whole invalid keeps its settings and says so in
    /readyz and /metrics (zkcache_config_valid).
    """


@config.command("get")
@_JSON
@global_options
@click.pass_context
def config_get(ctx: click.Context, as_json: bool) -> None:
    """Print the live settings the namespace's config znode holds."""
    live, version = _run_zk(_zk_settings(ctx), read_live_config)
    if as_json:
        _echo_json({"settings": live, "version": version})
    elif not live:
        click.echo("no live settings: every sidecar uses its own")
    else:
        for name in sorted(live):
            click.echo(f"{name} = {live[name]}")


_SETTINGS = click.argument("assigned", metavar="[NAME=VALUE]...", nargs=-1, callback=_check_assignments)
_UNSET = click.option("--unset", multiple=True, callback=_check_unset, help="Remove this setting (repeatable).")


@config.command("set")
@_SETTINGS
@_UNSET
@click.option("--replace", is_flag=True, help="Hold exactly these settings afterwards, whatever the znode held.")
@_JSON
@global_options
@click.pass_context
def config_set(ctx: click.Context, assigned: dict[str, str], unset: list[str], replace: bool, as_json: bool) -> None:
    """Set live settings NAME=VALUE (checked by the sidecar's own parsers) and print what changed.

    Written with a version check: a concurrent change by someone else is
    merged, never overwritten. --replace drops everything else (also what a
    hand edit left that no sidecar reads; with no NAME=VALUE: nothing stays).
    """
    _show_change(_change_config(ctx, assigned, unset, write=True, replace=replace), as_json)


@config.command("diff")
@_SETTINGS
@_UNSET
@_JSON
@global_options
@click.pass_context
def config_diff(ctx: click.Context, assigned: dict[str, str], unset: list[str], as_json: bool) -> None:
    """Print what `config set` with these arguments would change; write nothing."""
    _show_change(_change_config(ctx, assigned, unset, write=False), as_json)


# -- one key through a sidecar ------------------------------------------------------
def _sidecar_settings(ctx: click.Context) -> Settings:
    s = settings(ctx, zookeeper=False, sidecar=True)
    start_logging(ctx)
    return s


def _http(s: Settings, method: str, key: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    try:
        return key_request(s, method, key, body, headers)
    except SidecarError as exc:
        fail(exc)


@cli.command()
@click.argument("key", callback=lambda c, p, v: _check_keys(c, p, (v,))[0])
@click.option("--etag", is_flag=True, help="Print the ETag (and X-Cache) on stderr.")
@_JSON
@global_options
@click.pass_context
def get(ctx: click.Context, key: str, etag: bool, as_json: bool) -> None:
    """Print KEY's value (raw bytes) through the sidecar.

    --json: {"key", "etag", "version", "x_cache", "content_type", and "value"
    (UTF-8 text) or "value_base64"}.
    """
    s = _sidecar_settings(ctx)
    _, headers, body = _http(s, "GET", key)
    if etag:
        click.echo(f"ETag: {headers.get('ETag')} X-Cache: {headers.get('X-Cache')}", err=True)
    if as_json:
        tag = headers.get("ETag")
        doc: dict[str, Any] = {
            "key": key,
            "etag": tag,
            "version": int(tag.strip('"')) if tag and tag.strip('"').isdigit() else None,
            "x_cache": headers.get("X-Cache"),
            "content_type": headers.get("Content-Type"),
        }
        try:
            doc["value"] = body.decode("utf-8")
        except UnicodeDecodeError:
            doc["value_base64"] = base64.b64encode(body).decode()
        _echo_json(doc)
        return
    sys.stdout.buffer.write(body)
    sys.stdout.buffer.flush()


@cli.command()
@click.argument("key", callback=lambda c, p, v: _check_keys(c, p, (v,))[0])
@click.option("--file", "source", type=click.File("rb"), required=True, help="File with the value ('-' for stdin).")
@click.option("--content-type", default="application/octet-stream", show_default=True)
@click.option("--if-match", default=None, help="Only write if the current version is this.")
@_JSON
@global_options
@click.pass_context
def put(ctx: click.Context, key: str, source: Any, content_type: str, if_match: str | None, as_json: bool) -> None:
    """Write KEY through the sidecar (origin, then fleet-wide invalidation); prints {"key", "version"}."""
    s = _sidecar_settings(ctx)
    headers = {"Content-Type": content_type}
    if if_match:
        headers["If-Match"] = if_match if if_match.startswith('"') else f'"{if_match}"'
    _, _, body = _http(s, "PUT", key, source.read(), headers)
    click.echo(body.decode())


def main() -> None:
    """Entry point of the ``cachectl`` console script."""
    cli()


if __name__ == "__main__":
    main()
