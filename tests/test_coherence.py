"""Coherence across real sidecar processes sharing one ZooKeeper and one origin."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from harness import TcpProxy
from sidecar.origins.sqlite import sqlite_path
from tests.conftest import SidecarFactory, cachectl, cachectl_bytes, eventually, held_origin_put, member_ids

pytestmark = pytest.mark.slow


async def get(http: aiohttp.ClientSession, base: str, key: str, **kw: Any) -> tuple[int, str, bytes, dict[str, str]]:
    async with http.get(URL(f"{base}/v1/keys/{key}", encoded=True), **kw) as resp:
        return resp.status, resp.headers.get("X-Cache", ""), await resp.read(), resp.headers.copy()


async def get_hit(http: aiohttp.ClientSession, base: str, key: str) -> tuple[int, str, bytes, Any]:
    """GET until it is served from the cache (after a write the writer refills in the background)."""

    async def attempt() -> tuple[int, str, bytes, Any] | None:
        got = await get(http, base, key)
        return got if got[1] == "hit" else None

    result: tuple[int, str, bytes, Any] = await eventually(attempt, what=f"a cache hit on {key}")
    return result


async def put(
    http: aiohttp.ClientSession, base: str, key: str, body: bytes, **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.put(URL(f"{base}/v1/keys/{key}", encoded=True), data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.copy()


async def test_write_on_a_is_seen_by_b(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a, b = sidecars("a"), sidecars("b")
    status, body, headers = await put(http, a.url, "user/42", b'{"name":"ada"}', **{"Content-Type": "application/json"})
    assert status == 200 and headers["ETag"] == f'"{body["version"]}"'
    status, source, value, _ = await get(http, b.url, "user/42")
    assert (status, source, value) == (200, "miss", b'{"name":"ada"}')
    status, source, value, h = await get(http, b.url, "user/42")
    assert (status, source, value) == (200, "hit", b'{"name":"ada"}')
    assert h["Content-Type"] == "application/json" and h["ETag"] == headers["ETag"]

    before = b.stats()["invalidations_received"]
    status, body2, headers2 = await put(
        http, a.url, "user/42", b'{"name":"grace"}', **{"Content-Type": "application/json"}
    )
    assert body2["version"] > body["version"]
    # B's entry is dropped by its watch: wait for that event, not for time.
    await eventually(lambda: b.stats()["invalidations_received"] > before, what="B's watch event")
    status, source, value, h = await get(http, b.url, "user/42")
    assert (status, source, value) == (200, "miss", b'{"name":"grace"}')
    assert h["ETag"] == headers2["ETag"]


async def test_delete_is_a_tombstone_seen_by_every_sidecar(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a, b = sidecars("a"), sidecars("b")
    await put(http, a.url, "k", b"v1")
    assert (await get(http, b.url, "k"))[:3] == (200, "miss", b"v1")
    async with http.delete(f"{a.url}/v1/keys/k") as resp:
        assert resp.status == 204 and resp.headers["ETag"]
    await eventually(lambda: b.stats()["entries"] == 0, what="B dropping the deleted key")
    status, _, body, headers = await get(http, b.url, "k")
    assert status == 404 and headers["Content-Type"] == "application/problem+json"
    assert json.loads(body)["status"] == 404


async def test_cachectl_invalidates_key_prefix_and_all(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, zk_server: Any, namespace: str, sqlite_url: str
) -> None:
    a, b = sidecars("a"), sidecars("b")
    for key in ("user/1", "user/2", "order/1"):
        await put(http, a.url, key, b"old")
        await get(http, b.url, key)
    assert b.stats()["entries"] == 3

    # Change the origin behind the sidecars' back, as an operator would,
    # then tell the fleet.
    db = sqlite3.connect(sqlite_path(sqlite_url))
    db.execute("UPDATE kv SET value = ?", (b"new",))
    db.commit()
    db.close()
    assert (await get(http, b.url, "user/1"))[1:3] == ("hit", b"old")

    run = cachectl(zk_server.hosts, namespace, "invalidate", "order/1")
    assert run.returncode == 0, run.stderr
    assert "order/1" in json.loads(run.stdout)["keys"]
    await eventually(lambda: "order/1" not in str(b.stats()) and b.stats()["entries"] == 2, what="key invalidation")
    assert (await get(http, b.url, "order/1"))[1:3] == ("miss", b"new")

    run = cachectl(zk_server.hosts, namespace, "invalidate", "--prefix", "user/")
    assert run.returncode == 0, run.stderr
    await eventually(lambda: b.stats()["entries"] == 1, what="prefix invalidation")
    assert (await get(http, b.url, "user/2"))[1:3] == ("miss", b"new")
    assert (await get(http, b.url, "order/1"))[1] == "hit"  # not covered by the prefix

    run = cachectl(zk_server.hosts, namespace, "invalidate", "--all")
    assert run.returncode == 0, run.stderr
    await eventually(lambda: a.stats()["entries"] == 0 and b.stats()["entries"] == 0, what="invalidate --all")

    assert member_ids(zk_server.hosts, namespace) == {"a", "b"}
    run = cachectl(zk_server.hosts, namespace, "members")
    assert run.returncode == 0 and run.stdout.startswith("MEMBER"), run.stdout


async def test_http_invalidate_endpoint(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a, b = sidecars("a"), sidecars("b")
    await put(http, a.url, "p/1", b"x")
    await get(http, b.url, "p/1")
    async with http.post(f"{a.url}/v1/invalidate", json={"prefixes": ["p/"]}) as resp:
        assert resp.status == 202
        assert "p/" in (await resp.json())["prefixes"]
    await eventually(lambda: b.stats()["entries"] == 0, what="prefix invalidation via HTTP")


async def test_conditional_writes(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a, b = sidecars("a"), sidecars("b")
    status, _, h1 = await put(http, a.url, "cas", b"1", **{"If-None-Match": "*"})
    assert status == 200
    status, _, _ = await put(http, b.url, "cas", b"again", **{"If-None-Match": "*"})
    assert status == 412
    status, _, h2 = await put(http, b.url, "cas", b"2", **{"If-Match": h1["ETag"]})
    assert status == 200
    async with http.put(f"{a.url}/v1/keys/cas", data=b"3", headers={"If-Match": h1["ETag"]}) as resp:
        assert resp.status == 412
        problem = await resp.json(content_type="application/problem+json")
        assert problem["current_version"] == int(h2["ETag"].strip('"'))
        assert resp.headers["ETag"] == h2["ETag"]
    assert (await get(http, a.url, "cas"))[2] == b"2"  # the refused write left no trace
    async with http.get(f"{a.url}/v1/keys/cas", headers={"If-None-Match": h2["ETag"]}) as resp:
        assert resp.status == 304
    async with http.get(f"{b.url}/v1/keys/never", headers={"Cache-Control": "only-if-cached"}) as resp:
        assert resp.status == 504 and (await resp.json(content_type=None))["type"].endswith("not-cached")


async def test_bad_requests_are_problems_and_change_nothing(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    a = sidecars("a", max_value_bytes="1KiB")
    await put(http, a.url, "k", b"ok")
    cases = [
        ("PUT", "/v1/keys/k", b"x" * 2048, {}, 413),
        ("PUT", "/v1/keys/" + "x" * 1025, b"v", {}, 400),
        ("GET", "/v1/keys/%FF", None, {}, 400),
        ("PUT", "/v1/keys/k", b"v", {"If-Match": "nonsense"}, 400),
        ("POST", "/v1/invalidate", b"[1]", {}, 400),
        ("POST", "/v1/invalidate", b"{}", {}, 400),
        ("POST", "/v1/invalidate", b'{"keys": [1]}', {}, 400),
        ("GET", "/v1/nothing-here", None, {}, 404),
        ("PATCH", "/v1/keys/k", b"", {}, 405),
        ("DELETE", "/v1/stats", None, {}, 405),
    ]
    for method, path, body, headers, expected in cases:
        async with http.request(method, a.url + path, data=body, headers=headers) as resp:
            assert resp.status == expected, (method, path, await resp.text())
            assert resp.headers["Content-Type"] == "application/problem+json", (method, path)
            problem = await resp.json(content_type=None)
            assert problem["status"] == expected and problem["title"] and problem["detail"]
    assert (await get(http, a.url, "k"))[2] == b"ok"
    assert a.stats()["writes"] == 1


async def test_keys_with_slashes_dots_and_unicode(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    a, b = sidecars("a"), sidecars("b")
    for key, path in [
        ("a/b/c", "a/b/c"),
        ("a/b/c", "a%2Fb%2Fc"),
        ("..", "%2E%2E"),
        ("ключ ☃", "%D0%BA%D0%BB%D1%8E%D1%87%20%E2%98%83"),
    ]:
        assert (await put(http, a.url, path, key.encode()))[0] == 200, path
        status, _, value, _ = await get(http, b.url, path)
        assert (status, value) == (200, key.encode()), path


async def test_fill_that_began_before_a_write_is_never_installed(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession
) -> None:
    """The watch is armed before the origin read, and an invalidation voids the fill.

    B misses on k and its origin read is held open (having read v1).  A writes
    v2.  Only after B has *received* the invalidation is B's read released: B
    must answer v1 to that concurrent request but must not cache it; the next
    read on B returns v2.
    """
    origin = upstream + "/kv"
    a, b = sidecars("a", origin=origin), sidecars("b", origin=origin)
    await put(http, a.url, "race", b"v1")
    await get_hit(http, a.url, "race")  # A's post-write refill is done: only B will read below
    async with http.post(f"{upstream}/_control/hold/race"):
        pass
    reader = asyncio.create_task(get(http, b.url, "race"))

    async def held() -> bool:
        async with http.get(f"{upstream}/_control/held/race") as resp:
            return (await resp.json())["held"] == 1

    await eventually(held, what="B's origin read being held")
    before = b.stats()["invalidations_received"]
    write = asyncio.create_task(put(http, a.url, "race", b"v2"))
    await eventually(lambda: b.stats()["invalidations_received"] > before, what="B receiving the invalidation")
    async with http.post(f"{upstream}/_control/release/race"):
        pass
    assert (await write)[0] == 200
    status, source, value, _ = await reader
    assert (status, source, value) == (200, "miss", b"v1")  # concurrent with the write: allowed
    assert b.stats()["refused_fills"] >= 1
    status, source, value, _ = await get(http, b.url, "race")
    assert (source, value) == ("miss", b"v2"), "a fill that raced a write was installed"


async def test_concurrent_writers_and_readers_converge_on_the_last_acknowledged_write(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str
) -> None:
    """Many writers through both sidecars on a few keys, readers on both.

    Afterwards both sidecars serve exactly what the origin holds, and the
    origin holds the write with the highest acknowledged version of each key.
    """
    a, b = sidecars("a"), sidecars("b")
    keys = ["hot/0", "hot/1", "hot/2"]
    acked: dict[str, list[tuple[int, bytes]]] = {k: [] for k in keys}
    deadline = time.monotonic() + 60
    rng = random.Random(7)

    async def writer(n: int) -> None:
        for i in range(15):  # bounded in count...
            if time.monotonic() > deadline:  # ...and in time
                return
            key, node = rng.choice(keys), rng.choice((a, b))
            value = f"w{n}-{i}".encode()
            status, body, _ = await put(http, node.url, key, value)
            assert status == 200, body
            acked[key].append((body["version"], value))

    async def reader() -> None:
        for _ in range(60):
            if time.monotonic() > deadline:
                return
            status, _, _, _ = await get(http, rng.choice((a, b)).url, rng.choice(keys))
            assert status in (200, 404)

    await asyncio.gather(*(writer(n) for n in range(8)), *(reader() for _ in range(4)))

    db = sqlite3.connect(sqlite_path(sqlite_url))
    stored = dict(db.execute("SELECT key, value FROM kv").fetchall())
    db.close()
    for key in keys:
        assert acked[key], f"no write landed on {key}"
        versions = [v for v, _ in acked[key]]
        assert len(set(versions)) == len(versions), "two acknowledged writes share a version"
        last = max(acked[key])[1]
        assert stored[key] == last, f"origin lost the last acknowledged write of {key}"

        async def both_serve_origin(key: str = key) -> bool:
            got = [await get(http, n.url, key) for n in (a, b)]
            return all(g[2] == stored[key] for g in got)

        # The propagation window: a watch event per sidecar, milliseconds.
        await eventually(both_serve_origin, timeout=3.0, what=f"both sidecars serving origin's {key}")
        for node in (a, b):  # and it stays so: served from cache, still right
            status, source, value, _ = await get(http, node.url, key)
            assert (status, value) == (200, stored[key]) and source == "hit"


def test_cachectl_get_and_put_through_a_sidecar(sidecars: SidecarFactory, tmp_path: Path) -> None:
    a, b = sidecars("a"), sidecars("b")
    value = tmp_path / "v.json"
    value.write_bytes(b'{"x": 1}')
    put_run = cachectl_bytes(
        "--sidecar", a.url, "put", "cfg/x", "--file", str(value), "--content-type", "application/json"
    )
    assert put_run.returncode == 0, put_run.stderr
    version = json.loads(put_run.stdout)["version"]
    get_run = cachectl_bytes("--sidecar", b.url, "get", "cfg/x", "--etag")
    assert get_run.returncode == 0 and get_run.stdout == b'{"x": 1}'
    assert f'ETag: "{version}"'.encode() in get_run.stderr
    stale = cachectl_bytes("--sidecar", a.url, "put", "cfg/x", "--file", str(value), "--if-match", "1")
    assert stale.returncode == 1 and b"412" in stale.stderr and stale.stderr.count(b"\n") == 1


async def test_unix_socket_listener(sidecars: SidecarFactory, tmp_path: Path) -> None:
    sock = tmp_path / "zkcache.sock"
    sidecars("u", wait_ready=False, listen=f"unix:{sock}")

    async def ready() -> bool:
        if not sock.exists():
            return False
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as unix:
            async with unix.get("http://sidecar/readyz") as resp:
                return resp.status == 200

    await eventually(ready, timeout=20, what="the sidecar answering on its Unix socket")
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as unix:
        async with unix.put("http://sidecar/v1/keys/k", data=b"v") as resp:
            assert resp.status == 200
        async with unix.get("http://sidecar/v1/keys/k") as resp:
            assert (await resp.read(), resp.headers["X-Cache"]) in ((b"v", "hit"), (b"v", "miss"))


async def test_writer_does_not_cache_its_value_over_a_later_outside_write(
    sidecars: SidecarFactory, upstream: str, http: aiohttp.ClientSession, zk_server: Any, namespace: str
) -> None:
    """Between A's origin write and A's version bump, an outside writer writes the
    origin and invalidates the key. A's bump is then the newest version, yet A's
    value is not the origin's: A must end up serving the origin's value."""
    origin = upstream + "/kv"
    a = sidecars("a", origin=origin)
    async with held_origin_put(http, upstream, "ow") as until_held:
        write = asyncio.create_task(put(http, a.url, "ow", b"from-A"))
        await until_held()
        async with http.put(f"{origin}/ow", data=b"from-outside") as resp:
            assert resp.status == 204
        run = await asyncio.to_thread(cachectl, zk_server.hosts, namespace, "invalidate", "ow")
        assert run.returncode == 0, run.stderr
    assert (await write)[0] == 200
    _, _, value, _ = await get_hit(http, a.url, "ow")
    assert value == b"from-outside", "the writer cached its own value over a later origin write"


async def test_cache_aside_fill_under_a_stale_lease_is_refused(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The stale-set race: reader A misses and reads the old row; writer B updates
    the row and invalidates; A's late fill of the old row must be refused."""
    a, b = sidecars("a", origin="none"), sidecars("b", origin="none")
    async with http.get(f"{a.url}/v1/keys/row/1") as resp:  # A misses: a lease
        assert resp.status == 404
        lease = resp.headers["ETag"]
        assert (await resp.json(content_type=None))["lease"] == int(lease.strip('"'))
    old_row = b"balance=100"  # A reads its database...
    async with http.post(f"{b.url}/v1/invalidate", json={"keys": ["row/1"]}) as resp:
        assert resp.status == 202  # ...B updated the row, then invalidated
    async with http.put(f"{a.url}/v1/keys/row/1?fill=true", data=old_row, headers={"If-Match": lease}) as resp:
        assert resp.status == 412, "a fill under a stale lease was installed"
        current = resp.headers["ETag"]
        assert current != lease
    assert a.stats()["entries"] == 0

    # The retry: a fresh lease, a fresh read, an accepted fill.
    async with http.get(f"{a.url}/v1/keys/row/1") as resp:
        assert resp.status == 404 and resp.headers["ETag"] == current
    async with http.put(f"{a.url}/v1/keys/row/1?fill=true", data=b"balance=50", headers={"If-Match": current}) as resp:
        assert resp.status == 200 and (await resp.json())["filled"] is True
    assert (await get(http, a.url, "row/1"))[1:3] == ("hit", b"balance=50")

    # The fill is local: B still misses, and is told by the fleet when the row changes.
    assert (await get(http, b.url, "row/1"))[0] == 404
    async with http.post(f"{b.url}/v1/invalidate", json={"keys": ["row/1"]}) as resp:
        assert resp.status == 202
    await eventually(lambda: a.stats()["entries"] == 0, what="A dropping its filled entry")

    async with http.put(f"{a.url}/v1/keys/row/1?fill=true", data=b"x") as resp:
        assert resp.status == 428
    async with http.put(f"{a.url}/v1/keys/row/1", data=b"x") as resp:
        assert resp.status == 400 and "PUT ?fill=true" in (await resp.json(content_type=None))["detail"]


