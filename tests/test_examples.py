"""The client examples in examples/ (Python, Node, Java), each run as a subprocess against real sidecars.

Two sidecars on the session ZooKeeper, with a bearer token, shared by the
three examples (each uses its own key; starting them once keeps this file
quick). An example talks to the near one; afterwards both must serve what it
wrote (the far one had the key cached before, so the writes reached it
through ZooKeeper).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import SidecarProcess
from tests.conftest import SidecarFactory, _dump_logs_if_failed

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "example-token"
EXAMPLES = {
    "python": [sys.executable, "examples/client.py"],
    "node": ["node", "examples/client.mjs"],
    "java": ["java", "examples/Client.java"],
}
ETAG = r'"\d+"'


@pytest.fixture(scope="module")
def started(module_sidecars: SidecarFactory) -> list[SidecarProcess]:
    """Two sidecars (near, far) of one namespace and SQLite origin, as the ``sidecars`` fixture starts them."""
    procs = [module_sidecars(name, wait_ready=False, auth_token=TOKEN) for name in ("near-sidecar", "far-sidecar")]
    for proc in procs:  # started together, then waited for: the start-ups overlap
        proc.wait_ready()
    return procs


@pytest.fixture
def pair(started: list[SidecarProcess], request: pytest.FixtureRequest) -> Iterator[list[SidecarProcess]]:
    """The shared sidecars; their logs are printed when the test fails."""
    yield started
    for proc in started:
        _dump_logs_if_failed(request, f"sidecar {proc.name}", proc.log_tail)


def _run(lang: str, url: str, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKCACHE_")}
    env["ZKCACHE_URL"] = url
    if token is not None:
        env["ZKCACHE_AUTH_TOKEN"] = token
    return subprocess.run(EXAMPLES[lang], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any, bytes]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def _line(output: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"no line matching {pattern!r} in:\n{output}"
    return match


@pytest.mark.parametrize("lang", list(EXAMPLES))
def test_example_runs_against_live_sidecars(lang: str, request: pytest.FixtureRequest) -> None:
    binary = EXAMPLES[lang][0]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary!r} is not installed: the {lang} example cannot run here")
    near, far = request.getfixturevalue("pair")  # only once we know the example can run
    key = f"examples/{lang}/counter"
    assert _request(f"{near.url}/v1/keys/{key}", "PUT", b'{"count": -1}')[0] == 200
    status, headers, _ = _request(f"{far.url}/v1/keys/{key}")
    assert status == 200 and headers["X-Cache"] == "miss"  # far now caches the old value

    # Without the token: a 401 problem, reported on stderr, and a non-zero exit.
    if lang != "java":  # (java compiles the file on every run: one run is enough for it)
        refused = _run(lang, near.url, None)
        assert refused.returncode != 0 and "401 Missing or wrong bearer token" in refused.stderr, refused

    run = _run(lang, near.url, TOKEN)
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = run.stdout.rstrip("\n")
    first = _line(out, rf"^GET {key} -> 200, X-Cache: (hit|miss), ETag: ({ETAG}), body (.*)$")
    assert json.loads(first[3]) == {"count": 0}
    _line(out, rf"^GET {key} If-None-Match: {re.escape(first[2])} -> 304 Not Modified$")
    _line(out, rf"^GET examples/{lang}/never-written -> 404 Not found: the origin has no value for key")
    _line(out, rf"^PUT {key} If-Match: {re.escape(first[2])} -> 412 Precondition failed: .*; re-reading$")
    _line(out, rf"^PUT {key} If-Match: {ETAG} -> 200, count 11, ETag: {ETAG}$")
    applied = _line(out, r"^POST /v1/invalidate -> 200, applied by (.*)$")
    assert "near-sidecar" in applied[1] and "far-sidecar" in applied[1]
    last = _line(out, rf"^GET {key} -> 200, X-Cache: miss, ETag: ({ETAG}), body (.*)\Z")
    assert json.loads(last[2]) == {"count": 11}

    # What the example wrote is what both sidecars serve now, byte for byte, at the version it saw last.
    for sidecar in (near, far):
        status, headers, body = _request(f"{sidecar.url}/v1/keys/{key}")
        assert status == 200, (sidecar.name, body)
        assert body.decode() == last[2] and headers["ETag"] == last[1], sidecar.name
        assert headers["Content-Type"].startswith("application/json")
