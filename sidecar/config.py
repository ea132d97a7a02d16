"""Daemon configuration: one frozen dataclass, filled in one place.

Every setting can be given, from lowest to highest precedence, as a default, in
a TOML file (``--config`` / ``ZKCACHE_CONFIG``), as an environment variable
``ZKCACHE_<NAME>`` or as a flag ``--<name-with-dashes>``.  Every value is
parsed and checked here; an invalid one raises :class:`ConfigError` with one
line that names the setting, and ``__main__`` turns that into exit status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from .errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "ENV_PREFIX",
    "LIVE_SETTINGS",
    "Config",
    "Listen",
    "TlsSettings",
    "container_memory_limit",
    "flag_names",
    "load_config",
    "memory_needed",
    "parse_duration",
    "parse_live",
    "parse_origin",
    "parse_size",
    "parse_zk_auth",
    "parse_zk_hosts",
    "settings_help",
    "unknown_env_names",
    "with_live",
]

ENV_PREFIX = "ZKCACHE_"
DEFAULT_LISTEN = "127.0.0.1:7070"

# Ki/Mi/Gi as in Kubernetes quantities, so chart values carry over unchanged.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


def parse_size(text: str) -> int:
    """Parse ``"64MiB"``, ``"64Mi"``, ``"1000"`` or ``"2 GB"`` into a byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 1048576, 512KiB, 64MiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(text: str) -> float:
    """Parse ``"10s"``, ``"250ms"``, ``"1.5"`` (seconds) or ``"2m"`` into seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10s, 250ms, 1.5)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_zk_hosts(text: str) -> str:
    """Check a ZooKeeper connect string ``host:port[,host:port...][/chroot]``."""
    hosts, _, chroot = text.partition("/")
    if not hosts:
        raise ValueError("empty connect string (use host:port[,host:port][/chroot])")
    for hp in hosts.split(","):
        host, sep, port = hp.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{hp!r} is not host:port")
    if chroot and (chroot.endswith("/") or "//" in chroot):
        raise ValueError(f"bad chroot '/{chroot}'")
    return text


@dataclass(frozen=True, slots=True)
class Listen:
    """Where the HTTP API listens: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    @property
    def is_loopback(self) -> bool:
        """Unix sockets and 127.0.0.0/8, ::1 and ``localhost`` count as local."""
        if self.unix_path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False

    def overlaps(self, other: Listen) -> bool:
        """Both cannot be bound at once (same socket path, or one port on a shared or wildcard host)."""
        if self.unix_path is not None or other.unix_path is not None:
            return self.unix_path == other.unix_path
        wildcard = {"0.0.0.0", "::", ""}
        return self.port == other.port and (self.host == other.host or {self.host, other.host} & wildcard != set())

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Client TLS to ZooKeeper (``zk_tls*`` settings)."""

    ca: str | None = None  # PEM bundle; None: the system's trust store
    cert: str | None = None  # client certificate (PEM), for servers with ssl.clientAuth=need/want
    key: str | None = None
    verify: bool = True  # the server's certificate and its host name

    def kazoo_options(self) -> dict[str, Any]:
        """Keyword arguments for ``KazooClient``.

        kazoo checks host names only if asked (``check_hostname``), and loads a
        client certificate only if both files are given.
        """
        return {
            "use_ssl": True,
            "ca": self.ca,
            "certfile": self.cert,
            "keyfile": self.key,
            "verify_certs": self.verify,
            "check_hostname": self.verify,
        }

    def context(self) -> ssl.SSLContext:
        """The client context kazoo builds from these settings (``kazoo.handlers.utils``)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_default_certs()
        ctx.check_hostname = self.verify
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE
        if self.ca:
            ctx.load_verify_locations(self.ca)
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _parse_listen(text: str) -> Listen:
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/zkcache.sock")
        return Listen(unix_path=path)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port or unix:/path")
    return Listen(host=host, port=int(port))


def _parse_optional_listen(text: str) -> Listen | None:
    return None if not str(text).strip() or text == "off" else _parse_listen(text)


