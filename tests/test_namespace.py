"""The pure parts of namespace invalidations: the prefix log's accounting and the floor."""

from __future__ import annotations

from sidecar.coordination.namespace import InvalidationFloor, PrefixLog


def entry(prefix: str, seq: int) -> str:
    return f"{prefix}~{seq:010d}"


def test_first_read_is_the_baseline() -> None:
    log = PrefixLog()
    advance = log.advance([entry("a", 0)], cversion=1, pzxid=10)
    assert advance.prefixes == [] and not advance.gap and log.pzxid == 10


def test_new_entries_are_reported_oldest_first() -> None:
    log = PrefixLog()
    log.advance([], cversion=0, pzxid=5)
    advance = log.advance([entry("b", 1), entry("a", 0)], cversion=2, pzxid=7)
    assert advance.prefixes == ["a", "b"] and not advance.gap


def test_trimming_entries_already_seen_is_no_gap() -> None:
    log = PrefixLog()
    log.advance([entry("a", 0), entry("b", 1)], cversion=2, pzxid=7)
    advance = log.advance([entry("b", 1), entry("c", 2)], cversion=4, pzxid=9)
    assert advance.prefixes == ["c"] and not advance.gap


def test_an_entry_created_and_trimmed_unseen_is_a_gap_even_after_an_empty_first_look() -> None:
    # Hole 9: the old check compared sequence numbers and skipped the check
    # when the first look was empty.
    log = PrefixLog()
    log.advance([], cversion=0, pzxid=5)
    advance = log.advance([], cversion=2, pzxid=9)  # created, then deleted
    assert advance.gap
    log = PrefixLog()
    log.advance([entry("a", 0)], cversion=1, pzxid=5)
    advance = log.advance([entry("a", 0), entry("c", 2)], cversion=4, pzxid=9)  # b came and went
    assert advance.gap and advance.prefixes == ["c"]


def test_an_older_read_arriving_late_is_ignored() -> None:
    log = PrefixLog()
    log.advance([], cversion=0, pzxid=5)
    log.advance([entry("a", 0)], cversion=1, pzxid=6)
    assert log.advance([], cversion=0, pzxid=5).stale
    assert log.pzxid == 6


def test_foreign_children_count_but_are_not_prefixes() -> None:
    log = PrefixLog()
    log.advance([], cversion=0, pzxid=5)
    advance = log.advance(["not-ours"], cversion=1, pzxid=6)
    assert advance.prefixes == [] and not advance.gap


def test_floor_covers_keys_by_prefix_and_everything_by_epoch() -> None:
    floor = InvalidationFloor()
    floor.apply_prefixes(["user/"], 10)
    assert floor.floor("user/1") == 10 and floor.floor("order/1") == 0
    floor.apply_epoch(12)
    assert floor.floor("order/1") == 12 and floor.floor("user/1") == 12
    floor.apply_prefixes(["user/"], 15)
    assert floor.floor("user/1") == 15 and floor.floor("order/1") == 12


def test_floor_folds_old_prefixes_into_a_floor_for_every_key() -> None:
    floor = InvalidationFloor(max_prefixes=4)
    for i in range(5):
        floor.apply_prefixes([f"p{i}/"], 100 + i)
    # Never lower than the truth for any key: folded ones now cover all keys.
    assert floor.floor("p0/x") >= 100 and floor.floor("p4/x") == 104
    assert floor.floor("unrelated") >= 101
