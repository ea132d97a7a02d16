"""What the elected housekeeper does to keep a namespace's ZooKeeper state small.

One round, every ``housekeeping_interval`` on the leader only (``election``):

1. **Stamp**: set ``leader``'s data (the last round's report).  Its ``mtime``
   is ZooKeeper's clock now, so ages below never depend on this host's clock.
2. **Scan** every bucket: ``getChildren``, then ``exists`` on each version
   znode, at most ``housekeeping_rate`` requests per second all told, so
   ZooKeeper's latency for the sidecars' own requests stays flat.
3. **Repair** intents whose writer is gone: a version znode in intent (empty
   data) seen by this leader with no lock znode and no kept-intent marker
   for ``lock_timeout`` (its own monotonic clock).  Closed with a ``repair``
   note, so the key is cacheable again without a human.  The transaction
   creates and deletes the key's lock around the set, so it fails if a
   writer holds the lock at that instant.  Intents a live writer kept on
   purpose (the origin write's outcome unknown) carry a marker under
   ``uncertain/`` and are left for the key's next write or invalidation;
   markers of ended intents are swept.
4. **Retire** version znodes not modified for ``version_retention``, bucket
   by bucket as the scan goes: bump ``retired`` before the round's first
   delete (and again for a newer creation than recorded), then delete each,
   conditional on the data version the scan saw, so that a key written
   meanwhile is never touched.
5. **Trim** the prefix log to its newest ``PREFIX_LOG_RETAIN`` entries.

At most one round per interval, also across a reconnect.

Every write is a transaction fenced by ``Election.fence``: a deposed leader's
late request is refused by ZooKeeper, whatever this process believes.

Why ``retired`` keeps ETags monotonic.  A key with no version znode has the
version ``retired`` gives it: 0 while nothing was ever retired in the
namespace, else ``retired``'s mzxid (``absent_version``).  A candidate was
not modified for the retention before the round's stamp, and the bump comes
after the stamp and before the round's first delete; every delete is
conditional on the data version the scan read, so a deleted znode's last
mzxid is below the new absent version, and a re-created one gets a later
zxid still.  Without it a key's versions would go 0, v1..vn, 0: an
``If-Match: "0"``, a lease 0 or a cached absent entry from before the first
write would compare equal again after the deletion.

Its data also carries ``max_czxid``, the newest creation among retired
znodes: a sidecar that restores its watches relative to a zxid below it may
have missed a key created *and* deleted while it was away (an ``exists``
watch restored on a znode that is gone again fires nothing), so it drops its
entries of absent keys (``Coordinator.restore_watches``).  Only znodes older
than ``version_retention`` are deleted, so that happens only to a sidecar
away for longer than that.

What retiring costs: every sidecar holding a retired key drops it (its data
watch fires NodeDeleted) and reads the origin once on its next read, and the
absent version of every never-written key moves, so a client's conditional
GET of one gets a 200 instead of a 304 once per round that retired anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiolimiter import AsyncLimiter
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError, RolledBackError, RuntimeInconsistency

from .. import bridge
from ..errors import CoordinationError
from .election import Election, NotLeader
from .layout import Layout
from .operations import PREFIX_LOG_RETAIN, version_note
from .session import ZkSession, ZnodeStat

__all__ = [
    "Candidate",
    "Housekeeper",
    "HousekeepingSettings",
    "Plan",
    "RoundReport",
    "absent_version",
    "read_retired",
]

log = logging.getLogger(__name__)

# Operations per fenced transaction: one proposal each, and small enough that
# a batch failing on one racing write costs little to send again.
_BATCH = 100
# Fenced transactions of one round in flight at once.
_IN_FLIGHT = 8
# Reads pipelined per round trip of the scan.
_SCAN_BATCH = 1000
# Retirements one round lists at most (about 200 bytes each in memory).
_MAX_CANDIDATES = 200_000


def absent_version(retired: ZnodeStat | None) -> int:
    """The version of every key with no version znode: 0 until the first retirement, then ``retired``'s mzxid."""
    if retired is None or retired.version == 0:
        return 0
    return int(retired.mzxid)


async def read_retired(zk: ZkSession, layout: Layout) -> tuple[int, int]:
    """``(absent version, max_czxid)`` of the namespace, from ``retired``."""
    try:
        data, stat = await zk.get(layout.retired)
    except NoNodeError:
        return 0, 0
    return absent_version(stat), _max_czxid(data)


