"""The API's contract: the OpenAPI document covers every route, the repository's
copy is current, and schemathesis finds nothing against a live sidecar."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.http_api import _KEY_HANDLERS, KEY_PREFIX, Api
from sidecar.openapi import document, problem_types, render
from sidecar.origins import NoOrigin
from sidecar.service import CacheService
from tests.conftest import SidecarFactory

ROOT = Path(__file__).resolve().parent.parent


def test_the_repository_copy_is_current() -> None:
    assert (ROOT / "openapi.json").read_bytes() == render(), (
        "openapi.json is stale: python -m sidecar.openapi > openapi.json"
    )


async def test_every_route_and_method_is_documented() -> None:
    service = CacheService(load_config(env={}), NoOrigin())
    served = {(path, method.lower()) for path, methods in Api(service)._routes.items() for method in methods}
    served |= {(KEY_PREFIX + "{key}", method.lower()) for method in _KEY_HANDLERS}
    documented = {(path, method) for path, ops in document()["paths"].items() for method in ops}
    assert served == documented, (
        f"served, not documented: {served - documented}; documented, not served: {documented - served}"
    )


def test_every_problem_type_is_documented() -> None:
    text = json.dumps(document())
    for uri, (status, _) in problem_types().items():
        assert f"{uri} ({status})" in text
    assert any(uri.endswith("/unsupported-content-encoding") for uri in problem_types())


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_a_live_sidecar(sidecars: SidecarFactory, tmp_path: Path) -> None:
    """Bounded: a few examples per operation, every check, one worker; no 5xx, every response as documented."""
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is in the test extra: pip install -e '.[test]'"
    sidecar = sidecars("contract")
    with urllib.request.urlopen(f"{sidecar.url}/openapi.json", timeout=5) as resp:
        assert resp.read() == render()
    run = subprocess.run(
        [
            schemathesis,
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            f"{sidecar.url}/openapi.json",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "10",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--seed",
            "14",  # reproducible in CI; change it to explore
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,  # its cache (.schemathesis/) stays out of the checkout
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