def parse_zk_auth(text: str) -> str:
    """Check ZooKeeper credentials ``scheme:credential`` (e.g. ``digest:user:password``)."""
    scheme, sep, credential = str(text).partition(":")
    if not sep or not scheme or not credential:
        raise ValueError("use scheme:credential, e.g. digest:user:password")
    return str(text)


def parse_origin(text: str) -> str:
    """Check an origin setting: ``sqlite:///path``, ``http(s)://base``, ``redis...://`` or ``none``."""
    if text == "none":
        return text
    scheme = urlsplit(text).scheme
    if scheme == "sqlite":
        if not text.startswith("sqlite:///") or len(text) <= len("sqlite:///"):
            raise ValueError("use sqlite:///relative/path.db or sqlite:////absolute/path.db")
    elif scheme in ("http", "https"):
        if not urlsplit(text).netloc:
            raise ValueError("an http origin needs a host, e.g. http://127.0.0.1:8080/kv")
    elif scheme in ("redis", "rediss", "redis+sentinel"):
        from .origins.redis import parse_redis_url  # redis-py is imported only when used

        parse_redis_url(text)
    else:
        raise ValueError(
            f"unsupported origin {text!r} (sqlite:///path, http(s)://base, redis(s)://host:port/db, "
            "redis+sentinel://host:port/service, or none)"
        )
    return text


def _parse_namespace(text: str) -> str:
    if not _NAMESPACE_RE.match(text) or text in (".", ".."):
        raise ValueError("1-64 characters of A-Z a-z 0-9 _ . - (not '.' or '..')")
    return text


def _parse_zk_root(text: str) -> str:
    if not text.startswith("/") or text.endswith("/") or "//" in text:
        raise ValueError("an absolute ZooKeeper path without a trailing '/', e.g. /zkcache")
    return text


def _positive_int(text: str) -> int:
    value = int(str(text).strip())
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a finite number greater than zero")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _non_negative_duration(text: str) -> float:
    return parse_duration(text)


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _optional_duration(text: str) -> float | None:
    return None if str(text).strip().lower() in ("", "auto") else parse_duration(text)


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _pem_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"no readable file {text!r}")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


def _text(text: str) -> str:
    if not str(text).strip():
        raise ValueError("must not be empty")
    return str(text)


def _default_member_id() -> str:
    # Kubernetes gives the pod name through the downward API (the chart sets it).
    pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME_OVERRIDE")
    return pod or f"{socket.gethostname()}-{os.getpid()}"


