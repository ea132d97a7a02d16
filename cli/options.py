"""cachectl's global options, accepted before and after the command, and its one error policy.

Every command (and the ``config`` group) carries the global options; each
records what it was given in the context's shared ``meta``, so a value on the
subcommand (``cachectl invalidate k --zk H``) wins over one on the group
(``cachectl --zk H invalidate k``), which wins over the environment
(``ZKCACHE_*``), which wins over the default.  :func:`settings` merges them and
checks them with the daemon's own parsers when a command needs them.

Errors end as one line on stderr, ``cachectl: ...``, with the exit status of
README's table: 0 success, 1 the operation failed, 2 usage or configuration,
3 ZooKeeper or the sidecar unreachable.  No traceback, and no log line, unless
``-v`` is given (kazoo logs every dropped connection).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from sidecar.config import TlsSettings, load_config
from sidecar.errors import ConfigError, CoordinationError, SidecarError

__all__ = [
    "CachectlCommand",
    "CachectlGroup",
    "Settings",
    "Unreachable",
    "fail",
    "global_options",
    "settings",
]

F = TypeVar("F", bound=Callable[..., Any])
_META = "cachectl.globals"


class Unreachable(SidecarError):
    """The sidecar's HTTP API could not be reached."""


def exit_code(exc: SidecarError) -> int:
    """The one mapping of errors to exit statuses."""
    if isinstance(exc, ConfigError):
        return 2
    if isinstance(exc, (CoordinationError, Unreachable)):
        return 3
    return 1


def fail(exc: SidecarError) -> NoReturn:
    """End the command with ``exc`` as one line on stderr."""
    click.echo(f"cachectl: {exc.detail}", err=True)
    sys.exit(exit_code(exc))


@dataclass(frozen=True)
class _Global:
    decls: tuple[str, ...]
    envvar: str | None
    kwargs: dict[str, Any]


_GLOBALS: dict[str, _Global] = {
    "zk": _Global(
        ("--zk",), "ZKCACHE_ZK", dict(default="127.0.0.1:2181", show_default=True, help="ZooKeeper connect string.")
    ),
    "namespace": _Global(
        ("--namespace",), "ZKCACHE_NAMESPACE", dict(default="default", show_default=True, help="Cache namespace.")
    ),
    "zk_root": _Global(
        ("--zk-root",), "ZKCACHE_ZK_ROOT", dict(default="/zkcache", show_default=True, help="Root znode (absolute).")
    ),
    "zk_auth": _Global(
        ("--zk-auth",), "ZKCACHE_ZK_AUTH", dict(default=None, help="ZooKeeper credentials scheme:credential.")
    ),
    "timeout": _Global(
        ("--timeout",),
        "ZKCACHE_TIMEOUT",
        dict(
            default=10.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            help="Seconds to wait for ZooKeeper or a sidecar.",
        ),
    ),
    "sidecar": _Global(
        ("--sidecar",),
        "ZKCACHE_SIDECAR",
        dict(default="http://127.0.0.1:7070", show_default=True, help="Sidecar base URL for get/put."),
    ),
    "auth_token": _Global(
        ("--auth-token",), "ZKCACHE_AUTH_TOKEN", dict(default=None, help="Bearer token of the sidecars' API.")
    ),
    "zk_tls": _Global(("--zk-tls/--no-zk-tls",), "ZKCACHE_ZK_TLS", dict(default=False, help="TLS to ZooKeeper.")),
    "zk_tls_ca": _Global(("--zk-tls-ca",), "ZKCACHE_ZK_TLS_CA", dict(default=None, help="PEM CA bundle.")),
    "zk_tls_cert": _Global(("--zk-tls-cert",), "ZKCACHE_ZK_TLS_CERT", dict(default=None, help="PEM client cert.")),
    "zk_tls_key": _Global(("--zk-tls-key",), "ZKCACHE_ZK_TLS_KEY", dict(default=None, help="PEM key of the cert.")),
    "zk_tls_verify": _Global(
        ("--zk-tls-verify/--no-zk-tls-verify",),
        "ZKCACHE_ZK_TLS_VERIFY",
        dict(default=True, help="Verify ZooKeeper's certificate and host name."),
    ),
    "verbose": _Global(
        ("-v", "--verbose"),
        None,
        dict(count=True, allow_from_autoenv=False, help="Log lines (kazoo's too) on stderr; -vv: debug; tracebacks."),
    ),
}


