"""Batch reads (POST /v1/batch/get) with two real sidecar processes on the real ZooKeeper.

A batch reads each key through the same code as GET (``http_api._read_one``),
so these check what a batch adds: results in order, each with its own
status, ETag and cache outcome, failures confined to their own result,
limits, and that coherence holds across sidecars as for single reads.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import pytest

from harness import LocalZooKeeper, TcpProxy
from tests.conftest import SidecarFactory, eventually
from tests.test_coherence import get, get_hit, put

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


# Found by a hostile review: the batch looked its hits up, then awaited its
# misses, then served the hits as they were.  Cut off from ZooKeeper, with
# another sidecar's write acknowledged, the batch served the old value 5 s
# later while a single GET already answered the new one.
async def test_a_hit_looked_up_before_a_slow_miss_is_not_served_after_an_invalidation(
    sidecars: SidecarFactory, zk_server: LocalZooKeeper, upstream: str, http: aiohttp.ClientSession
) -> None:
    origin = f"{upstream}/kv"
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        b = sidecars("b", zk=proxy.address, origin=origin, zk_session_timeout="4s", suspended_grace="0s")
        a = sidecars("a", origin=origin)
        await put(http, a.url, "s/a", b"old")
        await get_hit(http, b.url, "s/a")
        # Every GET of s/slow at the origin is held until released.
        async with http.post(f"{upstream}/_control/hold/s/slow"):
            pass
        batch = asyncio.create_task(http.post(f"{b.url}/v1/batch/get", json={"keys": ["s/a", "s/slow"]}))

        async def held() -> bool:
            async with http.get(f"{upstream}/_control/held/s/slow") as r:
                return bool((await r.json())["held"])

        await eventually(held, what="the batch's miss held at the origin")
        t_hit = time.monotonic()  # the batch's hit on s/a was computed before this
        proxy.cut()
        status, _, _ = await put(http, a.url, "s/a", b"new")  # acknowledged; b cannot hear of it
        assert status == 200

        async def single_get_is_new() -> bool:
            st, src, body, _ = await get(http, b.url, "s/a")
            return st == 200 and body == b"new" and src == "bypass"

        await eventually(single_get_is_new, timeout=15, what="b's single GET to stop serving the old hit")
        # Well past the session timeout: b's session is expired at ZooKeeper (nothing to wait on:
        # b cannot hear of it while cut off).
        await asyncio.sleep(5)
        async with http.post(f"{upstream}/_control/release/s/slow"):
            pass
        resp = await batch
        results = (await resp.json())["results"]
        resp.release()
        served_after = time.monotonic() - t_hit
        first = results[0]
        assert not (
            first["status"] == 200 and base64.b64decode(first["value"]) == b"old" and first["cache"] == "hit"
        ), f"batch served the pre-write value as a hit {served_after:.1f}s after it was computed: {first}"


async def test_cache_aside_misses_get_a_lease_as_get_does(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    # Found by a hostile review: with origin=none a GET miss is 404 with a lease, a batch miss was 504.
    a = sidecars("a", origin="none")
    status, _, _, headers = await get(http, a.url, "ca/1")
    assert status == 404 and headers["ETag"]
    [result] = await batch(http, a.url, {"keys": ["ca/1"]})
    assert result["status"] == 404 and result["problem"]["type"].endswith("/not-found") and result["etag"]
