"""What a hostile review of the Redis origin found, each against real redis-server processes.

Each test failed before its fix (see the commit that added this file).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from harness.redis import LocalRedis, LocalSentinelGroup
from sidecar.coordination.health import check_origin
from sidecar.errors import OriginError, OriginUnavailable
from sidecar.origins import OriginValue, open_origin
from tests.conftest import SidecarFactory, eventually


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung Sentinel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.slow
async def test_a_hung_sentinel_listed_first_does_not_take_the_origin_down(tmp_path: Path, silent_port: int) -> None:
    """Sentinels were asked in turn, each with the whole origin timeout and redis-py's
    default retries: a hung first one used up every call's time."""
    group = LocalSentinelGroup(tmp_path / "redis")
    group.start()
    try:
        url = group.url.replace("redis+sentinel://", f"redis+sentinel://127.0.0.1:{silent_port},")
        origin = await open_origin(url, 2.0, 1024)
        try:
            for i in range(3):
                began = time.monotonic()
                await origin.put(f"k{i}", OriginValue(b"v"))
                assert await origin.get(f"k{i}") == OriginValue(b"v")
                assert time.monotonic() - began < 2.0
        finally:
            await origin.close()
    finally:
        group.stop()


async def test_reads_refuse_a_server_that_is_no_longer_the_primary(redis_private: LocalRedis) -> None:
    """A demoted primary keeps its clients' connections and serves its old data: a fill
    reading it after a write elsewhere would cache the old value under the new version."""
    origin = await open_origin(redis_private.url, 1.0, 1024)
    try:
        await origin.put("k", OriginValue(b"old"))
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]  # nothing listens: the replica keeps its stale data
        with redis_private.client() as plain:
            plain.replicaof("127.0.0.1", port)
        with pytest.raises(OriginUnavailable, match="not the primary"):
            await origin.get("k")
    finally:
        await origin.close()


async def test_writes_waiting_for_replicas_neither_starve_reads_nor_time_out(redis_server: LocalRedis) -> None:
    """Reads and writes shared one budget of connections, and a write held its slot in WAIT."""
    origin = await open_origin(f"{redis_server.url}?replicas=1&prefix=starve:", 1.0, 1024, max_connections=2)
    write_errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            try:
                await origin.put("w", OriginValue(b"v"))
            except OriginError as exc:
                write_errors.append(exc)

    writers = [asyncio.create_task(writer()) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)
        for _ in range(5):
            began = time.monotonic()
            await origin.get("r")  # must not wait behind writes stuck in WAIT
            assert time.monotonic() - began < 0.5, "a read waited behind writes waiting for replicas"
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await origin.close()
    # A write that reached Redis is answered by WAIT ("0 of the 1 replica"), not by our timer;
    # only one that found no free connection in time times out, having sent nothing.
    sent = [e for e in write_errors if "replica" in str(e)]
    assert sent, "no write reached WAIT"
    unexplained = [str(e) for e in write_errors if "replica" not in str(e) and "nothing sent" not in str(e)]
    assert not unexplained, unexplained[:3]


@pytest.mark.parametrize(
    ("content_type", "message"),
    [(b"\xff\xfe", "content type"), (b"text/plain\r\nSet-Cookie: a=b", "content type"), (b"t" * 5000, "content type")],
)
async def test_a_bad_content_type_written_by_another_client_is_an_origin_error(
    redis_server: LocalRedis, redis_url: str, namespace: str, content_type: bytes, message: str
) -> None:
    origin = await open_origin(redis_url, 1.0, 1024)
    try:
        with redis_server.client() as plain:
            plain.hset(f"{namespace}:k", mapping={"value": b"v", "content_type": content_type})
        with pytest.raises(OriginError, match=message):
            await origin.get("k")
    finally:
        await origin.close()


async def test_a_closed_origin_writes_nothing(redis_server: LocalRedis, redis_url: str, namespace: str) -> None:
    origin = await open_origin(redis_url, 1.0, 1024)
    await origin.close()
    with pytest.raises(OriginUnavailable):
        await origin.put("late", OriginValue(b"v"))
    with redis_server.client() as plain:
        assert not plain.exists(f"{namespace}:late"), "a write landed after close()"


@pytest.mark.slow
async def test_a_sidecar_starts_while_redis_is_down_and_serves_once_it_is_up(
    sidecars: SidecarFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = LocalRedis(tmp_path / "late-redis")
    sc = sidecars("a", origin=redis.url, origin_timeout="0.5s")  # waits for /readyz: started without Redis
    try:
        async with http.get(f"{sc.url}/v1/keys/k") as resp:
            assert resp.status == 502
        redis.start()

        async def served() -> bool:
            async with http.get(f"{sc.url}/v1/keys/k") as resp:
                return resp.status == 404

        await eventually(served, what="reads answered once Redis is up")
    finally:
        redis.stop()


@pytest.mark.slow
async def test_readyz_answers_at_once_while_the_origin_hangs(
    sidecars: SidecarFactory, redis_private: LocalRedis, http: aiohttp.ClientSession
) -> None:
    """/readyz awaited the origin's health check inline: with the origin hung, every probe
    took origin_timeout, past the chart's 1 s probe timeout, and every pod went NotReady."""
    sc = sidecars("a", origin=redis_private.url, origin_timeout="3s")
    redis_private.pause()
    try:
        async with http.get(f"{sc.url}/v1/keys/k") as resp:
            assert resp.status == 504
        for _ in range(3):
            await asyncio.sleep(1.1)  # past the health answer's reuse
            began = time.monotonic()
            async with http.get(f"{sc.url}/readyz") as resp:
                body = await resp.json()
            assert time.monotonic() - began < 0.5, "/readyz waited for the hung origin"
            assert resp.status == 200 and body["origin"]["status"] == "down"
    finally:
        redis_private.resume()


async def test_doctor_never_prints_the_origins_password() -> None:
    findings = await check_origin("redis://:hunter2@127.0.0.1:1/0", timeout=0.5)
    assert findings and all("hunter2" not in str(f) for f in findings), [str(f) for f in findings]


async def test_a_refused_write_names_redis_reason_not_the_value_and_counts_as_down(redis_private: LocalRedis) -> None:
    """redis-py's pipeline errors quote the command: the key and the value written ended up in the
    HTTP error and the log. And an out-of-memory Redis refusing writes is down, not a bad key."""
    origin = await open_origin(redis_private.url, 1.0, 1 << 20)
    try:
        with redis_private.client() as plain:
            plain.config_set("maxmemory", 1)
            plain.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(OriginUnavailable) as refused:
            await origin.put("k", OriginValue(b"SECRET-TOKEN 4111111111111111", "text/plain"))
        assert "SECRET" not in refused.value.detail and "4111" not in refused.value.detail, refused.value.detail
        assert "maxmemory" in refused.value.detail
    finally:
        await origin.close()