async def test_fill_mode_on_an_origin_backed_sidecar(sidecars: SidecarFactory, http: aiohttp.ClientSession) -> None:
    """Hole 12: over a read-through origin, fills are off unless allowed, and
    strong reads never serve a filled value (the origin is the truth)."""
    plain = sidecars("plain")
    async with http.get(f"{plain.url}/v1/keys/other?fill=true") as resp:
        assert resp.status == 403 and (await resp.json(content_type=None))["type"].endswith("fills-not-allowed")
    async with http.put(f"{plain.url}/v1/keys/other?fill=true", data=b"app", headers={"If-Match": '"0"'}) as resp:
        assert resp.status == 403
    assert plain.stats()["entries"] == 0

    a = sidecars("a", fills="allow")
    await put(http, a.url, "f", b"in-origin")
    a_entries = a.stats()["entries"]
    async with http.get(f"{a.url}/v1/keys/other?fill=true") as resp:
        assert resp.status == 404
        lease = resp.headers["ETag"]
    async with http.put(f"{a.url}/v1/keys/other?fill=true", data=b"app", headers={"If-Match": lease}) as resp:
        assert resp.status == 200
    assert (await get(http, a.url, "other"))[1:3] == ("hit", b"app")
    assert a.stats()["entries"] >= a_entries + 1
    status, source, _, _ = await get(http, a.url, "other?consistency=strong")
    assert (status, source) == (404, ""), "a strong read served bytes the origin never had"


