"""The Redis origin against a real ``redis-server``: layout, bounds, errors, and sidecars over it.

The Sentinel failover test is in ``test_redis_sentinel.py``.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from harness.redis import LocalRedis
from sidecar.config import parse_origin
from sidecar.errors import OriginError, OriginTimeout, OriginUnavailable
from sidecar.origins import OriginValue, open_origin
from sidecar.origins.redis import parse_redis_url
from tests.conftest import SidecarFactory, eventually


async def test_values_and_content_types_are_hashes_any_redis_client_reads(
    redis_server: LocalRedis, redis_url: str, namespace: str
) -> None:
    origin = await open_origin(redis_url, 2.0, 1024)
    try:
        await origin.put("user/42", OriginValue(b'{"n":1}', "application/json"))
        assert await origin.get("user/42") == OriginValue(b'{"n":1}', "application/json")
        with redis_server.client() as plain:  # the documented layout, read by another client
            assert plain.hgetall(f"{namespace}:user/42") == {b"value": b'{"n":1}', b"content_type": b"application/json"}
            plain.hset(f"{namespace}:other", mapping={"value": b"\xff\x00"})  # written elsewhere, no content type
        assert await origin.get("other") == OriginValue(b"\xff\x00", "application/octet-stream")
        assert await origin.get("absent") is None
        await origin.delete("user/42")
        await origin.delete("user/42")  # absent: not an error
        assert await origin.get("user/42") is None
    finally:
        await origin.close()


async def test_a_value_larger_than_the_limit_is_refused_without_being_fetched(
    redis_server: LocalRedis, redis_url: str, namespace: str
) -> None:
    origin = await open_origin(redis_url, 2.0, 1024)
    try:
        with redis_server.client() as plain:
            plain.hset(f"{namespace}:big", mapping={"value": b"x" * 5000})
            plain.set(f"{namespace}:string", b"a plain string")
        with pytest.raises(OriginError, match="exceeds 1024 bytes"):
            await origin.get("big")
        with pytest.raises(OriginError, match="not a hash"):
            await origin.get("string")
    finally:
        await origin.close()


async def test_connections_stay_within_origin_connections(redis_server: LocalRedis, redis_url: str) -> None:
    origin = await open_origin(redis_url, 5.0, 1024, max_connections=3)
    try:
        await asyncio.gather(*(origin.put(f"k{i}", OriginValue(b"v")) for i in range(200)))
        with redis_server.client() as plain:
            ours = [c for c in plain.client_list() if c.get("name") == "zkcache-sidecar"]
        assert 1 <= len(ours) <= 3, f"{len(ours)} connections with origin_connections=3"
    finally:
        await origin.close()


async def test_a_hung_redis_times_out_and_a_dead_one_is_unavailable(redis_private: LocalRedis) -> None:
    origin = await open_origin(redis_private.url, 0.5, 1024)
    try:
        redis_private.pause()
        began = time.monotonic()
        with pytest.raises(OriginTimeout):
            await origin.get("k")
        assert time.monotonic() - began < 1.5, "the origin timeout did not bound the call"
        redis_private.resume()
        redis_private.kill()
        with pytest.raises(OriginUnavailable):
            await origin.put("k", OriginValue(b"v"))
        assert any("Error 111 connecting" in p for p in await origin.health())  # ECONNREFUSED
    finally:
        redis_private.resume()
        await origin.close()


async def test_a_write_without_the_replicas_it_needs_is_not_acknowledged(redis_server: LocalRedis) -> None:
    # A standalone server has no replica: WAIT confirms 0 of 1.
    # A timeout with room for WAIT's answer on a loaded machine (0.5 s was not, once, in CI).
    origin = await open_origin(f"{redis_server.url}?replicas=1&prefix=noreplica:", 2.0, 1024)
    try:
        with pytest.raises(OriginUnavailable, match="0 of the 1 replica"):
            await origin.put("k", OriginValue(b"v"))
        assert "0 replica(s) connected, writes need 1" in " ".join(await origin.health())  # type: ignore[attr-defined]
    finally:
        await origin.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://", "needs a host"),
        ("redis://h:6379/x", "database must be a number"),
        ("redis://h:6379/0/1", "use redis://host:port"),
        ("redis://h:6379/0?replicas=two", "replicas must be a whole number"),
        ("redis+sentinel://", "name the Sentinels"),
        ("redis+sentinel://h:26379", "name the Sentinel service"),
        ("redis+sentinel://h:x/mymaster", "not a port"),
        ("redis+sentinel://h:1,h2/mymaster", "is not host:port"),
    ],
)
def test_a_bad_redis_url_is_one_clear_line(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_origin(url)


def test_redis_urls_that_are_accepted() -> None:
    s = parse_redis_url("redis+sentinel://:pw@a:26379,b:26380/mymaster/2?sentinel_password=sp")
    assert (s.sentinels, s.service, s.db, s.password, s.sentinel_password, s.replicas) == (
        [("a", 26379), ("b", 26380)],
        "mymaster",
        2,
        "pw",
        "sp",
        1,
    )
    assert "pw" not in s.display and "sp" not in s.display
    plain = parse_redis_url("rediss://u:p@h:6380/3?prefix=app:&ssl_ca_certs=/ca.pem")
    assert (plain.db, plain.prefix, plain.replicas, plain.display) == (3, "app:", 0, "rediss://h:6380/3")
    assert plain.client_url is not None and "prefix" not in plain.client_url and "ssl_ca_certs" in plain.client_url


@pytest.mark.slow
async def test_two_sidecars_over_redis_read_through_write_through_and_invalidate(
    sidecars: SidecarFactory, redis_server: LocalRedis, redis_url: str, namespace: str, http: aiohttp.ClientSession
) -> None:
    a = sidecars("a", origin=redis_url)
    b = sidecars("b", origin=redis_url)
    with redis_server.client() as plain:
        plain.hset(f"{namespace}:k", mapping={"value": b"from-redis", "content_type": "text/plain"})
    async with http.get(f"{b.url}/v1/keys/k") as resp:
        assert resp.status == 200 and await resp.read() == b"from-redis"
        assert resp.headers["Content-Type"].startswith("text/plain")
    async with http.get(f"{b.url}/v1/keys/k") as resp:
        assert resp.headers["X-Cache"] == "hit"
    async with http.put(f"{a.url}/v1/keys/k", data=b"new", headers={"Content-Type": "text/x-new"}) as resp:
        assert resp.status in (200, 201, 204), await resp.text()

    async def b_serves_new() -> bool:
        async with http.get(f"{b.url}/v1/keys/k") as resp:
            return await resp.read() == b"new"

    await eventually(b_serves_new, what="sidecar b serving the value a wrote through to Redis")
    with redis_server.client() as plain:
        assert plain.hgetall(f"{namespace}:k") == {b"value": b"new", b"content_type": b"text/x-new"}


@pytest.mark.slow
async def test_redis_down_answers_502_or_504_and_readyz_says_why(
    sidecars: SidecarFactory, redis_private: LocalRedis, http: aiohttp.ClientSession
) -> None:
    sc = sidecars("a", origin=redis_private.url, origin_timeout="0.5s")
    redis_private.pause()
    try:
        async with http.get(f"{sc.url}/v1/keys/k") as resp:
            assert resp.status == 504
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["type"].endswith("/origin-timeout")
    finally:
        redis_private.resume()
    redis_private.kill()
    async with http.get(f"{sc.url}/v1/keys/k") as resp:
        assert resp.status == 502
        assert (await resp.json())["type"].endswith("/origin-unavailable")

    async def origin_reasons() -> list[str] | None:
        async with http.get(f"{sc.url}/readyz") as resp:
            body = await resp.json()
        assert resp.status == 200, "an origin outage must not take the pod out of service: hits still serve"
        assert body["origin"]["status"] == "down"
        reasons: list[str] = body["origin"]["reasons"]
        return reasons if any("PING" in reason for reason in reasons) else None

    # The origin's own check runs in the background (/readyz never waits for it).
    await eventually(origin_reasons, what="/readyz quoting the origin's own health check (PING)")
    redis_private.start()

    async def recovered() -> bool:
        async with http.get(f"{sc.url}/readyz") as resp:
            return (await resp.json()).get("origin", {}).get("status") != "down"

    async with http.get(f"{sc.url}/v1/keys/k") as resp:
        assert resp.status == 404
    await eventually(recovered, what="/readyz no longer reporting the origin down")
