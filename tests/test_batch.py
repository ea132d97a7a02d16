"""Batch reads (POST /v1/batch/get) with two real sidecar processes on the real ZooKeeper.

A batch reads each key through the same code as GET (``http_api._read_one``),
so these check what a batch adds: results in order, each with its own
status, ETag and cache outcome, failures confined to their own result,
limits, and that coherence holds across sidecars as for single reads.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, eventually
from tests.test_coherence import get, put

pytestmark = pytest.mark.slow


async def batch(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with http.post(f"{base}/v1/batch/get", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        return (await resp.json())["results"]  # type: ignore[no-any-return]


def value_of(result: dict[str, Any]) -> bytes:
    return base64.b64decode(result["value"])


async def test_each_key_has_its_own_status_etag_and_outcome(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a = sidecars("a")
    await put(http, a.url, "b/1", b"one")
    await put(http, a.url, "b/2", b"\x00\xffbinary")
    etag1 = (await get(http, a.url, "b/1"))[3]["ETag"]  # a hit from now on
    results = await batch(http, a.url, {"keys": ["b/1", "b/2", "b/none", "b/1"]})
    assert [r["key"] for r in results] == ["b/1", "b/2", "b/none", "b/1"]
    one, two, none, again = results
    assert one["status"] == 200 and value_of(one) == b"one" and one["etag"] == etag1 and one["cache"] == "hit"
    assert two["status"] == 200 and value_of(two) == b"\x00\xffbinary"
    assert none["status"] == 404 and none["problem"]["type"].endswith("/not-found") and "value" not in none
    assert again == one
    # What the batch read is now cached, with the ETag a single GET gives.
    status, _, _, headers = await get(http, a.url, "b/2")
    assert status == 200 and headers["ETag"] == two["etag"]
    assert (await batch(http, a.url, {"keys": ["b/2"]}))[0]["cache"] == "hit"


async def test_if_none_match_per_key(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a = sidecars("a")
    await put(http, a.url, "c/1", b"v")
    await put(http, a.url, "c/2", b"w")
    [one, _two] = await batch(http, a.url, {"keys": ["c/1", "c/2"]})
    results = await batch(http, a.url, {"keys": ["c/1", "c/2"], "if_none_match": {"c/1": one["etag"], "c/2": '"1"'}})
    assert results[0] == {"key": "c/1", "status": 304, "cache": "hit", "etag": one["etag"]}
    assert results[1]["status"] == 200 and value_of(results[1]) == b"w"


async def test_a_write_through_another_sidecar_reaches_batches(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a, b = sidecars("a"), sidecars("b")
    await put(http, a.url, "d/1", b"v1")
    await put(http, a.url, "d/2", b"w1")
    first = await batch(http, b.url, {"keys": ["d/1", "d/2"]})
    assert [value_of(r) for r in first] == [b"v1", b"w1"]
    await put(http, a.url, "d/1", b"v2")
    # Strong: never older than the acknowledged write, with no wait.
    strong = await batch(http, b.url, {"keys": ["d/1", "d/2"], "consistency": "strong"})
    assert [value_of(r) for r in strong] == [b"v2", b"w1"]

    # Eventual: b's watch drops d/1 within milliseconds; d/2 stays a hit.
    async def caught_up() -> bool:
        results = await batch(http, b.url, {"keys": ["d/1", "d/2"]})
        return value_of(results[0]) == b"v2" and results[1]["cache"] == "hit"

    await eventually(caught_up, what="sidecar b's batches to serve the write made through a")


async def test_bad_batches_are_400_and_limits_hold(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a = sidecars("a", max_value_bytes="1MiB")
    for body, needle in [
        ({"keys": []}, "non-empty"),
        ({"keys": ["k"] * 257}, "at most 256"),
        ({"keys": [""]}, "invalid entry"),
        ({"keys": ["k"], "consistency": "maybe"}, "consistency"),
        ({"keys": ["k"], "extra": 1}, "unknown field"),
        ({"keys": ["k"], "if_none_match": {"k": 42}}, "if_none_match"),
    ]:
        async with http.post(f"{a.url}/v1/batch/get", json=body) as resp:
            problem = await resp.json(content_type="application/problem+json")
            assert resp.status == 400 and needle in problem["detail"], (body, problem)
    async with http.post(f"{a.url}/v1/batch/get", data=b"{not json") as resp:
        assert resp.status == 400
    # Values beyond 4 MiB in all answer 413 each, not a response of any size.
    big = b"x" * (1024 * 1024 - 100)
    for i in range(6):
        await put(http, a.url, f"big/{i}", big)
    results = await batch(http, a.url, {"keys": [f"big/{i}" for i in range(6)]})
    assert [r["status"] for r in results] == [200, 200, 200, 200, 413, 413]
    assert results[4]["problem"]["type"].endswith("/payload-too-large")