def _setting(default: Any, parse: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    # Secrets stay out of repr(), so a logged Config never leaks them.
    return field(default=default, repr=not secret, metadata={"parse": parse, "help": help})


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the daemon. Frozen: build a new one with :func:`load_config`."""

    zk: str = _setting("127.0.0.1:2181", parse_zk_hosts, "ZooKeeper connect string, host:port[,host:port][/chroot]")
    namespace: str = _setting("default", _parse_namespace, "cache name; sidecars of one namespace share coherence")
    zk_root: str = _setting("/zkcache", _parse_zk_root, "root znode; the namespace lives at <zk_root>/<namespace>")
    zk_session_timeout: float = _setting(10.0, _positive_duration, "ZooKeeper session timeout requested")
    zk_auth: str | None = _setting(
        None,
        parse_zk_auth,
        "ZooKeeper credentials scheme:credential (e.g. digest:user:password); znodes created are then "
        "open only to that identity",
        secret=True,
    )
    zk_tls: bool = _setting(
        False, _bool, "TLS to ZooKeeper (its secureClientPort); the server's certificate and host name are verified"
    )
    zk_tls_ca: str | None = _setting(
        None, _pem_file, "PEM CA bundle that signed ZooKeeper's certificate (default: the system's trust store)"
    )
    zk_tls_cert: str | None = _setting(
        None, _pem_file, "PEM client certificate, for servers that require one (ssl.clientAuth=need)"
    )
    zk_tls_key: str | None = _setting(None, _pem_file, "PEM private key of zk_tls_cert")
    zk_tls_verify: bool = _setting(
        True, _bool, "verify ZooKeeper's certificate and host name; false only for tests (logged as a warning)"
    )
    listen: Listen = _setting(  # noqa: RUF009 - Listen is frozen: sharing the default is safe
        _parse_listen(DEFAULT_LISTEN), _parse_listen, "HTTP listen address host:port, or unix:/path"
    )
    ops_listen: Listen | None = _setting(  # noqa: RUF009 - Listen is frozen
        None,
        _parse_optional_listen,
        "extra host:port serving only /healthz, /readyz and /metrics, no data and no auth (kubelet probes); empty: off",
    )
    auth_token: str | None = _setting(
        None, _text, "bearer token required on the API (mandatory off loopback)", secret=True
    )
    origin: str = _setting(
        "sqlite:///./zkcache.db",
        parse_origin,
        "backing store: sqlite:///path, http(s)://base, redis(s)://host:port/db, "
        "redis+sentinel://host:port[,host:port]/service/db, or none (cache-aside fills)",
    )
    origin_timeout: float = _setting(5.0, _positive_duration, "timeout of one origin call")
    origin_connections: int = _setting(
        32, _positive_int, "most connections open to an HTTP or Redis origin at once (more calls wait)"
    )
    max_entries: int = _setting(100_000, _positive_int, "cache bound: number of entries")
    max_bytes: int = _setting(256 * 1024**2, _positive_size, "cache bound: bytes (keys, values, per-entry overhead)")
    max_value_bytes: int = _setting(1024**2, _positive_size, "largest value accepted by PUT (413 beyond)")
    max_inflight_bytes: int = _setting(
        16 * 1024**2,
        _positive_size,
        "request bodies and batch responses held in memory at once, all told (outside max_bytes); more wait, then 503",
    )
    max_connections: int = _setting(
        1024,
        _positive_int,
        "HTTP connections open at once; beyond it the longest idle one is closed, or the new one gets 503",
    )
    http_idle_timeout: float = _setting(
        60.0,
        _positive_duration,
        "an HTTP connection with no request in progress (one still sending its headers included) is closed "
        "after this long",
    )
    http_body_timeout: float = _setting(30.0, _positive_duration, "a request body must arrive within this (408 beyond)")
    ttl: float = _setting(
        0.0, _non_negative_duration, "entry time to live; 0 keeps entries until evicted or invalidated"
    )
    consistency: str = _setting(
        "eventual",
        _choice("eventual", "strong"),
        "default read consistency: eventual (hits served locally) or strong (ZooKeeper sync per read)",
    )
    fills: str = _setting(
        "auto",
        _choice("auto", "allow"),
        "cache-aside fills (PUT ?fill=true): auto (only with origin none) or allow (also over a read-through "
        "origin; filled values then serve eventual reads, never strong ones)",
    )
    lock_timeout: float = _setting(
        10.0, _positive_duration, "how long a write waits for ZooKeeper: for a connection, then for the key's lock"
    )
    consistency_probe_rate: float = _setting(
        0.0,
        _fraction,
        "fraction of hits re-checked against ZooKeeper and the origin in the background (0: off; "
        "/metrics counts agreed, disagreed, inconclusive)",
    )
    consistency_probe_window: float = _setting(
        1.0, _positive_duration, "a probed hit older than its key's change by more than this counts as disagreed"
    )
    version_retention: float = _setting(
        86400.0,
        _positive_duration,
        "the elected housekeeper deletes version znodes not modified for this long (ZooKeeper then holds "
        "only keys written within it); their holders refetch them once",
    )
    housekeeping_interval: float = _setting(60.0, _positive_duration, "pause between housekeeping rounds")
    housekeeping_rate: float = _setting(
        1000.0, _positive_float, "ZooKeeper requests per second a housekeeping round may make, all told"
    )
    suspended_grace: float | None = _setting(
        None,
        _optional_duration,
        "how long cached values are served after the ZooKeeper connection is lost (auto: session timeout / 3)",
    )
    suspended_reads: str = _setting(
        "origin",
        _choice("origin", "fail"),
        "reads that cannot be served from cache while disconnected: origin (uncached) or fail (503)",
    )
    member_id: str = _setting(None, _text, "this sidecar's id in members/ (default: $POD_NAME, else hostname-pid)")
    shutdown_timeout: float = _setting(
        10.0,
        _positive_duration,
        "bound on a graceful stop (SIGTERM): drain requests and writes, leave the fleet; keep it below "
        "Kubernetes' terminationGracePeriodSeconds",
    )
    log_level: str = _setting("info", _choice("debug", "info", "warning", "error"), "log level")

    def __post_init__(self) -> None:
        if self.member_id is None:
            object.__setattr__(self, "member_id", _default_member_id())
        if "/" in self.member_id or self.member_id in (".", ".."):
            raise ConfigError(f"setting 'member_id': {self.member_id!r} must not contain '/'")
        if not self.listen.is_loopback and not self.auth_token:
            raise ConfigError(
                f"setting 'listen': {self.listen} is not a loopback address; "
                "set auth_token (ZKCACHE_AUTH_TOKEN) to listen beyond localhost"
            )
        if self.ops_listen is not None and self.ops_listen.overlaps(self.listen):
            raise ConfigError(f"setting 'ops_listen': {self.ops_listen} overlaps the API address {self.listen}")
        self._check_tls()
        if self.max_value_bytes > self.max_bytes:
            raise ConfigError(f"setting 'max_value_bytes': {self.max_value_bytes} exceeds max_bytes {self.max_bytes}")
        if 2 * self.max_value_bytes > self.max_inflight_bytes:
            # A body is charged twice its size while it is read and written (http_api._body).
            raise ConfigError(
                f"setting 'max_inflight_bytes': {self.max_inflight_bytes} cannot hold one value of "
                f"max_value_bytes ({self.max_value_bytes}) twice over"
            )
        if self.suspended_grace is not None and self.suspended_grace > self.zk_session_timeout / 3:
            raise ConfigError(
                "setting 'suspended_grace': must not exceed a third of zk_session_timeout "
                f"({self.suspended_grace:g}s > {self.zk_session_timeout / 3:g}s), or stale hits could "
                "outlive the session"
            )

    def _check_tls(self) -> None:
        given = [n for n in ("zk_tls_ca", "zk_tls_cert", "zk_tls_key") if getattr(self, n) is not None]
        if given and not self.zk_tls:
            raise ConfigError(f"setting '{given[0]}': set zk_tls to use it")
        if (self.zk_tls_cert is None) != (self.zk_tls_key is None):
            raise ConfigError("setting 'zk_tls_cert': give zk_tls_cert and zk_tls_key together")
        tls = self.zk_tls_settings
        if tls is not None:
            try:
                tls.context()  # the files load: a bad one is a startup error, not a silent timeout
            except (OSError, ValueError) as exc:
                raise ConfigError(f"setting 'zk_tls': cannot load the TLS files: {exc}") from None

    @property
    def zk_tls_settings(self) -> TlsSettings | None:
        """kazoo's TLS settings, or None without TLS."""
        if not self.zk_tls:
            return None
        return TlsSettings(ca=self.zk_tls_ca, cert=self.zk_tls_cert, key=self.zk_tls_key, verify=self.zk_tls_verify)

    @property
    def namespace_root(self) -> str:
        """The znode under which this namespace keeps all its metadata."""
        return f"{self.zk_root}/{self.namespace}"

    @property
    def effective_suspended_grace(self) -> float:
        """Seconds to keep serving hits after SUSPENDED.

        A hit needs an answer from ZooKeeper within 2/3 of the session
        timeout (kazoo's own dead-connection bound, which the sidecar also
        enforces itself), so a grace of at most a third keeps "last heard from
        ZooKeeper" + grace within one session timeout: no cached value is
        served after the session that would have received its invalidation
        could have expired.  Assumes the server grants the requested timeout
        (its maxSessionTimeout is at least ``zk_session_timeout``).
        """
        if self.suspended_grace is not None:
            return self.suspended_grace
        return self.zk_session_timeout / 3


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def settings_help() -> list[tuple[str, str, str, str]]:
    """Rows of (setting, env var, default, help) for docs and ``--help``."""
    rows = []
    for name, f in _FIELDS.items():
        default = f.default
        if name == "member_id":
            default = "$POD_NAME or hostname-pid"
        elif name == "suspended_grace":
            default = "auto"
        elif default is None:
            default = ""
        rows.append((name, ENV_PREFIX + name.upper(), str(default), f.metadata["help"]))
    return rows


def _parse_value(name: str, raw: Any) -> Any:
    parse = _FIELDS[name].metadata["parse"]
    try:
        return parse(str(raw) if not isinstance(raw, str) else raw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"setting '{name}': {exc}") from None


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"setting 'config': cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"setting 'config': {path} is not valid TOML: {exc}") from None
    table = data.get("sidecar", data)
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"setting '{unknown[0]}' in {path}: unknown setting")
    return dict(table)


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Build a :class:`Config` from a file, ``ZKCACHE_*`` variables and flags.

    ``flags`` maps setting names to raw values (``None`` means "not given").
    ``env`` defaults to ``os.environ``. Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        raw.update(_from_file(config_file))
    for name in _FIELDS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = value
    for name, value in (flags or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"setting '{name}': unknown setting")
        if value is not None:
            raw[name] = value
    return Config(**{name: _parse_value(name, value) for name, value in raw.items()})


