"""HTTP to sidecars: one key through ``--sidecar``, and every member's ``/v1/stats``."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from sidecar.errors import SidecarError

from .options import Settings, Unreachable

__all__ = ["MemberStats", "key_request", "member_stats"]


def key_request(
    s: Settings, method: str, key: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """``method /v1/keys/{key}`` on ``--sidecar``; raises :class:`SidecarError` or :class:`Unreachable`."""
    url = f"{s.sidecar}/v1/keys/{quote(key, safe='')}"
    headers = dict(headers or {})
    if s.auth_token:
        headers["Authorization"] = f"Bearer {s.auth_token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=s.timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        raise SidecarError(f"{method} {key}: {err.code} {_detail(err.read(), str(err.reason))}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err or type(err).__name__
        raise Unreachable(f"cannot reach the sidecar at {s.sidecar}: {reason}") from None


def _detail(payload: bytes, default: str) -> str:
    try:
        detail = json.loads(payload).get("detail", default)
    except (ValueError, AttributeError):
        detail = default
    return str(detail)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(address: str, timeout: float) -> http.client.HTTPConnection:
    if address.startswith("unix:"):
        return _UnixConnection(address[len("unix:") :], timeout)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port or unix:/path")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


MemberStats = dict[str, Any]  # member_id, address, and stats (the raw document) or error


def _one(member: dict[str, Any], s: Settings) -> MemberStats:
    member_id, address = str(member.get("member_id", "?")), str(member.get("address", ""))
    row: MemberStats = {"member_id": member_id, "address": address}
    headers = {"Authorization": f"Bearer {s.auth_token}"} if s.auth_token else {}
    try:
        conn = _connection(address, s.timeout)
        try:
            conn.request("GET", "/v1/stats", headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            row["error"] = f"GET /v1/stats: {resp.status} {_detail(payload, resp.reason)}"
            return row
        stats = json.loads(payload)
    except ValueError as exc:
        row["error"] = str(exc) if "address" in str(exc) else f"GET /v1/stats: not JSON: {exc}"
        return row
    except (OSError, http.client.HTTPException) as exc:
        row["error"] = f"cannot reach {address}: {exc or type(exc).__name__}"
        return row
    if not isinstance(stats, dict) or stats.get("member_id") != member_id:
        answered = stats.get("member_id") if isinstance(stats, dict) else None
        row["error"] = f"{address} answered as {answered!r}, not as this member (another sidecar at that address)"
        return row
    row["stats"] = stats
    return row


def member_stats(members: list[dict[str, Any]], s: Settings) -> list[MemberStats]:
    """Every member's ``/v1/stats``, side by side, in the order given; a failure is a row with ``error``."""
    if not members:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(members))) as pool:
        return list(pool.map(lambda m: _one(m, s), members))