async def test_leases_are_refused_after_prefix_and_invalidate_all(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Hole 1: a lease taken before an acknowledged prefix or invalidate-all
    must not fill, though neither touches the key's own version znode."""
    a, b = sidecars("a", origin="none"), sidecars("b", origin="none")
    for body in ({"prefixes": ["user/"]}, {"all": True}):
        async with http.get(f"{a.url}/v1/keys/user/1") as resp:
            assert resp.status == 404
            lease = resp.headers["ETag"]
        async with http.post(f"{b.url}/v1/invalidate?wait=true", json=body) as resp:
            assert resp.status == 200, await resp.text()
        async with http.put(f"{a.url}/v1/keys/user/1?fill=true", data=b"old-row", headers={"If-Match": lease}) as resp:
            assert resp.status == 412, f"a lease older than {body} filled"
            fresh = resp.headers["ETag"]
        assert a.stats()["entries"] == 0
        async with http.get(f"{a.url}/v1/keys/user/1") as resp:  # a new lease works
            assert resp.status == 404 and resp.headers["ETag"] == fresh
        async with http.put(f"{a.url}/v1/keys/user/1?fill=true", data=b"row", headers={"If-Match": fresh}) as resp:
            assert resp.status == 200
        async with http.post(f"{b.url}/v1/invalidate?wait=true", json={"keys": ["user/1"]}) as resp:
            assert resp.status == 200
    # A prefix that does not cover the key leaves its lease valid.
    async with http.get(f"{a.url}/v1/keys/user/1") as resp:
        lease = resp.headers["ETag"]
    async with http.post(f"{b.url}/v1/invalidate?wait=true", json={"prefixes": ["order/"]}) as resp:
        assert resp.status == 200
    async with http.put(f"{a.url}/v1/keys/user/1?fill=true", data=b"row", headers={"If-Match": lease}) as resp:
        assert resp.status == 200


async def test_a_lease_from_before_a_restart_is_refused_after_a_prefix_invalidation(
    sidecars: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Review finding: a new session takes the prefix log as its baseline
    without applying it, so a lease handed out by the sidecar's previous life
    survived a prefix invalidation published in between."""
    a, b = sidecars("a", origin="none"), sidecars("b", origin="none")
    async with http.get(f"{a.url}/v1/keys/user/9") as resp:
        lease = resp.headers["ETag"]
    a.stop()
    async with http.post(f"{b.url}/v1/invalidate?wait=true", json={"prefixes": ["user/"]}) as resp:
        assert resp.status == 200
    a.start()
    async with http.put(f"{a.url}/v1/keys/user/9?fill=true", data=b"old-row", headers={"If-Match": lease}) as resp:
        assert resp.status == 412, "a lease older than a prefix invalidation filled after a restart"


async def test_strong_reads_see_prefix_and_invalidate_all_at_once(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, sqlite_url: str, zk_server: Any
) -> None:
    """Hole 2: after a prefix or invalidate-all was accepted (202, no wait)
    through A, a strong read on B never returns the value from before it.

    B's link to ZooKeeper is slow (a proxy adds 0.3 s per packet), so B's
    notification reaches it, but applying a prefix entry takes one more round
    trip (reading the log): a strong read that only compares the key's
    version would answer in between with the old value.
    """
    with TcpProxy(zk_server.host, zk_server.port) as proxy:
        a, b = sidecars("a"), sidecars("b", zk=proxy.address, zk_session_timeout="8s")
        for round_, body in enumerate(({"prefixes": ["s/"]}, {"all": True}) * 2):
            await put(http, a.url, "s/1", b"old")
            await get_hit(http, b.url, "s/1")
            new = f"new-{round_}".encode()
            db = sqlite3.connect(sqlite_path(sqlite_url))
            db.execute("UPDATE kv SET value = ? WHERE key = ?", (new, "s/1"))
            db.commit()
            db.close()
            proxy.delay(0.3)
            async with http.post(f"{a.url}/v1/invalidate", json=body) as resp:
                assert resp.status == 202
            status, source, value, _ = await get(http, b.url, "s/1?consistency=strong")
            proxy.delay(0)
            assert (status, value) == (200, new), f"strong read after {body} returned {value!r} ({source})"


async def test_invalidate_wait_returns_when_every_sidecar_applied_it(
    sidecars: SidecarFactory, http: aiohttp.ClientSession, zk_server: Any, namespace: str
) -> None:
    a, b, c = sidecars("a"), sidecars("b"), sidecars("c")
    await put(http, a.url, "w/1", b"v")
    await get(http, b.url, "w/1")
    await get(http, c.url, "w/1")
    assert b.stats()["entries"] == 1 and c.stats()["entries"] == 1

    async with http.post(f"{a.url}/v1/invalidate?wait=true&timeout=10", json={"keys": ["w/1"]}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert sorted(body["acknowledged_by"]) == ["a", "b", "c"] and body["not_confirmed"] == []
    # The point of --wait: no eventually here. Confirmed means applied.
    assert b.stats()["entries"] == 0 and c.stats()["entries"] == 0

    await get(http, b.url, "w/1")
    run = await asyncio.to_thread(cachectl, zk_server.hosts, namespace, "invalidate", "--prefix", "w/", "--wait")
    assert run.returncode == 0, run.stderr
    assert b.stats()["entries"] == 0

    c.pause()  # alive in ZooKeeper's eyes for its session timeout, but not answering
    try:
        async with http.post(f"{a.url}/v1/invalidate?wait=true&timeout=1", json={"all": True}) as resp:
            assert resp.status == 504
            problem = await resp.json(content_type=None)
        assert problem["not_confirmed"] == ["c"] and sorted(problem["acknowledged_by"]) == ["a", "b"]
        run = await asyncio.to_thread(
            cachectl, zk_server.hosts, namespace, "invalidate", "w/1", "--wait", "--wait-timeout", "1"
        )
        assert run.returncode == 1 and "not confirmed within 1s by: c" in run.stderr, run.stderr
    finally:
        c.resume()