# ZKCACHE_* names read by other programs of this project, not by the daemon.
_OTHER_ENV = frozenset({"CONFIG", "SIDECAR", "ZKSERVER"})


def unknown_env_names(env: Mapping[str, str] | None = None) -> list[str]:
    """``ZKCACHE_*`` variables that name no setting: most likely typos, worth a warning."""
    env = os.environ if env is None else env
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].lower() not in _FIELDS
        and name[len(ENV_PREFIX) :] not in _OTHER_ENV
    )


# Settings a namespace's config znode may change at run time (live.py applies them).
LIVE_SETTINGS = (
    "ttl",
    "max_entries",
    "max_bytes",
    "consistency",
    "suspended_reads",
    "log_level",
    "consistency_probe_rate",
    "consistency_probe_window",
)


def parse_live(data: bytes | None) -> dict[str, Any]:
    """The settings a config znode holds (a JSON object), parsed by the daemon's own parsers.

    Empty or absent data holds none.  Raises :class:`ConfigError` with one
    line: not JSON, not an object, a setting that is not live, a bad value.
    """
    if not data:
        return {}
    try:
        table = orjson.loads(data)
    except ValueError as exc:
        raise ConfigError(f"config znode: not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError("config znode: must hold a JSON object of settings")
    parsed = {}
    for name, raw in table.items():
        if name not in LIVE_SETTINGS:
            raise ConfigError(f"setting '{name}': not a live setting (live: {', '.join(LIVE_SETTINGS)})")
        if isinstance(raw, (dict, list, bool)) or raw is None:
            raise ConfigError(f"setting '{name}': must be a string or a number, got {raw!r}")
        parsed[name] = _parse_value(name, raw)
    return parsed


def container_memory_limit() -> int | None:
    """The cgroup's memory limit in bytes (v2, then v1), or None when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 reports "no limit" as a huge number
            return int(text)
        return None
    return None


def memory_needed(max_bytes: int) -> int:
    """What a sidecar with ``max_bytes`` may take (the chart's formula: 1.25 x max_bytes + 64 MiB)."""
    return max_bytes * 5 // 4 + 64 * 1024**2


def with_live(base: Config, live: Mapping[str, Any]) -> Config:
    """``base`` with the live settings ``live`` (from :func:`parse_live`) over it, checked as a whole.

    The config znode wins over flags, environment and file for the settings
    it holds; removing one from the znode brings back ``base``'s value.
    """
    return dataclasses.replace(base, **live)


def flag_names() -> Sequence[str]:
    """Setting names, in declaration order (for building the flag parser)."""
    return list(_FIELDS)