class GlobalOption(click.Option):
    """An option every command accepts; listed once in ``cachectl --help``."""


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # Runs for the group's options, then for the subcommand's: a value given on
    # the command line at a later level wins; env and defaults are the same at each.
    assert param.name is not None
    given, fallback = ctx.meta.setdefault(_META, ({}, {}))
    if ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
        # -v counts wherever it is given (cachectl -v watch -v is -vv); the others: the last one wins.
        given[param.name] = value + given.get(param.name, 0) if param.name == "verbose" else value
    else:
        fallback.setdefault(param.name, value)
    return value


def global_options(f: F) -> F:
    """Give a command (or group) every global option, for use before or after its name."""
    for spec in reversed(_GLOBALS.values()):
        f = click.option(
            *spec.decls, cls=GlobalOption, envvar=spec.envvar, expose_value=False, callback=_remember, **spec.kwargs
        )(f)
    return f


def _given(ctx: click.Context) -> dict[str, Any]:
    given, fallback = ctx.meta.get(_META, ({}, {}))
    return {**fallback, **given}


def verbosity(ctx: click.Context) -> int:
    """How many -v were given (before or after the command)."""
    return int(_given(ctx).get("verbose") or 0)


@dataclass(frozen=True)
class Settings:
    """The merged, checked global settings of one run."""

    zk: str
    namespace: str
    zk_root: str
    zk_auth: str | None
    tls: TlsSettings | None
    timeout: float
    sidecar: str
    auth_token: str | None

    @property
    def namespace_root(self) -> str:
        """``<zk_root>/<namespace>``."""
        return f"{self.zk_root}/{self.namespace}"


_SETTING = re.compile(r"^setting '(?P<name>\w+)'(?: in \S+)?: (?P<why>.*)$")


def _bad(option: str, why: str) -> NoReturn:
    raise click.BadParameter(why, param_hint=f"'{option}'")


def check_sidecar_url(url: str) -> str:
    """``--sidecar``: an http(s) URL with a host (and a valid port); usage error otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        _bad("--sidecar", f"{url!r}: {exc} (use e.g. http://127.0.0.1:7070)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _bad("--sidecar", f"{url!r} is not an http(s) URL with a host (use e.g. http://127.0.0.1:7070)")
    return url.rstrip("/")


def settings(ctx: click.Context, *, zookeeper: bool = True, sidecar: bool = False) -> Settings:
    """The global settings, merged and checked (a bad one is a usage error naming its option).

    ZooKeeper's settings go through the daemon's own parsers (``load_config``):
    a namespace, a ``--zk-root`` or TLS files the daemon would refuse are refused.
    """
    given = _given(ctx)
    tls = None
    if zookeeper:
        names = ("zk", "namespace", "zk_root", "zk_auth", "zk_tls", "zk_tls_ca", "zk_tls_cert", "zk_tls_key")
        flags = {name: given.get(name) for name in names}
        flags["zk_tls_verify"] = given.get("zk_tls_verify", True)
        try:
            config = load_config(flags, env={})
        except ConfigError as exc:
            m = _SETTING.match(exc.detail)
            if m is None:
                raise
            option = {"zk_tls": "--zk-tls"}.get(m["name"], "--" + m["name"].replace("_", "-"))
            _bad(option, m["why"])
        tls = config.zk_tls_settings
        zk, namespace, zk_root, zk_auth = config.zk, config.namespace, config.zk_root, config.zk_auth
    else:
        zk, namespace, zk_root, zk_auth = (str(given.get(n) or "") for n in ("zk", "namespace", "zk_root", "zk_auth"))
    return Settings(
        zk=zk,
        namespace=namespace,
        zk_root=zk_root,
        zk_auth=zk_auth or None,
        tls=tls,
        timeout=float(given.get("timeout") or 10.0),
        sidecar=check_sidecar_url(str(given.get("sidecar"))) if sidecar else str(given.get("sidecar")),
        auth_token=given.get("auth_token") or None,
    )


def _global_names(ctx: click.Context) -> str:
    common = [p for p in ctx.command.params if isinstance(p, GlobalOption)]
    return ", ".join("-v" if p.name == "verbose" else p.opts[0] for p in common)


class CachectlCommand(click.Command):
    """A command whose help lists its own options, then names the global ones it also accepts."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own = [
            rv
            for p in self.get_params(ctx)
            if not isinstance(p, (GlobalOption, click.Argument)) and (rv := p.get_help_record(ctx)) is not None
        ]
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        with formatter.section("Global options (here or before the command; see cachectl --help)"):
            formatter.write_text(_global_names(ctx))


