"""HTTP that survives its clients (issue 14): each probe a misbehaving or hostile
local client sent, against a real sidecar process on the real ZooKeeper.

The probes go over raw sockets, so that what is sent is exactly what the
issue sent (a NUL in the path, a gzip header on a plain body, one header byte
every 200 ms), and the answer is read as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from harness import SidecarProcess
from tests.conftest import SidecarFactory, held_origin_put

pytestmark = pytest.mark.slow

IDLE = 1.5  # http_idle_timeout of the sidecar under test
BODY = 3.0  # http_body_timeout (a body waits at most 1 s for max_inflight_bytes)
MAX_CONNECTIONS = 20


@pytest.fixture(scope="module")
def sidecar(module_sidecars: SidecarFactory) -> SidecarProcess:
    return module_sidecars(
        "hard",
        zk_session_timeout="10s",
        http_idle_timeout=f"{IDLE}s",
        http_body_timeout=f"{BODY}s",
        max_connections=str(MAX_CONNECTIONS),
        max_value_bytes="1MiB",
        max_inflight_bytes="2MiB",  # one 1 MiB body, charged twice
    )


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0] if lines else ""
        self.status = int(self.status_line.split()[1]) if self.status_line.startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def problem(self) -> dict[str, object]:
        assert self.headers.get("content-type") == "application/problem+json", (self.status_line, self.headers)
        doc = json.loads(self.body)
        assert doc["status"] == self.status and doc["title"] and doc["detail"], doc
        return doc  # type: ignore[no-any-return]


def send(sidecar: SidecarProcess, data: bytes, timeout: float = 10.0) -> Reply:
    """Send raw bytes, read until the server closes (the probes ask for Connection: close)."""
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return Reply(b"".join(chunks))


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: sidecar", "Connection: close", *headers]
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def put(sidecar: SidecarProcess, key: str, value: bytes) -> str:
    reply = send(sidecar, request("PUT", f"/v1/keys/{key}", body=value))
    assert reply.status == 200, reply.body
    return reply.headers["etag"]


def log_of(sidecar: SidecarProcess) -> str:
    return Path(sidecar.log_path).read_text(errors="replace")


# -- encoded bodies -----------------------------------------------------------
@pytest.mark.parametrize(
    "encoding, body",
    [
        ("gzip", b"not gzip"),
        ("deflate", b"not deflate"),
        ("gzip", gzip.compress(b"real gzip", mtime=0)),
        ("bogus", b"x"),
    ],
    ids=["false-gzip", "false-deflate", "real-gzip", "bogus"],
)
def test_an_encoded_body_is_refused_with_415(sidecar: SidecarProcess, encoding: str, body: bytes) -> None:
    # Before: 500 with a traceback for a false gzip, a real one decompressed
    # and stored, 'bogus' accepted.
    reply = send(sidecar, request("PUT", "/v1/keys/enc", f"Content-Encoding: {encoding}", body=body))
    assert reply.status == 415 and reply.problem()["type"].endswith("/unsupported-content-encoding")
    assert reply.headers["accept-encoding"] == "identity"
    assert send(sidecar, request("GET", "/v1/keys/enc")).status == 404, "nothing was stored"


def test_identity_is_no_encoding(sidecar: SidecarProcess) -> None:
    reply = send(sidecar, request("PUT", "/v1/keys/ident", "Content-Encoding: identity", body=b"v"))
    assert reply.status == 200


# -- what aiohttp's parser refuses ---------------------------------------------
@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET /v1/keys/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/keys/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/keys/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431),
        # Found by a hostile review: a header whose value starts with '/' was 414, an absolute-form target 431.
        (b"GET /healthz HTTP/1.1\r\nReferer: /" + b"a" * 10_000 + b"\r\n\r\n", 431),
        (b"GET http://x/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"BREW /v1/keys/a HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"PUT /v1/keys/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    ],
    ids=[
        "0xff-in-path",
        "nul-in-path",
        "100kb-url",
        "10kb-header",
        "10kb-referer-of-a-path",
        "100kb-absolute-url",
        "unknown-method",
        "bad-chunk-size",
    ],
)
def test_parser_errors_are_problem_documents_over_http_1_1(sidecar: SidecarProcess, raw: bytes, status: int) -> None:
    # Before: text/plain over HTTP/1.0 (one suggesting to install Brotli), and a full ERROR traceback each.
    reply = send(sidecar, raw)
    assert reply.status_line.startswith(f"HTTP/1.1 {status} "), reply.status_line
    reply.problem()
    assert reply.headers.get("connection") == "close"
    assert "Traceback" not in log_of(sidecar) and " ERROR " not in log_of(sidecar)


def _keepalive_pair(sidecar: SidecarProcess, first: bytes, second: bytes) -> list[int]:
    head, sep, rest = first.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(head + sep)  # the body in its own segment, after the request began
        time.sleep(0.3)
        sock.sendall(rest)
        got = b""
        while got.count(b"HTTP/1.1 ") < 1 or b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        time.sleep(0.2)
        sock.sendall(second)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
    return [Reply(got).status, Reply(out).status]


# Found by a second review: bytes of a body were counted as a request line.
def test_long_header_after_a_newline_free_body_is_431(sidecar: SidecarProcess) -> None:
    body = b"a" * 9000  # a value with no newline, on a keep-alive connection
    first = b"PUT /v1/keys/nl HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"GET /v1/keys/nl HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10000 + b"\r\n\r\n"
    assert _keepalive_pair(sidecar, first, second) == [200, 431]


def test_long_target_after_a_chunked_body_is_414(sidecar: SidecarProcess) -> None:
    first = b"PUT /v1/keys/ch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    second = b"GET /v1/keys/" + b"c" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _keepalive_pair(sidecar, first, second) == [200, 414]


def test_a_client_leaving_mid_body_is_logged_at_debug_level(sidecar: SidecarProcess) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"PUT /v1/keys/gone HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        time.sleep(0.2)  # let the handler start reading the body (nothing to wait on from outside)
    assert send(sidecar, request("GET", "/healthz")).status == 200
    log = log_of(sidecar)
    assert "Traceback" not in log and " ERROR " not in log and "unhandled" not in log


# -- connections held by idle, slow and many clients ---------------------------
def _closed_within(sock: socket.socket, seconds: float) -> float:
    started = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(65536):
        pass
    return time.monotonic() - started


def test_an_idle_connection_is_closed(sidecar: SidecarProcess) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        took = _closed_within(sock, IDLE + 5)  # raises socket.timeout if held
    assert took < IDLE + 2


def test_a_slowloris_client_is_closed(sidecar: SidecarProcess) -> None:
    # One header byte every 200 ms: the headers never complete.
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                assert time.monotonic() - started < IDLE + 5, "a slowloris connection was held"
                sock.send(bytes([byte]))
                time.sleep(0.2)
            raise AssertionError("every byte was accepted")


def test_a_body_that_stops_arriving_gets_408(sidecar: SidecarProcess) -> None:
    started = time.monotonic()
    reply = send(sidecar, b"PUT /v1/keys/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert reply.status == 408 and reply.problem()["type"].endswith("/request-timeout")
    assert time.monotonic() - started < BODY + 4


def test_at_max_connections_idle_ones_make_room_and_probes_answer(sidecar: SidecarProcess) -> None:
    # Before: at the descriptor limit (about 20,000 idle connections) nothing answered, /healthz
    # included, and nothing was logged.
    idle = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        for _ in range(3):
            assert send(sidecar, request("GET", "/healthz")).status == 200
        still_open = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
        assert still_open <= MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    assert f"max_connections ({MAX_CONNECTIONS}) reached: closed the longest idle connection" in log_of(sidecar)


def test_at_max_connections_all_busy_a_new_one_gets_503(sidecar: SidecarProcess) -> None:
    busy = []
    try:
        # Each a PUT whose body is still arriving: in progress.  A few more than
        # the bound, as a connection whose request is not yet read counts as idle.
        for i in range(MAX_CONNECTIONS + 5):
            sock = socket.create_connection(("127.0.0.1", sidecar.port))
            sock.sendall(b"PUT /v1/keys/busy%d HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab" % i)
            busy.append(sock)
        deadline = time.monotonic() + BODY - 0.5  # before their bodies time out
        while True:  # until the sidecar has read every one of them
            reply = send(sidecar, request("GET", "/healthz"))
            if reply.status == 503 or time.monotonic() > deadline:
                break
        assert reply.status == 503 and reply.headers["retry-after"] == "1", log_of(sidecar)[-3000:]
        assert reply.problem()["type"].endswith("/too-many-connections")
    finally:
        for sock in busy:
            sock.close()


# -- bytes in flight ----------------------------------------------------------------
async def test_bodies_in_flight_are_bounded_by_max_inflight_bytes(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    # A 1 MiB body is charged twice its size while it is read and written: with
    # max_inflight_bytes 2 MiB, one write whose origin call is held holds it all,
    # and another body waits for room, then gets 503 rather than memory.
    a = sidecars(
        "a", origin=f"{upstream}/kv", max_value_bytes="1MiB", max_inflight_bytes="2MiB", http_body_timeout="2s"
    )
    async with held_origin_put(http, upstream, "big", before=True) as until_held:
        big = asyncio.create_task(http.put(f"{a.url}/v1/keys/big", data=b"x" * 1024 * 1024))
        await until_held()
        async with http.put(f"{a.url}/v1/keys/small", data=b"small") as resp:
            problem = await resp.json(content_type="application/problem+json")
            assert resp.status == 503 and resp.headers["Retry-After"] == "1", problem
            assert "max_inflight_bytes" in problem["detail"]
    async with await big as resp:
        assert resp.status == 200
    async with http.put(f"{a.url}/v1/keys/small", data=b"small") as resp:
        assert resp.status == 200


async def test_a_body_holding_room_must_keep_coming(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    # Found by a second review: one body byte with a 1 MiB Content-Length held
    # the whole budget for http_body_timeout (30 s), and every other write
    # waited for it.  Holding room, the rest must arrive within 2 s plus its
    # size at 1 MiB/s: the other write gets through in seconds.
    a = sidecars("a", max_value_bytes="1MiB", max_inflight_bytes="2MiB")  # http_body_timeout: 30 s
    sock = socket.create_connection(("127.0.0.1", a.port))
    try:
        sock.sendall(b"PUT /v1/keys/onebyte HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nx" % (1024 * 1024))
        await asyncio.sleep(0.3)  # its handler has taken the room (nothing observable from outside)
        started = time.monotonic()
        async with http.put(f"{a.url}/v1/keys/victim", data=b"fine") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 8, "a stalled body held the budget far past its grace"
    finally:
        sock.close()


def test_concurrent_bodies_larger_than_the_budget_all_get_through(sidecar: SidecarProcess) -> None:
    # Charged as they arrived, 16 concurrent 1 MiB PUTs each held part of the
    # budget and waited for the rest until all were 503: a body blocked on the
    # budget now gives back what it holds and waits for all of it at once.
    value = b"y" * (1024 * 1024 - 16)
    replies: list[Reply] = []

    def one(i: int) -> None:
        replies.append(send(sidecar, request("PUT", f"/v1/keys/many{i}", body=value)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(r.status for r in replies) == [200] * 4, [r.status_line for r in replies]


def test_an_oversized_chunked_body_is_refused_without_reading_it_all(sidecar: SidecarProcess) -> None:
    # Before: a chunked body was read whole (up to aiohttp's 2 MiB backstop) before the 413;
    # 300 such uploads at once peaked at 1,306 MiB.
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"z" * 64 * 1024)
    answered = threading.Event()
    reply = b""
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(b"PUT /v1/keys/huge HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")

        def read() -> None:
            nonlocal reply
            reply = sock.recv(65536)
            answered.set()

        reader = threading.Thread(target=read)
        reader.start()
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 16 * 1024 * 1024 and not answered.is_set():
                sock.sendall(chunk)
                sent += len(chunk)
                time.sleep(0.002)
        reader.join(10)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:100]
    assert sent < 16 * 1024 * 1024, "the sidecar read 16 MiB of a body whose limit is 1 MiB before answering"


# -- conditional requests (RFC 9110) ------------------------------------------------
def test_weak_tags_never_match_if_match(sidecar: SidecarProcess) -> None:
    etag = put(sidecar, "cond", b"v1")
    reply = send(sidecar, request("PUT", "/v1/keys/cond", f"If-Match: W/{etag}", body=b"v2"))
    assert reply.status == 412, reply.status_line
    reply = send(sidecar, request("GET", "/v1/keys/cond", f"If-Match: W/{etag}"))
    assert reply.status == 412, reply.status_line
    assert send(sidecar, request("GET", "/v1/keys/cond")).body == b"v1"


@pytest.mark.parametrize("header", ["*", "W/{etag}", "{etag}", '"1", {etag}'])
def test_if_none_match_on_get_gives_304(sidecar: SidecarProcess, header: str) -> None:
    etag = put(sidecar, "inm", b"v")
    reply = send(sidecar, request("GET", "/v1/keys/inm", f"If-None-Match: {header.format(etag=etag)}"))
    assert reply.status == 304 and reply.headers["etag"] == etag and reply.body == b""
    assert reply.headers["cache-control"] == "private, no-cache"


def test_non_ascii_digits_are_not_versions(sidecar: SidecarProcess) -> None:
    put(sidecar, "digits", b"v")
    raw = request("PUT", "/v1/keys/digits", 'If-Match: "٢٨"', body=b"w")  # Arabic-Indic 2 and 8
    reply = send(sidecar, raw)
    assert reply.status == 400 and "If-Match" in str(reply.problem()["detail"])


def test_head_on_a_key(sidecar: SidecarProcess) -> None:
    etag = put(sidecar, "head", b"12345")
    reply = send(sidecar, request("HEAD", "/v1/keys/head"))
    assert reply.status == 200 and reply.body == b""
    assert reply.headers["etag"] == etag and reply.headers["content-length"] == "5"


@pytest.mark.parametrize(
    "cache_control, status",
    [("only-if-cached", 504), ("max-age=0, Only-If-Cached", 504), ("x-only-if-cached-not", 404), ("no-cache", 404)],
)
def test_only_if_cached_is_a_directive_not_a_substring(
    sidecar: SidecarProcess, cache_control: str, status: int
) -> None:
    reply = send(sidecar, request("GET", "/v1/keys/never-written", f"Cache-Control: {cache_control}"))
    assert reply.status == status, reply.status_line


def test_a_malformed_percent_escape_is_400(sidecar: SidecarProcess) -> None:
    for target in ("/v1/keys/ab%4", "/v1/keys/ab%zz", "/v1/keys/%"):
        reply = send(sidecar, request("GET", target))
        assert reply.status == 400 and reply.problem()["type"].endswith("/invalid-key"), target


@pytest.mark.parametrize("wait, status", [("yes", 400), ("TRUE", 202), ("no", 400), ("false", 202), ("0", 202)])
def test_wait_takes_only_documented_booleans(sidecar: SidecarProcess, wait: str, status: int) -> None:
    reply = send(sidecar, request("POST", f"/v1/invalidate?wait={wait}", body=b'{"keys": ["w"]}'))
    expected = 200 if wait.lower() == "true" else status
    assert reply.status == expected, (wait, reply.status_line, reply.body)


def test_a_long_content_type_is_refused(sidecar: SidecarProcess) -> None:
    reply = send(sidecar, request("PUT", "/v1/keys/ct", "Content-Type: text/plain; x=" + "a" * 8000, body=b"v"))
    assert reply.status == 400 and "Content-Type" in str(reply.problem()["detail"])


def test_401_carries_www_authenticate(sidecars: SidecarFactory) -> None:
    proc = sidecars("auth", origin="none", auth_token="s3cret", zk_session_timeout="10s", log_level="info")
    reply = send(proc, request("GET", "/v1/keys/k"))
    assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer ")
    assert send(proc, request("GET", "/healthz")).status == 200


# -- HTTP caches in the application's client ----------------------------------------
def test_value_responses_make_client_caches_revalidate(sidecar: SidecarProcess) -> None:
    """A real client-side HTTP cache (requests-cache, honouring Cache-Control) never serves a dropped value.

    Before: no Cache-Control, so a heuristic-freshness cache kept serving
    v1 after v2 was written.
    """
    import requests_cache

    client = requests_cache.CachedSession(backend="memory", cache_control=True, expire_after=3600)
    url = f"{sidecar.url}/v1/keys/client-cached"
    put(sidecar, "client-cached", b"v1")
    first = client.get(url)
    assert first.content == b"v1" and first.headers["Cache-Control"] == "private, no-cache"
    again = client.get(url)  # revalidated with If-None-Match: the sidecar's 304, then the stored body
    assert again.content == b"v1" and again.from_cache
    put(sidecar, "client-cached", b"v2")
    assert client.get(url).content == b"v2", "the client's HTTP cache served a value the sidecar had replaced"


def test_headers_alone_hold_no_budget(sidecar: SidecarProcess) -> None:
    # Found by a hostile review: when declared lengths were charged up front,
    # a few header-only PUTs (no body byte ever sent) held the whole budget
    # and every other write got 503 for http_body_timeout.
    mib = 1024 * 1024
    idle = []
    try:
        for i in range(4):  # 4 MiB declared, against a 2 MiB budget
            sock = socket.create_connection(("127.0.0.1", sidecar.port))
            sock.sendall(b"PUT /v1/keys/hdr%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (i, mib))
            idle.append(sock)
        time.sleep(0.3)  # their handlers are waiting for body bytes (nothing observable from outside)
        assert put(sidecar, "after-headers", b"fine")
    finally:
        for sock in idle:
            sock.close()


def test_none_of_the_probes_left_a_traceback_or_an_error(sidecar: SidecarProcess) -> None:
    # Last in the file: the whole module's probes went to this one sidecar.
    log = log_of(sidecar)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
