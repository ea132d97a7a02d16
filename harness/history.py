"""A history of client operations, and the checker that judges it.

Each key is a register.  Written values are unique (``c<client>-<n>``), so a
read's value names the write it came from.  Versions (ETags, the version
znode's mzxid) order the acknowledged writes of a key.

Rules (README, "Checker"):

* a read never returns a value that was never written;
* a strong read never returns a value older than the newest write
  acknowledged before the read began ("stale");
* an eventual read may be stale, but only for ``window`` seconds after the
  write that superseded its value was acknowledged: the staleness is
  reported, and exceeding the window is a violation;
* no acknowledged write is lost: the origin's final value of a key is the
  acknowledged write with the highest version, unless a write whose outcome is
  unknown (a timeout, a 5xx after the origin may have been written) could have
  come after it;
* a compare-and-set applies at most once per expected version.

Operations whose outcome is unknown are never counted against the system;
their values are allowed wherever they could have landed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Op", "Report", "check"]

READS = ("read", "strong_read")
WRITES = ("put", "cas", "delete")


@dataclass(slots=True)
class Op:
    """One client operation as the client saw it."""

    kind: str  # read | strong_read | put | cas | delete | invalidate | fill
    key: str
    start: float
    end: float
    outcome: str  # ok | fail (certainly not applied) | unknown (may have been applied)
    value: bytes | None = None  # written value; for reads, what was returned (None: 404)
    version: int | None = None  # ETag returned
    expect: int | None = None  # If-Match of a CAS
    client: int = 0


@dataclass(slots=True)
class Report:
    """What the checker found."""

    operations: int = 0
    reads: int = 0
    writes_acknowledged: int = 0
    errors: int = 0
    strong_stale: list[str] = field(default_factory=list)
    eventual_too_stale: list[str] = field(default_factory=list)
    phantom_reads: list[str] = field(default_factory=list)
    lost_writes: list[str] = field(default_factory=list)
    double_cas: list[str] = field(default_factory=list)
    max_eventual_staleness: float = 0.0

    @property
    def violations(self) -> list[str]:
        """Every violation, one line each."""
        return self.strong_stale + self.eventual_too_stale + self.phantom_reads + self.lost_writes + self.double_cas

    @property
    def ok(self) -> bool:
        """True when nothing was violated."""
        return not self.violations


def check(ops: list[Op], final: dict[str, bytes | None], window: float) -> Report:
    """Judge ``ops`` given each key's ``final`` value in the origin."""
    report = Report(operations=len(ops))
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
        report.errors += op.outcome != "ok"
    for key in sorted(set(by_key) | set(final)):
        _check_key(key, by_key.get(key, []), final.get(key), window, report)
    return report


def _check_key(key: str, ops: list[Op], final: bytes | None, window: float, report: Report) -> None:
    writes = [o for o in ops if o.kind in WRITES]
    acked = sorted((o for o in writes if o.outcome == "ok" and o.version is not None), key=lambda o: o.version or 0)
    report.writes_acknowledged += len(acked)
    written = {o.value for o in writes if o.kind != "delete"}
    by_value = {o.value: o for o in acked if o.kind != "delete"}

    for read in (o for o in ops if o.kind in READS and o.outcome == "ok"):
        report.reads += 1
        if read.value is not None and read.value not in written:
            report.phantom_reads.append(f"{key}: read returned {read.value!r}, never written")
            continue
        before = [w for w in acked if w.end < read.start]
        if not before:
            continue
        newest = before[-1]
        if read.value == newest.value and (read.value is not None or newest.kind == "delete"):
            continue
        # Values of writes not acknowledged before the read began (concurrent
        # or of unknown outcome) may legitimately be seen.
        maybe = {w.value for w in writes if w not in before and w.start < read.end and w.outcome != "fail"}
        if read.value in maybe or (read.value is None and any(w.kind == "delete" for w in writes if w not in before)):
            continue
        source = by_value.get(read.value) if read.value is not None else None
        source_version = source.version if source is not None else _newest_delete_version(before)
        superseded = [w.end for w in before if (w.version or 0) > (source_version or 0)]
        staleness = read.start - min(superseded) if superseded else 0.0
        what = f"{key}: {read.kind} at {read.start:.3f} returned {read.value!r}, newest acknowledged {newest.value!r}"
        if read.kind == "strong_read":
            report.strong_stale.append(what)
        else:
            report.max_eventual_staleness = max(report.max_eventual_staleness, staleness)
            if staleness > window:
                report.eventual_too_stale.append(f"{what} ({staleness:.3f}s stale > window {window:g}s)")

    if acked:
        last = acked[-1]
        expected = None if last.kind == "delete" else last.value
        unknown_after = {w.value for w in writes if w.outcome == "unknown" and w.end >= last.start}
        deleted_maybe = any(w.kind == "delete" and w.outcome == "unknown" for w in writes)
        if final != expected and final not in unknown_after and not (final is None and deleted_maybe):
            report.lost_writes.append(f"{key}: origin holds {final!r}, last acknowledged write was {expected!r}")

    applied: dict[int | None, int] = defaultdict(int)
    for cas in (o for o in writes if o.kind == "cas" and o.outcome == "ok"):
        applied[cas.expect] += 1
        if applied[cas.expect] == 2:
            report.double_cas.append(f'{key}: two CAS writes succeeded with If-Match "{cas.expect}"')


def _newest_delete_version(before: list[Op]) -> int:
    deletes = [w.version or 0 for w in before if w.kind == "delete"]
    return max(deletes, default=0)