class _SubGroup(click.Group):
    """A group of commands (``config``) with the same help layout."""

    command_class = CachectlCommand

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        CachectlCommand.format_options(self, ctx, formatter)  # type: ignore[arg-type]
        self.format_commands(ctx, formatter)


class CachectlGroup(click.Group):
    """The ``cachectl`` group: global options listed in full; every error one line (see the module)."""

    command_class = CachectlCommand
    group_class = _SubGroup

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own: list[tuple[str, str]] = []
        common: list[tuple[str, str]] = []
        for p in self.get_params(ctx):
            rv = p.get_help_record(ctx)
            if rv is not None:
                (common if isinstance(p, GlobalOption) else own).append(rv)
        with formatter.section("Global options (before or after the command; env ZKCACHE_<NAME>)"):
            formatter.write_dl(common)
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        self.format_commands(ctx, formatter)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's main, with cachectl's error policy instead of click's (see the module docstring)."""
        standalone = kwargs.pop("standalone_mode", True)
        root = logging.getLogger()
        levels = root.level, logging.getLogger("kazoo").level
        silence = logging.NullHandler()
        root.addHandler(silence)  # no handler of ours: nothing logged reaches stderr unless -v
        self.verbose_handler: logging.Handler | None = None
        self.last_ctx: click.Context | None = None
        try:
            try:
                code = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
            except click.UsageError as exc:
                hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
                click.echo(f"cachectl: {_one_line(exc.format_message())}{hint}", err=True)
                code = exc.exit_code
            except click.ClickException as exc:
                click.echo(f"cachectl: {_one_line(exc.format_message())}", err=True)
                code = exc.exit_code
            except (click.Abort, KeyboardInterrupt):
                click.echo("cachectl: interrupted", err=True)
                code = 130
            except SidecarError as exc:  # a command that did not handle it itself
                click.echo(f"cachectl: {_one_line(exc.detail)}", err=True)
                code = exit_code(exc)
            except Exception as exc:
                if self.verbose_handler is not None:
                    traceback.print_exc()
                what = _one_line(str(exc)) or type(exc).__name__
                click.echo(f"cachectl: unexpected error: {type(exc).__name__}: {what} (-v shows where)", err=True)
                code = 1
        finally:
            root.removeHandler(silence)
            if self.verbose_handler is not None:
                root.removeHandler(self.verbose_handler)
                self.verbose_handler = None
            root.setLevel(levels[0])
            logging.getLogger("kazoo").setLevel(levels[1])
        if not standalone:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def start_logging(ctx: click.Context) -> None:
    """Send log lines to stderr if -v was given (INFO; -vv: DEBUG)."""
    level = verbosity(ctx)
    group = ctx.find_root().command
    if level <= 0 or not isinstance(group, CachectlGroup) or getattr(group, "verbose_handler", None) is not None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cachectl: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level > 1 else logging.INFO)
    logging.getLogger("kazoo").setLevel(logging.NOTSET)
    group.verbose_handler = handler
