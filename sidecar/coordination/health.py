"""What ``cachectl doctor`` checks: the ensemble (four-letter words), the namespace, the origin.

Each server of the connect string is asked ``ruok``, ``srvr``, ``mntr`` and
``conf`` on its client port.  The answers become :class:`Finding` lines, one
per fact an operator acts on; any finding with ``problem=True`` makes the
command exit non-zero.  Nothing here needs a ZooKeeper session, so it works
when sessions cannot be established (no quorum), which is when it matters.

Servers must allow the words (``4lw.commands.whitelist``, ZooKeeper 3.5+);
a server that refuses them is reported as a problem, since its health
cannot be seen.  The namespace part needs a session (:func:`check_namespace`);
the origin is read once through the sidecars' own origin code
(:func:`check_origin`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import ssl
import time
from dataclasses import dataclass

import orjson

from ..config import TlsSettings, parse_origin
from ..errors import SidecarError
from ..origins import open_origin
from ..origins.sqlite import sqlite_path
from .election import current_leader
from .layout import Layout
from .operations import list_members
from .session import ZkSession
from .tls import diagnose, wrap

__all__ = ["Finding", "check_ensemble", "check_namespace", "check_origin", "four_letter"]

# Above this many requests waiting in a server's queue, clients see latency.
_OUTSTANDING_LIMIT = 100
_NOT_ALLOWED = "is not executed because it is not in the whitelist"


def four_letter(host: str, port: int, cmd: str, timeout: float = 1.0, tls: TlsSettings | None = None) -> str:
    """Send a four-letter word (``ruok``, ``mntr``, ``srvr``, ``conf``) and return the answer.

    With ``tls``, over TLS: a secure client port answers them after the
    handshake (kazoo's own ``command()`` cannot, with TLS on).
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = raw if tls is None else wrap(raw, host, tls)
        with sock:
            sock.sendall(cmd.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: which server (or ``ensemble``), what, and whether it is a problem."""

    subject: str
    text: str
    problem: bool = False

    def __str__(self) -> str:
        return f"{'PROBLEM' if self.problem else 'ok'} {self.subject}: {self.text}"


def _pairs(answer: str, sep: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in answer.splitlines():
        name, found, value = line.partition(sep)
        if found:
            out[name.strip()] = value.strip()
    return out


def _check_server(
    host: str, port: int, session_timeout: float, timeout: float, tls: TlsSettings | None = None
) -> tuple[list[Finding], str | None]:
    """Findings for one server, and its mode (``leader``, ``follower``, ``standalone``) if it serves."""
    who = f"{host}:{port}"
    try:
        return _ask_server(who, host, port, session_timeout, timeout, tls)
    except ssl.SSLError:
        return [Finding(who, diagnose(host, port, tls, timeout) or "TLS failed", True)], None
    except TimeoutError:
        # Accepted the connection but never answered: a paused or overloaded JVM.
        return [Finding(who, f"no answer within {timeout:g}s", True)], None
    except OSError as exc:
        return [Finding(who, f"not reachable ({exc.strerror or exc})", True)], None


def _ask_server(
    who: str, host: str, port: int, session_timeout: float, timeout: float, tls: TlsSettings | None
) -> tuple[list[Finding], str | None]:
    ruok = four_letter(host, port, "ruok", timeout, tls)
    if _NOT_ALLOWED in ruok:
        return [
            Finding(who, "refuses four-letter words: add ruok, srvr, mntr, conf to 4lw.commands.whitelist", True)
        ], None
    if ruok.strip() != "imok":
        hint = diagnose(host, port, tls, timeout) if not ruok.strip() else None  # a TLS port, asked in plaintext?
        return [Finding(who, hint or f"ruok answered {ruok.strip()!r}, not imok", True)], None
    srvr = four_letter(host, port, "srvr", timeout, tls)
    if _NOT_ALLOWED in srvr:
        return [Finding(who, "refuses srvr: add it to 4lw.commands.whitelist", True)], None
    stats = _pairs(srvr, ":")
    mode = stats.get("Mode")
    if mode is None:
        return [Finding(who, "running but not serving requests (no quorum, or still joining)", True)], None
    mntr = _pairs(four_letter(host, port, "mntr", timeout, tls), "\t")
    conf = _pairs(four_letter(host, port, "conf", timeout, tls), "=")
    findings = [
        Finding(
            who,
            f"{mode}, latency min/avg/max {stats.get('Latency min/avg/max', '?')} ms, "
            f"{mntr.get('zk_znode_count', stats.get('Node count', '?'))} znodes, "
            f"{mntr.get('zk_watch_count', '?')} watches, {mntr.get('zk_num_alive_connections', '?')} connections",
        )
    ]
    outstanding = int(stats.get("Outstanding", "0") or 0)
    if outstanding > _OUTSTANDING_LIMIT:
        findings.append(Finding(who, f"{outstanding} requests outstanding (more than {_OUTSTANDING_LIMIT})", True))
    max_session = conf.get("maxSessionTimeout")
    if max_session is None:
        findings.append(Finding(who, "conf did not say maxSessionTimeout (add conf to 4lw.commands.whitelist)", True))
    elif int(max_session) < session_timeout * 1000:
        findings.append(
            Finding(
                who,
                f"maxSessionTimeout {int(max_session) / 1000:g}s is below the sidecars' zk_session_timeout "
                f"{session_timeout:g}s: sessions are granted less, and the hit grace assumes the full timeout",
                True,
            )
        )
    return findings, mode


def check_ensemble(
    connect: str, session_timeout: float, timeout: float = 2.0, tls: TlsSettings | None = None
) -> list[Finding]:
    """Every server of ``connect`` (``host:port,...[/chroot]``), then the ensemble as a whole."""
    hosts = connect.partition("/")[0]
    findings: list[Finding] = []
    modes: list[str | None] = []
    for hp in hosts.split(","):
        host, _, port = hp.strip().rpartition(":")
        server, mode = _check_server(host.strip("[]"), int(port), session_timeout, timeout, tls)
        findings += server
        modes.append(mode)
    serving = sum(mode is not None for mode in modes)
    if "standalone" in modes:
        findings.append(Finding("ensemble", "a standalone server: no replication, fine for development only"))
    elif "leader" not in modes:
        findings.append(Finding("ensemble", "no server of the connect string is leader: writes cannot succeed", True))
    elif serving * 2 <= len(modes):
        findings.append(Finding("ensemble", f"only {serving} of {len(modes)} servers serve: quorum at risk", True))
    else:
        findings.append(Finding("ensemble", f"{serving} of {len(modes)} servers serve, one leader"))
    return findings


async def check_namespace(zk: ZkSession, layout: Layout, ack_timeout: float = 2.0) -> list[Finding]:
    """The namespace: its leader and last housekeeping round, and how fast each member applies a change.

    Bumps ``ackreq`` (what ``invalidate --wait`` does) and times each member's
    confirmation: a member that does not confirm within ``ack_timeout`` is
    not applying invalidations, and its applied zxid says how far behind it is.
    """
    subject = f"namespace {layout.root}"
    findings: list[Finding] = []
    leader = await current_leader(zk, layout)
    members = await list_members(zk, layout, with_leader=True)
    if leader is None:
        findings.append(
            Finding(subject, "no leader: no sidecar stands, so nothing keeps ZooKeeper small", bool(members))
        )
    else:
        findings.append(Finding(subject, f"leader {leader.get('member_id', '?')} (session {leader['session']})"))
        findings += _last_round(subject, await zk.get(layout.leader))
    if not members:
        findings.append(Finding(subject, "no live sidecars"))
        return findings
    findings += await _acknowledgements(zk, layout, members, ack_timeout)
    return findings


def _last_round(subject: str, leader_znode: tuple[bytes, object]) -> list[Finding]:
    try:
        report = orjson.loads(leader_znode[0] or b"{}")
    except orjson.JSONDecodeError:
        report = {}
    if not report.get("finished_at"):
        return [Finding(subject, "no housekeeping round completed yet")]
    age = time.time() - float(report["finished_at"])
    interval = float(report.get("interval", 60))
    findings = [
        Finding(
            subject,
            f"last housekeeping round {age:.0f}s ago by {report.get('member_id', '?')}: "
            f"{report.get('scanned', '?')} version znodes (retention {report.get('retention', 0):g}s), "
            f"{report.get('retired', 0)} retired, {report.get('repaired', 0)} intents repaired, "
            f"{report.get('open_intents', 0)} open, the oldest {report.get('oldest_intent_seconds', 0):g}s old",
        )
    ]
    # A round takes scanned / rate seconds; three intervals plus that is late.
    if age > 3 * interval + float(report.get("seconds", 0)) + 30:
        findings.append(Finding(subject, f"no housekeeping round for {age:.0f}s (interval {interval:g}s)", True))
    lock_timeout = float(report.get("lock_timeout", 0))
    if lock_timeout and float(report.get("oldest_intent_seconds", 0)) > 2 * lock_timeout:
        findings.append(
            Finding(
                subject,
                f"a key has been in intent for {report['oldest_intent_seconds']:g}s (lock_timeout "
                f"{lock_timeout:g}s): a writer stuck with its lock, or a write of unknown outcome kept it "
                "(check the origin, then cachectl invalidate the key); it is not cached anywhere meanwhile",
                True,
            )
        )
    return findings


async def _acknowledgements(
    zk: ZkSession, layout: Layout, members: list[dict[str, object]], timeout: float
) -> list[Finding]:
    stat = await zk.set(layout.ackreq, b"{}")
    target = int(stat.mzxid)
    started = time.monotonic()
    confirmed: dict[str, float] = {}
    latest = {str(m["member_id"]): m for m in members}
    while time.monotonic() - started < timeout:
        for member in await list_members(zk, layout, with_leader=True):
            name = str(member["member_id"])
            latest[name] = member
            applied = member.get("applied_zxid")
            if name not in confirmed and isinstance(applied, int) and applied >= target:
                confirmed[name] = time.monotonic() - started
        if all(name in confirmed for name in latest):
            break
        await asyncio.sleep(0.01)
    findings = []
    for name, member in sorted(latest.items()):
        who = f"member {name}{' (leader)' if member.get('leader') else ''}"
        if name in confirmed:
            findings.append(Finding(who, f"applied zxid 0x{target:x} within {confirmed[name] * 1000:.0f} ms"))
        else:
            applied = member.get("applied_zxid")
            behind = target - applied if isinstance(applied, int) else "?"
            findings.append(
                Finding(
                    who,
                    f"did not confirm zxid 0x{target:x} within {timeout:g}s (applied "
                    f"0x{applied if isinstance(applied, int) else 0:x}, {behind} transactions behind): "
                    "not ready, or not receiving ZooKeeper's events",
                    True,
                )
            )
    return findings


# A key no application uses: the origin is asked for it, and must answer.
_PROBE_KEY = "__zkcache_doctor__"


async def check_origin(url: str, timeout: float) -> list[Finding]:
    """The origin's own health: one timed read through the sidecars' own origin code.

    A read of a key nobody writes must answer (404, i.e. ``None``, or a
    value) within ``timeout``; a connection error, an error status or a
    timeout is a problem.  For SQLite it also runs ``PRAGMA quick_check``
    on the file (only meaningful where the file is: the sidecar's host); for
    Redis it reads ``INFO replication`` (a server that is not the primary,
    or fewer replicas than writes wait for, is a problem).
    """
    subject = f"origin {_without_password(url)}"
    try:
        checked = parse_origin(url)  # the daemon's own validation of the setting
    except ValueError as exc:
        return [Finding(subject, f"not an origin URL: {exc}", True)]
    if checked == "none":
        return [Finding(subject, "none: cache-aside fills only, nothing to check")]
    if checked.startswith("sqlite:") and not await asyncio.to_thread(os.path.exists, sqlite_path(checked)):
        return [Finding(subject, "no such file here (a SQLite origin is checked on the sidecar's host)", True)]
    try:
        origin = await open_origin(checked, timeout, 1024 * 1024)
    except (SidecarError, OSError) as exc:
        return [Finding(subject, f"cannot be opened: {exc}", True)]
    findings: list[Finding] = []
    try:
        started = time.monotonic()
        try:
            await origin.get(_PROBE_KEY)
        except SidecarError as exc:
            return [Finding(subject, f"a read failed: {getattr(exc, 'detail', exc)}", True)]
        findings.append(Finding(subject, f"answered a read in {(time.monotonic() - started) * 1000:.1f} ms"))
        if checked.startswith("sqlite:"):
            result = await asyncio.to_thread(_quick_check, sqlite_path(checked), timeout)
            findings.append(Finding(subject, f"PRAGMA quick_check: {result}", result != "ok"))
        if checked.startswith("redis"):
            from ..origins.redis import RedisOrigin  # redis-py is imported only when used

            assert isinstance(origin, RedisOrigin)
            try:
                findings.append(Finding(subject, f"INFO replication: {await origin.describe()}"))
            except SidecarError as exc:
                findings.append(Finding(subject, f"INFO replication failed: {getattr(exc, 'detail', exc)}", True))
            findings.extend(Finding(subject, problem, True) for problem in await origin.health())
    finally:
        await origin.close()
    return findings


def _without_password(url: str) -> str:
    """``url`` with the password in its user info replaced (doctor's lines end up in tickets)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}"


def _quick_check(path: str, timeout: float) -> str:
    db = sqlite3.connect(path, timeout=timeout)
    try:
        return str(db.execute("PRAGMA quick_check").fetchone()[0])
    finally:
        db.close()