def _max_czxid(data: bytes) -> int:
    try:
        value = orjson.loads(data).get("max_czxid", 0) if data else 0
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return int(value) if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True)
class HousekeepingSettings:
    """How the housekeeper works (``Config``: version_retention, housekeeping_*)."""

    retention: float  # seconds a version znode may stay unmodified
    lock_timeout: float  # seconds after which a writer's intent without its lock is dead
    interval: float = 60.0  # seconds between rounds
    rate: float = 1000.0  # ZooKeeper requests per second, all told


@dataclass(frozen=True, slots=True)
class Candidate:
    """A version znode the scan found, with what the later conditional write needs."""

    path: str
    version: int  # data version: the condition of the write
    czxid: int


@dataclass(slots=True)
class Plan:
    """What a scan found: znodes to retire, intents to repair, and ZooKeeper's clock then."""

    now_ms: int
    scanned: int = 0
    oldest_intent_seconds: float = 0.0
    retire: list[Candidate] = field(default_factory=list)
    repair: list[Candidate] = field(default_factory=list)  # every intent seen
    retired: int = 0  # scan(retire=True): retired as it went
    skipped: int = 0


@dataclass(slots=True)
class RoundReport:
    """One round's outcome, kept on ``leader``'s data for ``cachectl doctor``."""

    member_id: str = ""
    finished_at: float = 0.0  # unix time
    seconds: float = 0.0
    scanned: int = 0  # version znodes looked at
    retired: int = 0
    repaired: int = 0
    open_intents: int = 0  # intents left: writes under way, kept on purpose, or not dead long enough
    skipped: int = 0  # retirements left out: written or gone between scan and delete
    prefix_entries_trimmed: int = 0
    markers_swept: int = 0  # kept-intent markers of intents that have ended
    oldest_intent_seconds: float = 0.0  # the oldest intent seen, dead or alive
    # The leader's settings, for whoever reads the report (cachectl doctor).
    retention: float = 0.0
    interval: float = 0.0
    lock_timeout: float = 0.0


