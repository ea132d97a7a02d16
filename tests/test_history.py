"""The checker must catch each kind of violation, and accept legal concurrency."""

from __future__ import annotations

from harness.history import Op, check


def put(value: bytes, start: float, end: float, version: int, outcome: str = "ok") -> Op:
    return Op("put", "k", start, end, outcome, value=value, version=version if outcome == "ok" else None)


def read(value: bytes | None, start: float, end: float, strong: bool = False) -> Op:
    return Op("strong_read" if strong else "read", "k", start, end, "ok", value=value)


def test_a_clean_history_passes() -> None:
    ops = [put(b"a", 0, 1, 10), read(b"a", 2, 3, strong=True), put(b"b", 4, 5, 20), read(b"b", 6, 7)]
    report = check(ops, {"k": b"b"}, window=0.5)
    assert report.ok and report.reads == 2 and report.writes_acknowledged == 2


def test_strong_read_of_a_superseded_value_is_a_violation() -> None:
    ops = [put(b"a", 0, 1, 10), put(b"b", 2, 3, 20), read(b"a", 4, 5, strong=True)]
    report = check(ops, {"k": b"b"}, window=10)
    assert len(report.strong_stale) == 1 and not report.ok


def test_concurrent_write_values_are_allowed() -> None:
    ops = [put(b"a", 0, 1, 10), put(b"b", 2, 6, 20), read(b"b", 3, 4, strong=True), read(b"a", 3, 4, strong=True)]
    assert check(ops, {"k": b"b"}, window=0).ok


def test_eventual_staleness_is_measured_against_the_window() -> None:
    ops = [put(b"a", 0, 1, 10), put(b"b", 2, 3, 20), read(b"a", 3.2, 3.3)]
    within = check(ops, {"k": b"b"}, window=0.5)
    assert within.ok and abs(within.max_eventual_staleness - 0.2) < 1e-9
    beyond = check(ops, {"k": b"b"}, window=0.1)
    assert len(beyond.eventual_too_stale) == 1


def test_phantom_read() -> None:
    report = check([put(b"a", 0, 1, 10), read(b"zzz", 2, 3)], {"k": b"a"}, window=1)
    assert len(report.phantom_reads) == 1


def test_lost_acknowledged_write() -> None:
    ops = [put(b"a", 0, 1, 10), put(b"b", 2, 3, 20)]
    assert len(check(ops, {"k": b"a"}, window=1).lost_writes) == 1
    assert check(ops, {"k": b"b"}, window=1).ok


def test_unknown_outcome_writes_may_be_the_final_value() -> None:
    ops = [put(b"a", 0, 1, 10), put(b"x", 2, 9, 0, outcome="unknown")]
    assert check(ops, {"k": b"x"}, window=1).ok
    assert check(ops, {"k": b"a"}, window=1).ok


def test_double_cas() -> None:
    ops = [
        Op("cas", "k", 0, 1, "ok", value=b"a", version=10, expect=5),
        Op("cas", "k", 2, 3, "ok", value=b"b", version=20, expect=5),
    ]
    assert len(check(ops, {"k": b"b"}, window=1).double_cas) == 1


def test_deletes_read_as_none() -> None:
    ops = [put(b"a", 0, 1, 10), Op("delete", "k", 2, 3, "ok", version=20), read(None, 4, 5, strong=True)]
    assert check(ops, {"k": None}, window=0).ok
    stale = [put(b"a", 0, 1, 10), Op("delete", "k", 2, 3, "ok", version=20), read(b"a", 4, 5, strong=True)]
    assert len(check(stale, {"k": None}, window=0).strong_stale) == 1
