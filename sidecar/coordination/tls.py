"""TLS to ZooKeeper: kazoo's options, and a one-line diagnosis when a connection fails.

kazoo only ever reports a failed TLS connection as a timeout (it logs each
attempt's SSL error and retries), so when the session does not come up the
sidecar and ``cachectl`` probe each server themselves with the same TLS
settings and say what is wrong: an unknown CA, a certificate for another
host, a client certificate the server requires or refuses, or a plaintext
port where a TLS one was expected (and the reverse).

Facts this relies on (checked against Debian's ZooKeeper 3.8.0, Netty on the
secure port): with TLS 1.3 a missing client certificate is only reported on
the first read after the handshake, so the probe sends a four-letter word
and reads; a TLS port closes at once on a plaintext ``ruok\\n`` (5 bytes: Netty
needs a record header to reject it); a plaintext port answers a TLS
ClientHello by closing.
"""

from __future__ import annotations

import socket
import ssl

from ..config import TlsSettings

__all__ = ["diagnose", "diagnose_hosts", "wrap"]


def wrap(sock: socket.socket, host: str, tls: TlsSettings) -> ssl.SSLSocket:
    """``sock`` with a TLS handshake done, as kazoo would make it."""
    return tls.context().wrap_socket(sock, server_hostname=host)


def _plaintext_reply(host: str, port: int, timeout: float) -> bytes:
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.sendall(b"ruok\n")
            return sock.recv(64)
    except OSError:
        return b""


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout) as sock:
            TlsSettings(verify=False).context().wrap_socket(sock, server_hostname=host).close()
        return True
    except ssl.SSLError as exc:  # a TLS alert is TLS too (it wants a client certificate)
        return "EOF" not in str(exc)
    except OSError:
        return False


def diagnose(host: str, port: int, tls: TlsSettings | None, timeout: float = 3.0) -> str | None:
    """Why a ZooKeeper client with these settings cannot talk to ``host:port``; None if it can.

    Each network step waits at most ``timeout``; a probe makes at most two.
    """
    where = f"{host}:{port}"
    ctx = None
    if tls is not None:
        try:  # our own files first: a Secret deleted or rotated badly since startup
            ctx = tls.context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return f"cannot load the TLS files: {exc}"
    try:
        raw = socket.create_connection((host, port), timeout)
    except OSError as exc:
        return f"{where}: cannot connect ({exc.strerror or exc})"
    raw.settimeout(timeout)
    if ctx is None:
        with raw:
            try:
                raw.sendall(b"ruok\n")
                reply = raw.recv(64)
            except TimeoutError:
                return f"{where} accepted the connection but did not answer within {timeout:g}s (a hung server?)"
            except OSError:
                reply = b""
        if reply:
            return None
        if _speaks_tls(host, port, timeout):
            return f"{where} is a TLS port (secureClientPort): set zk_tls"
        return f"{where} closed the connection without a reply"
    assert tls is not None
    stage = "handshake"
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as conn:
            stage = "first read"
            conn.sendall(b"srvr")  # srvr: allowed by ZooKeeper's default four-letter whitelist
            if conn.recv(64):
                return None
            return f"{where}: the server closed the TLS connection without a reply (see its log)"
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message):
            return f"{where}: its certificate is not valid for {host!r} ({exc.verify_message})"
        ca = f"zk_tls_ca {tls.ca}" if tls.ca else "the system's trust store (set zk_tls_ca)"
        return f"{where}: its certificate is not trusted by {ca} ({exc.verify_message})"
    except ssl.SSLError as exc:
        text = str(exc)
        if "CERTIFICATE_REQUIRED" in text or "BAD_CERTIFICATE" in text:
            if not (tls.cert and tls.key):
                return f"{where} requires a client certificate: set zk_tls_cert and zk_tls_key"
            return f"{where} refused the client certificate zk_tls_cert {tls.cert}"
        if "UNKNOWN_CA" in text or "CERTIFICATE_UNKNOWN" in text:
            if not (tls.cert and tls.key):
                return f"{where} refused the connection (certificate unknown): does it need a client certificate?"
            return (
                f"{where} does not accept the client certificate zk_tls_cert {tls.cert} "
                "(expired, or not signed by a CA it trusts)"
            )
        if stage == "handshake" and _plaintext_reply(host, port, timeout):
            return f"{where} is a plaintext port, not a TLS one (secureClientPort), or turn zk_tls off"
        return f"{where}: TLS {stage} failed ({exc.reason or text}); see the server's log"
    except TimeoutError:
        return f"{where} did not complete the TLS {stage} within {timeout:g}s (a hung server?)"
    except OSError as exc:
        if stage == "handshake" and _plaintext_reply(host, port, timeout):
            return f"{where} is a plaintext port, not a TLS one (secureClientPort), or turn zk_tls off"
        return f"{where}: TLS {stage} failed ({exc})"
    finally:
        raw.close()


def diagnose_hosts(hosts: str, tls: TlsSettings | None, budget: float = 6.0) -> str | None:
    """Why no server of a connect string can be reached as configured (each, joined); None if one can.

    ``budget`` bounds the whole probe, however many servers: each gets an
    equal share, split between its (at most two) network steps.
    """
    servers = [hp.strip().rpartition(":") for hp in hosts.partition("/")[0].split(",")]
    step = max(0.2, budget / len(servers) / 2)
    problems = []
    for host, _, port in servers:
        problem = diagnose(host.strip("[]"), int(port), tls, step)
        if problem is None:
            return None  # one server is enough for a session
        problems.append(problem)
    return "; ".join(problems) if problems else None