class Housekeeper:
    """The housekeeping loop of one sidecar: it works only while its election says it leads."""

    def __init__(
        self,
        zk: ZkSession,
        layout: Layout,
        election: Election,
        settings: HousekeepingSettings,
        member_id: str,
    ) -> None:
        self._zk = zk
        self._layout = layout
        self._election = election
        self.settings = settings
        self._member_id = member_id
        self._limiter = AsyncLimiter(max(1.0, settings.rate), 1.0)
        self.last: RoundReport | None = None
        self.rounds = 0
        self.failures = 0  # rounds that failed (not counting being deposed)
        # Intents with no lock and no marker: path -> (data version, first seen, monotonic).
        self._dead_since: dict[str, tuple[int, float]] = {}
        self._term = -1
        self.totals = RoundReport(member_id=member_id)
        self._task: asyncio.Task[None] | None = None
        # `retired` must be bumped in every round before its first delete, and
        # again whenever a batch holds a newer creation than recorded.
        self._bumped_in_round = False
        self._recorded_czxid = 0

    def start(self) -> None:
        """Run rounds in the background whenever this sidecar leads."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop after the request in flight (every write is fenced, so none is left half done)."""
        if self._task is not None:
            await bridge.cancel_and_wait(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            await self._election.wait_leading()
            # At most one round per interval, also across a reconnect: a
            # leader whose connection flaps must not scan on every flap.
            pause = next_round - loop.time()
            if pause > 0:
                try:
                    await asyncio.wait_for(self._election.wait_not_leading(), pause)
                    continue  # lost the lead meanwhile: wait to lead again
                except TimeoutError:
                    pass
            next_round = loop.time() + self.settings.interval
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except NotLeader:
                log.info("housekeeping round stopped: no longer the leader")
            except Exception as exc:
                self.failures += 1
                log.warning("housekeeping round failed (%s); next round in %gs", exc, self.settings.interval)

    async def round(self) -> RoundReport:
        """One round (see the module docstring); raises :class:`NotLeader` if deposed midway."""
        started = time.monotonic()
        plan = await self.scan(retire=True)
        report = RoundReport(
            member_id=self._member_id,
            scanned=plan.scanned,
            retention=self.settings.retention,
            interval=self.settings.interval,
            lock_timeout=self.settings.lock_timeout,
        )
        report.oldest_intent_seconds = round(plan.oldest_intent_seconds, 3)
        report.repaired, report.open_intents = await self.repair(plan.repair)
        report.retired, report.skipped = plan.retired, plan.skipped
        report.prefix_entries_trimmed = await self.trim_prefix_log()
        report.markers_swept = await self.sweep_markers()
        report.finished_at = time.time()
        report.seconds = round(time.monotonic() - started, 3)
        await self._fenced_set(self._layout.leader, orjson.dumps(asdict(report)))
        self.last = report
        self.rounds += 1
        t = self.totals
        t.scanned += report.scanned
        t.retired += report.retired
        t.repaired += report.repaired
        t.skipped += report.skipped
        t.prefix_entries_trimmed += report.prefix_entries_trimmed
        if report.retired or report.repaired or report.prefix_entries_trimmed:
            log.info(
                "housekeeping: %d version znodes scanned, %d retired, %d intents repaired, %d skipped, "
                "%d prefix entries trimmed in %.1fs",
                report.scanned,
                report.retired,
                report.repaired,
                report.skipped,
                report.prefix_entries_trimmed,
                report.seconds,
            )
        return report

    # -- scan ---------------------------------------------------------------
    async def scan(self, *, retire: bool = False) -> Plan:
        """Read every version znode's stat; list what is due for retirement or repair.

        ``retire``: retire what is due bucket by bucket as the scan goes (a
        round does), so a key is retired within one scan of becoming due,
        not two; the plan then counts them instead of listing them.
        Otherwise stops listing retirements at ``_MAX_CANDIDATES`` (the next
        round goes on from there): a round's memory stays bounded.
        """
        # Re-set the report in place: the set's mtime is ZooKeeper's clock now.
        await self._limiter.acquire()
        report, _ = await self._zk.get(self._layout.leader)
        stamp = await self._fenced_set(self._layout.leader, report)
        plan = Plan(now_ms=int(stamp.mtime))
        self._bumped_in_round = False
        retention_ms = self.settings.retention * 1000
        versions = self._layout.versions
        step = self._batch(_SCAN_BATCH)
        for bucket in await self._children(versions):
            leaves = [f"{versions}/{bucket}/{leaf}" for leaf in await self._children(f"{versions}/{bucket}")]
            paths: list[str] = []
            for start in range(0, len(leaves), step):
                parents = leaves[start : start + step]
                for parent, names in zip(parents, await self._children_of(parents), strict=True):
                    paths += [f"{parent}/{name}" for name in names]
            # Stats in pipelined batches across leaves: one round trip each.
            for start in range(0, len(paths), step):
                chunk = paths[start : start + step]
                plan.scanned += len(chunk)
                for path, stat in zip(chunk, await self._stats(chunk), strict=True):
                    if stat is not None:
                        self._classify(plan, path, stat, retention_ms)
            if retire and plan.retire:
                retired, skipped = await self.retire(plan.retire)
                plan.retired += retired
                plan.skipped += skipped
                plan.retire = []
            if len(plan.retire) >= _MAX_CANDIDATES:
                break
        return plan

    def _batch(self, size: int) -> int:
        # aiolimiter refuses to take more than its capacity at once.
        return max(1, min(size, int(self.settings.rate)))

    @staticmethod
    def _classify(plan: Plan, path: str, stat: ZnodeStat, retention_ms: float) -> None:
        age_ms = plan.now_ms - int(stat.mtime)
        candidate = Candidate(path, int(stat.version), int(stat.czxid))
        if stat.dataLength == 0:
            plan.oldest_intent_seconds = max(plan.oldest_intent_seconds, age_ms / 1000)
            plan.repair.append(candidate)  # repair() decides, on its own clock
        elif age_ms > retention_ms:
            plan.retire.append(candidate)

    async def _children(self, path: str) -> list[str]:
        await self._limiter.acquire()
        try:
            return sorted(await self._zk.get_children(path))
        except NoNodeError:
            return []

    async def _children_of(self, paths: Sequence[str]) -> list[list[str]]:
        # One pipelined round trip; a parent deleted meanwhile lists nothing.
        await self._limiter.acquire(len(paths))
        client = self._zk.client
        results = await asyncio.gather(
            *(self._zk.call(client.get_children_async(path), "get_children") for path in paths),
            return_exceptions=True,
        )
        listed: list[list[str]] = []
        for result in results:
            if isinstance(result, NoNodeError):
                listed.append([])
            elif isinstance(result, BaseException):
                raise result
            else:
                listed.append(sorted(result))
        return listed

    async def _stats(self, paths: Sequence[str]) -> list[ZnodeStat | None]:
        # One pipelined round trip per batch, within the request budget.
        await self._limiter.acquire(len(paths))
        client = self._zk.client
        return await self._zk.call_all(*((client.exists_async(path), "exists") for path in paths))

    # -- repair -------------------------------------------------------------
    async def repair(self, intents: Sequence[Candidate]) -> tuple[int, int]:
        """Close dead writers' intents with a ``repair`` note; returns ``(repaired, not repaired)``.

        ``intents`` are every intent the scan saw.  One is dead once this
        leader has seen it, at the same data version, with no lock znode and
        no kept-intent marker, for ``lock_timeout`` on its own monotonic
        clock: no ZooKeeper clock is involved, and a writer's lock taken in
        between moves the data version and starts the count again.  An
        intent kept on purpose (``WriteLock.abandon`` without a note: the
        origin write's outcome is unknown) carries a marker and is never
        repaired: it waits for the key's next write or invalidation.
        """
        if self._term != self._election.terms:
            self._term, self._dead_since = self._election.terms, {}
        now = time.monotonic()
        repaired = left = 0
        note = version_note("repair", self._member_id)
        client = self._zk.client
        seen: dict[str, tuple[int, float]] = {}
        for intent in intents:
            lock = self._layout.lock_path_of_version_path(intent.path)
            marker = self._layout.uncertain_path_of_version_path(intent.path)
            await self._limiter.acquire()
            await self._limiter.acquire()
            held, kept = await self._zk.call_all(
                (client.exists_async(lock), "exists"), (client.exists_async(marker), "exists")
            )
            if held is not None or kept is not None:
                left += 1  # a live writer's, or kept on purpose
                continue
            version, since = self._dead_since.get(intent.path, (intent.version, now))
            if version != intent.version:
                since = now  # a writer came and went: count again
            seen[intent.path] = (intent.version, since)
            if now - since < self.settings.lock_timeout:
                left += 1
                continue
            await self._zk.ensure_path(lock.rpartition("/")[0])
            await self._zk.ensure_path(marker.rpartition("/")[0])
            tx = client.transaction()
            self._election.fence(tx)
            # The lock's create fails if a writer holds it now, the marker's if
            # a kept intent was marked since the look above; the set fails if
            # the version moved (a writer came and went, or an invalidation).
            tx.create(lock, b"", ephemeral=True)
            tx.create(marker, b"")
            tx.set_data(intent.path, note, intent.version)
            tx.delete(marker)
            tx.delete(lock)
            if self._outcome(await self._zk.commit(tx, "repair")) is None:
                repaired += 1
                seen.pop(intent.path, None)
                log.warning("closed the intent of %s: no writer's lock on it for over %gs",
                            intent.path, self.settings.lock_timeout)  # fmt: skip
            else:
                left += 1
        self._dead_since = seen  # intents gone since are forgotten
        return repaired, left

    async def sweep_markers(self) -> int:
        """Delete kept-intent markers whose intent has ended (the key was written or invalidated since).

        The marker's own version is read first and its delete is conditional
        on it: a writer that takes over a marker touches it, so a sweep that
        read it before never deletes the marker of an intent under way.
        """
        swept = 0
        client = self._zk.client
        for bucket in await self._children(self._layout.uncertain):
            parent = f"{self._layout.uncertain}/{bucket}"
            for name in await self._children(parent):
                marker = f"{parent}/{name}"
                version_path = self._layout.version_path_of_uncertain_path(marker)
                if version_path is None:
                    continue
                await self._limiter.acquire()
                await self._limiter.acquire()
                marker_stat, stat = await self._zk.call_all(
                    (client.exists_async(marker), "exists"), (client.exists_async(version_path), "exists")
                )
                if marker_stat is None or (stat is not None and stat.dataLength == 0):
                    continue  # gone, or still kept
                await self._limiter.acquire()
                tx = client.transaction()
                self._election.fence(tx)
                if stat is not None:
                    tx.check(version_path, stat.version)  # still out of intent
                tx.delete(marker, marker_stat.version)
                if self._outcome(await self._zk.commit(tx, "sweep")) is None:
                    swept += 1
        return swept

    # -- retire -------------------------------------------------------------
    async def retire(self, candidates: Sequence[Candidate]) -> tuple[int, int]:
        """Delete ``candidates`` unless written since the scan; returns ``(retired, skipped)``.

        ``retired`` is bumped first (the module docstring says why), then the
        deletes go out in fenced transactions, ``_IN_FLIGHT`` at a time.
        """
        if not candidates:
            return 0, 0
        newest = max(c.czxid for c in candidates)
        # Once per round (every candidate's mzxid is older than the round's
        # stamp, so the bump's zxid passes them all), and again only for a
        # newer creation than recorded: a few bumps a round, each one waking
        # every sidecar's `retired` watch.
        if not self._bumped_in_round or newest > self._recorded_czxid:
            await self._bump_retired(newest)
            self._bumped_in_round = True
        size = self._batch(_BATCH)
        batches = iter([list(candidates[i : i + size]) for i in range(0, len(candidates), size)])
        counts = [0, 0]  # retired, skipped

        async def worker() -> None:
            for pending in batches:  # shared: each batch goes to one worker
                while pending:
                    await self._limiter.acquire(len(pending))
                    tx = self._zk.client.transaction()
                    self._election.fence(tx)
                    for candidate in pending:
                        tx.delete(candidate.path, candidate.version)
                    failed = self._outcome(await self._zk.commit(tx, "retire"))
                    if failed is None:
                        counts[0] += len(pending)
                        break
                    # Written since the scan (BadVersion) or gone (NoNode):
                    # leave it; send the rest again.
                    counts[1] += 1
                    del pending[failed - 1]

        results = await asyncio.gather(*(worker() for _ in range(_IN_FLIGHT)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # NotLeader first if deposed: every worker's fence failed the same way
        return counts[0], counts[1]

    async def _bump_retired(self, czxid: int) -> None:
        for _ in range(5):
            await self._limiter.acquire()
            try:
                data, stat = await self._zk.get(self._layout.retired)
            except NoNodeError:
                data, stat = b"", None
            recorded = max(czxid, _max_czxid(data))
            body = orjson.dumps({"max_czxid": recorded, "by": self._member_id, "at": time.time()})
            tx = self._zk.client.transaction()
            self._election.fence(tx)
            if stat is None:
                tx.create(self._layout.retired, body)
            else:
                tx.set_data(self._layout.retired, body, stat.version)
            if self._outcome(await self._zk.commit(tx, "retire")) is None:
                self._recorded_czxid = recorded
                return
        raise CoordinationError(f"{self._layout.retired} kept changing")

    # -- prefix log -----------------------------------------------------------
    async def trim_prefix_log(self) -> int:
        """Delete all but the newest ``PREFIX_LOG_RETAIN`` prefix-log entries; returns how many went."""
        names = await self._children(self._layout.prefixes)
        entries = sorted(
            (parsed[0], name) for name in names if (parsed := self._layout.parse_prefix_entry(name)) is not None
        )
        doomed = [f"{self._layout.prefixes}/{name}" for _, name in entries[:-PREFIX_LOG_RETAIN]]
        trimmed = 0
        size = self._batch(_BATCH)
        for start in range(0, len(doomed), size):
            pending = doomed[start : start + size]
            while pending:
                await self._limiter.acquire(len(pending))
                tx = self._zk.client.transaction()
                self._election.fence(tx)
                for path in pending:
                    tx.delete(path)
                failed = self._outcome(await self._zk.commit(tx, "trim"))
                if failed is None:
                    trimmed += len(pending)
                    break
                del pending[failed - 1]  # trimmed by an older sidecar's publish meanwhile
        return trimmed

    # -- fenced writes ----------------------------------------------------------
    async def _fenced_set(self, path: str, data: bytes) -> ZnodeStat:
        await self._limiter.acquire()
        tx = self._zk.client.transaction()
        self._election.fence(tx)
        tx.set_data(path, data)
        results = await self._zk.commit(tx, "stamp")
        failed = self._outcome(results)
        if failed is not None:
            raise CoordinationError(f"setting {path}: {results[failed]!r}")
        return results[1]

    def _outcome(self, results: list[Any]) -> int | None:
        """Index of the operation that failed a fenced transaction (None: it committed).

        Raises :class:`NotLeader` when the fence itself failed: nothing else
        in the transaction was applied, and nothing more may be tried.
        """
        for index, result in enumerate(results):
            if isinstance(result, Exception) and not isinstance(result, RolledBackError | RuntimeInconsistency):
                if index == 0:
                    raise NotLeader("ZooKeeper refused the housekeeper's fence: another sidecar leads now")
                if not isinstance(result, BadVersionError | NoNodeError | NodeExistsError):
                    raise CoordinationError(f"housekeeping transaction failed: {result!r}")
                return index
        return None
