"""The pure cache: bounds, TTL, and the fill-ticket invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.cache import ENTRY_OVERHEAD, CoherentCache, Entry, FillTicket


def entry(key: str, size: int = 10, version: int = 1) -> Entry:
    return Entry.make(key, b"x" * size, "text/plain", version)


def fill(cache: CoherentCache, key: str, e: Entry) -> bool:
    ticket = cache.begin_fill(key)
    try:
        return cache.install(ticket, e)
    finally:
        cache.end_fill(ticket)


def test_bounded_by_entry_count_evicts_least_recently_used() -> None:
    cache = CoherentCache(max_entries=3, max_bytes=10**9)
    for k in "abc":
        fill(cache, k, entry(k))
    assert cache.get("a") is not None  # a is now most recently used
    fill(cache, "d", entry("d"))
    assert len(cache) == 3
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.counters.evictions == 1


def test_bounded_by_bytes() -> None:
    per = 100 + 1 + len("text/plain") + ENTRY_OVERHEAD
    cache = CoherentCache(max_entries=1000, max_bytes=per * 5)
    for i in range(10):
        fill(cache, chr(ord("a") + i), entry(chr(ord("a") + i), 100))
    assert len(cache) == 5
    assert cache.bytes == per * 5
    assert cache.counters.evictions == 5


def test_value_larger_than_max_bytes_is_not_cached() -> None:
    cache = CoherentCache(max_entries=10, max_bytes=500)
    assert fill(cache, "big", entry("big", 1000)) is False
    assert len(cache) == 0 and cache.bytes == 0


def test_ttl_expires_entries() -> None:
    now = [0.0]
    cache = CoherentCache(max_entries=10, max_bytes=10**6, ttl=5, timer=lambda: now[0])
    fill(cache, "k", entry("k"))
    now[0] = 4.9
    assert cache.get("k") is not None
    now[0] = 5.1
    assert cache.get("k") is None


def test_invalidation_voids_fill_in_flight() -> None:
    cache = CoherentCache(10, 10**6)
    ticket = cache.begin_fill("k")
    cache.invalidate("k")  # arrives while the origin is being read
    assert cache.install(ticket, entry("k")) is False
    cache.end_fill(ticket)
    assert cache.get("k") is None
    assert cache.counters.refused_fills == 1


def test_invalidation_of_other_key_does_not_void() -> None:
    cache = CoherentCache(10, 10**6)
    ticket = cache.begin_fill("k")
    cache.invalidate("j")
    cache.invalidate_prefixes(["kk"])
    assert cache.install(ticket, entry("k")) is True


def test_prefix_and_all_void_fills_and_drop_entries() -> None:
    cache = CoherentCache(10, 10**6)
    fill(cache, "user/1", entry("user/1"))
    fill(cache, "order/1", entry("order/1"))
    t_user = cache.begin_fill("user/2")
    assert cache.invalidate_prefixes(["user/"]) == 1
    assert cache.install(t_user, entry("user/2")) is False
    assert "order/1" in cache
    t_order = cache.begin_fill("order/2")
    assert cache.invalidate_all() == 1
    assert cache.install(t_order, entry("order/2")) is False
    assert len(cache) == 0


def test_void_fills_keeps_entries() -> None:
    cache = CoherentCache(10, 10**6)
    fill(cache, "a", entry("a"))
    ticket = cache.begin_fill("b")
    cache.void_fills()
    assert cache.install(ticket, entry("b")) is False
    assert "a" in cache


def test_tickets_taken_after_invalidation_are_valid() -> None:
    cache = CoherentCache(10, 10**6)
    cache.invalidate("k")
    assert fill(cache, "k", entry("k", version=2)) is True
    assert cache.fills_in_flight == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["begin", "inv", "install", "all"]), st.sampled_from(["a", "b", "ab"])), max_size=40
    )
)
def test_no_ticket_survives_an_invalidation_of_its_key(ops: list[tuple[str, str]]) -> None:
    """Model check: a ticket begun before any covering invalidation never installs."""
    cache = CoherentCache(100, 10**6)
    open_tickets: list[tuple[object, str, bool]] = []  # (ticket, key, invalidated since begin)
    for op, key in ops:
        if op == "begin":
            open_tickets.append((cache.begin_fill(key), key, False))
        elif op == "inv":
            cache.invalidate_prefixes([key]) if key == "a" else cache.invalidate(key)
            open_tickets = [
                (t, k, dirty or (k.startswith("a") if key == "a" else k == key)) for t, k, dirty in open_tickets
            ]
        elif op == "all":
            cache.invalidate_all()
            open_tickets = [(t, k, True) for t, k, _ in open_tickets]
        elif open_tickets:
            t, k, dirty = open_tickets.pop(0)
            installed = cache.install(t, entry(k))  # type: ignore[arg-type]
            cache.end_fill(t)  # type: ignore[arg-type]
            assert installed == (not dirty)


def test_many_prefixes_in_one_pass() -> None:
    cache = CoherentCache(100, 10**6)
    for k in ("a/1", "b/1", "c/1", "d/1"):
        fill(cache, k, entry(k))
    ticket = cache.begin_fill("c/2")
    assert cache.invalidate_prefixes(["a/", "c/", "zz"]) == 2
    assert cache.install(ticket, entry("c/2")) is False
    assert {k for k in ("a/1", "b/1", "c/1", "d/1") if k in cache} == {"b/1", "d/1"}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["begin", "install", "end", "inv", "prefix", "all", "tick", "get"]),
            st.sampled_from(["a1", "a2", "b1", "b2", "c1"]),
        ),
        max_size=60,
    ),
    st.booleans(),
)
def test_on_vacated_reports_exactly_the_keys_left_with_no_entry_and_no_fill(
    ops: list[tuple[str, str]], ttl: bool
) -> None:
    """A ledger fed by ``begin_fill`` and ``on_vacated`` equals the keys with an entry or a fill, always.

    Never reported while an entry or a fill still needs the key's watch;
    always reported once neither is left (evictions with three entries at
    most, TTL expiry, every kind of invalidation, fills ending either way).
    """
    now = [0.0]
    watched: set[str] = set()
    cache = CoherentCache(max_entries=3, max_bytes=10**6, ttl=5 if ttl else 0, timer=lambda: now[0])
    tickets: list[FillTicket] = []

    def vacated(key: str) -> None:
        assert key not in cache and not any(t.key == key for t in tickets), f"{key} reported while still needed"
        watched.discard(key)

    cache.on_vacated = vacated
    for op, key in ops:
        if op == "begin":
            watched.add(key)  # a fill arms the key's watch
            tickets.append(cache.begin_fill(key))
        elif op in ("install", "end") and tickets:
            ticket = tickets.pop(0)
            if op == "install":
                cache.install(ticket, entry(ticket.key))
            cache.end_fill(ticket)
        elif op == "inv":
            cache.invalidate(key)
        elif op == "prefix":
            cache.invalidate_prefixes([key[0]])
        elif op == "all":
            cache.invalidate_all()
        elif op == "tick":
            now[0] += 3
        elif op == "get":
            cache.get(key)
        needed = {k for k in ("a1", "a2", "b1", "b2", "c1") if cache.peek(k) is not None} | {t.key for t in tickets}
        assert needed <= watched, f"watch released while needed: {needed - watched}"
        # (An expired entry stays in cachetools, and needed, until it is expired for real: then reported.)
        assert watched == needed, f"never reported as vacated: {watched - needed}"


def test_reconfigure_keeps_what_fits_evicting_the_least_recently_used_and_reports_each() -> None:
    vacated: list[str] = []
    cache = CoherentCache(max_entries=10, max_bytes=10**9, on_vacated=vacated.append)
    for k in "abcdef":
        fill(cache, k, entry(k))
    cache.get("a")  # a: most recently used now
    cache.reconfigure(max_entries=3, max_bytes=10**9, ttl=0.0)
    assert sorted(cache.keys()) == ["a", "e", "f"]
    assert sorted(vacated) == ["b", "c", "d"], "each evicted key gives up its watch"
    assert cache.counters.evictions == 3
    fill(cache, "g", entry("g"))  # the new bound holds for later fills, in LRU order
    assert sorted(cache.keys()) == ["a", "f", "g"]


def test_reconfigure_to_and_from_a_ttl() -> None:
    now = [0.0]
    cache = CoherentCache(max_entries=10, max_bytes=10**9, timer=lambda: now[0])
    fill(cache, "a", entry("a"))
    cache.reconfigure(max_entries=10, max_bytes=10**9, ttl=5.0)
    now[0] = 4.0
    assert cache.get("a") is not None
    now[0] = 5.5
    assert cache.get("a") is None, "the new TTL counts from the change"
    fill(cache, "b", entry("b"))
    cache.reconfigure(max_entries=10, max_bytes=10**9, ttl=0.0)
    now[0] = 1000.0
    assert cache.get("b") is not None


def test_reconfigure_drops_an_entry_larger_than_the_new_byte_bound() -> None:
    cache = CoherentCache(max_entries=10, max_bytes=10**9)
    fill(cache, "big", entry("big", 5000))
    fill(cache, "small", entry("small", 10))
    cache.reconfigure(max_entries=10, max_bytes=1000, ttl=0.0)
    assert list(cache.keys()) == ["small"]


def test_changing_only_the_bounds_keeps_each_entrys_ttl() -> None:
    """Rebuilding the store restarted every TTL: bounds changed every 9 s kept a 10 s entry forever."""
    now = [0.0]
    cache = CoherentCache(max_entries=10, max_bytes=10**9, ttl=10.0, timer=lambda: now[0])
    fill(cache, "a", entry("a"))
    now[0] = 9.0
    cache.reconfigure(max_entries=9, max_bytes=10**9, ttl=10.0)
    now[0] = 10.5
    assert cache.get("a") is None, "the bounds change gave the entry a new TTL"


def test_shrinking_in_place_evicts_by_bytes_too() -> None:
    vacated: list[str] = []
    per = 100 + 1 + len("text/plain") + ENTRY_OVERHEAD
    cache = CoherentCache(max_entries=100, max_bytes=per * 10, on_vacated=vacated.append)
    for k in "abcdefgh":
        fill(cache, k, entry(k, 100))
    cache.get("a")
    cache.reconfigure(max_entries=100, max_bytes=per * 3, ttl=0.0)
    assert sorted(cache.keys()) == ["a", "g", "h"] and cache.bytes == per * 3
    assert sorted(vacated) == ["b", "c", "d", "e", "f"]
    fill(cache, "i", entry("i", 100))  # the new byte bound holds for later fills
    assert len(cache) == 3 and "i" in cache


def test_the_content_type_is_charged_to_its_entry() -> None:
    # Issue 14: values with an 8 KB Content-Type grew a sidecar with max_bytes
    # 8 MiB from 45 to 147 MiB; the content type was not charged.
    ctype = "text/plain; x=" + "a" * 8000
    cache = CoherentCache(max_entries=10_000, max_bytes=200_000)
    for i in range(100):
        fill(cache, f"k{i}", Entry.make(f"k{i}", b"v", ctype, 1))
    assert cache.bytes <= 200_000
    assert len(cache) <= 200_000 // len(ctype)
