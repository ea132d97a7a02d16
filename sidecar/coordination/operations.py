"""Stateless ZooKeeper operations shared by the daemon and ``cachectl``.

Nothing here keeps watches or state: these functions take a connected
:class:`ZkSession` and a :class:`Layout` and do one protocol step each.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from ..config import parse_live
from ..errors import ConfigError, CoordinationError, LayoutMismatch, SidecarError
from .election import current_leader
from .layout import LAYOUT_NAME, Layout
from .session import ZkSession

__all__ = [
    "PREFIX_LOG_RETAIN",
    "Acknowledgement",
    "InvalidationReceipt",
    "LiveConfigChange",
    "await_acknowledgement",
    "ensure_layout",
    "invalidate_key",
    "list_members",
    "publish_invalidation",
    "read_live_config",
    "read_version",
    "update_live_config",
    "version_note",
]

log = logging.getLogger(__name__)

# Prefix log entries the housekeeper keeps (housekeeping.py); a sidecar that
# falls further behind than this (it sees a gap) flushes everything instead.
PREFIX_LOG_RETAIN = 1000
_TRIM_CHECK_EVERY = 100
# A key written without pause moves under a conditional set; each try is one
# round trip, and any try that lands is enough.
_INVALIDATE_ATTEMPTS = 20


async def ensure_layout(zk: ZkSession, layout: Layout) -> None:
    """Create the namespace's fixed parents if they are missing (idempotent).

    Raises :class:`LayoutMismatch` if the namespace was laid out by sidecars
    that bucket keys differently: the two would never see each other's writes.
    """
    for path in (layout.versions, layout.locks, layout.members, layout.prefixes, layout.leader):
        await zk.ensure_path(path)
    for path in (layout.epoch, layout.ackreq, layout.retired):
        try:
            await zk.create(path, b"0" if path != layout.retired else b"{}")
        except NodeExistsError:
            pass
    try:
        marker, _ = await zk.get(layout.layout)
    except NoNodeError:
        # Version 1 had three-hex-digit buckets, no marker, and members that
        # do not name their layout: any of those means older sidecars.
        old = [name for name in await zk.get_children(layout.versions) if len(name) == 3]
        older = [m["member_id"] for m in await list_members(zk, layout) if m.get("layout") != LAYOUT_NAME.decode()]
        if old or older:
            found = f"buckets like versions/{old[0]}" if old else f"live members {', '.join(map(str, older[:3]))}"
            raise LayoutMismatch(
                f"{layout.root} is used by sidecars of an older layout ({found}); "
                "use a new namespace, or stop every older sidecar and delete the namespace"
            ) from None
        try:
            await zk.create(layout.layout, LAYOUT_NAME)
            return
        except NodeExistsError:
            marker, _ = await zk.get(layout.layout)
    if marker != LAYOUT_NAME:
        raise LayoutMismatch(
            f"{layout.root} uses layout {marker.decode('utf-8', 'replace')!r}, this sidecar "
            f"{LAYOUT_NAME.decode()!r}: sidecars of one namespace must agree on it"
        )


async def read_version(zk: ZkSession, layout: Layout, key: str) -> int:
    """The key's current version (its version znode's mzxid), 0 if never written."""
    stat = await zk.exists(layout.version_path(key))
    return int(stat.mzxid) if stat else 0


def version_note(op: str, by: str, write_id: str = "") -> bytes:
    """The data a version bump leaves: who did what (never empty: empty means intent).

    ``write_id`` makes a writer's note unique, so that after a lost reply it
    can tell whether its own publish landed.
    """
    return orjson.dumps({"op": op, "by": by, "write": write_id} if write_id else {"op": op, "by": by})


async def invalidate_key(zk: ZkSession, layout: Layout, key: str, by: str) -> int:
    """Give ``key`` a new version, firing every sidecar's watch on it; return it.

    A live writer's intent (empty data while its lock znode exists) is kept:
    the new version still fires every watch, and only that writer's publish
    ends the intent; ending it here would let sidecars cache the old value
    while its origin write is under way.  An intent whose lock is gone (its
    writer died midway, or kept it because its origin write's outcome is
    unknown) is ended with a note, and its kept-intent marker deleted in the
    same transaction.  Every set is conditional on
    the data version just read, so a writer entering meanwhile is never
    overwritten: the loop reads again.
    """
    path, note = layout.version_path(key), version_note("invalidate", by)
    for _ in range(_INVALIDATE_ATTEMPTS):
        stat = await zk.exists(path)
        if stat is None:
            try:
                _, created = await zk.create(path, note, makepath=True)
                return int(created.mzxid)
            except NodeExistsError:
                continue
        data = note
        marker = None
        if stat.dataLength == 0:
            if await zk.exists(layout.lock_path(key)) is not None:
                data = b""  # a live writer's intent: bump it, keep it
            elif await zk.exists(layout.uncertain_path(key)) is not None:
                marker = layout.uncertain_path(key)  # ending a kept intent: its marker goes with it
        tx = zk.client.transaction()
        tx.set_data(path, data, stat.version)
        if marker is not None:
            tx.delete(marker)
        results = await zk.commit(tx, "invalidate")
        if not any(isinstance(r, Exception) for r in results):
            return int(results[0].mzxid)
        # Written meanwhile, retired by the housekeeper, or the marker gone: look again.
    raise CoordinationError(f"invalidating {key!r}: its version znode kept changing ({_INVALIDATE_ATTEMPTS} tries)")


_INVALIDATE_CONCURRENCY = 64


@dataclass(slots=True)
class Acknowledgement:
    """Which live members confirmed having applied an invalidation."""

    confirmed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when no live member is missing."""
        return not self.missing


@dataclass(slots=True)
class InvalidationReceipt:
    """What :func:`publish_invalidation` wrote, for the API response and the CLI."""

    keys: dict[str, int] = field(default_factory=dict)
    prefixes: dict[str, int] = field(default_factory=dict)
    all: bool = False
    epoch: int | None = None
    zxid: int = 0  # the newest zxid this invalidation wrote
    ack: Acknowledgement | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON body of ``202 Accepted``."""
        body: dict[str, Any] = {
            "keys": self.keys,
            "prefixes": self.prefixes,
            "all": self.all,
            "epoch": self.epoch,
            "zxid": self.zxid,
        }
        if self.ack is not None:
            body["acknowledged_by"] = self.ack.confirmed
            body["not_confirmed"] = self.ack.missing
        return body


async def publish_invalidation(
    zk: ZkSession,
    layout: Layout,
    *,
    keys: list[str],
    prefixes: list[str],
    everything: bool,
    by: str,
) -> InvalidationReceipt:
    """Publish an invalidation to every sidecar of the namespace.

    Keys get a new version (the origin is not touched); prefixes get an entry in
    the prefix log; ``everything`` bumps the epoch.  Sidecars apply each through
    the watch they already hold, so the guarantee is the same for all three.
    """
    receipt = InvalidationReceipt(all=everything)
    zxids: list[int] = []
    # Keys are independent (each its own znode and conditional set), so they
    # go concurrently: a round trip each at once, not one after the other.
    # Bounded, so one request cannot queue thousands on the session.
    room = asyncio.Semaphore(_INVALIDATE_CONCURRENCY)

    async def one(key: str) -> None:
        async with room:
            receipt.keys[key] = await invalidate_key(zk, layout, key, by)

    unique = list(dict.fromkeys(keys))
    try:
        async with asyncio.TaskGroup() as group:
            for key in unique:
                group.create_task(one(key))
    except BaseExceptionGroup as failed:
        # Callers map one error to one answer: the first, as when keys went one by one.
        raise failed.exceptions[0] from None
    receipt.keys = {key: receipt.keys[key] for key in unique}  # in request order
    zxids.extend(receipt.keys.values())
    for prefix in dict.fromkeys(prefixes):
        path, stat = await zk.create(
            layout.prefix_entry_base(prefix), orjson.dumps({"by": by}), sequence=True, makepath=True
        )
        parsed = layout.parse_prefix_entry(path.rpartition("/")[2])
        seq = parsed[0] if parsed else -1
        zxids.append(int(stat.mzxid))
        receipt.prefixes[prefix] = seq
        if seq % _TRIM_CHECK_EVERY == 0:
            await _trim_if_unkept(zk, layout)
    if everything:
        data = orjson.dumps({"by": by})
        try:
            stat = await zk.set(layout.epoch, data)
        except NoNodeError:
            _, stat = await zk.create(layout.epoch, data, makepath=True)
        receipt.epoch = int(stat.mzxid)
        zxids.append(receipt.epoch)
    receipt.zxid = max(zxids, default=0)
    return receipt


async def _trim_if_unkept(zk: ZkSession, layout: Layout) -> None:
    # The housekeeper trims the log every round; this is the fallback for a
    # namespace where none runs (invalidations from cachectl alone, or every
    # round failing), so the log never outgrows a getChildren reply.
    names = await zk.get_children(layout.prefixes)
    if len(names) <= 2 * PREFIX_LOG_RETAIN:
        return
    entries = sorted((parsed[0], name) for name in names if (parsed := layout.parse_prefix_entry(name)) is not None)
    for _, name in entries[:-PREFIX_LOG_RETAIN]:
        try:
            await zk.delete(f"{layout.prefixes}/{name}")
        except NoNodeError:
            pass  # the housekeeper got there first


async def list_members(zk: ZkSession, layout: Layout, *, with_leader: bool = False) -> list[dict[str, Any]]:
    """The live sidecars of the namespace, from their ephemeral znodes; ``with_leader``: mark the housekeeper."""
    try:
        names = await zk.get_children(layout.members)
    except NoNodeError:
        return []
    leader = await current_leader(zk, layout) if with_leader else None
    members = []
    for name in sorted(names):
        try:
            data, stat = await zk.get(layout.member_path(name))
        except NoNodeError:
            continue  # left while we listed
        try:
            info = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            info = {"raw": data.decode("utf-8", "replace")}
        info.setdefault("member_id", name)
        info["session"] = f"0x{stat.ephemeralOwner:x}"
        if with_leader:
            info["leader"] = leader is not None and leader.get("session") == info["session"]
        members.append(info)
    return members


async def await_acknowledgement(
    zk: ZkSession, layout: Layout, zxid: int, timeout: float, *, poll: float = 0.01
) -> Acknowledgement:
    """Wait until every live member has applied everything up to ``zxid``.

    Bumps ``ackreq`` (every member watches it and answers by publishing
    ``applied_zxid`` in its member znode), then polls the members until each
    confirms, or has left (its session expired, so it serves nothing), or
    ``timeout`` passes.  Bounded in time; returns who did and did not confirm.
    """
    await zk.set(layout.ackreq, b"{}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        members = await list_members(zk, layout)
        ack = Acknowledgement()
        for member in members:
            applied = member.get("applied_zxid")
            done = isinstance(applied, int) and applied >= zxid
            (ack.confirmed if done else ack.missing).append(str(member["member_id"]))
        if ack.complete or loop.time() >= deadline:
            return ack
        await asyncio.sleep(poll)


# -- live configuration (the config znode) -------------------------------------
_CONFIG_ATTEMPTS = 10


async def read_live_config(
    zk: ZkSession, layout: Layout, *, unreadable_as_empty: bool = False
) -> tuple[dict[str, Any], int | None]:
    """The config znode's settings as written (unparsed), and its data version (None if absent).

    Raises :class:`SidecarError` if the namespace does not exist, or
    :class:`ConfigError` if the znode does not hold a JSON object (unless
    ``unreadable_as_empty``: then it reads as holding nothing, to be replaced).
    """
    try:
        return await _read_live_config(zk, layout)
    except _Unreadable as exc:
        if unreadable_as_empty:
            return {}, exc.version
        raise ConfigError(f"{layout.config} {exc.detail}; replace it: cachectl config set --replace ...") from None


class _Unreadable(Exception):
    def __init__(self, detail: str, version: int) -> None:
        super().__init__(detail)
        self.detail, self.version = detail, version


async def _read_live_config(zk: ZkSession, layout: Layout) -> tuple[dict[str, Any], int | None]:
    try:
        data, stat = await zk.get(layout.config)
    except NoNodeError:
        if await zk.exists(layout.root) is None:
            raise SidecarError(f"namespace {layout.root} does not exist (no sidecar ever joined it)") from None
        return {}, None
    if not data:
        return {}, int(stat.version)
    try:
        table = orjson.loads(data)
    except ValueError:
        raise _Unreadable("does not hold JSON", int(stat.version)) from None
    if not isinstance(table, dict):
        raise _Unreadable("does not hold a JSON object", int(stat.version))
    return table, int(stat.version)


@dataclass
class LiveConfigChange:
    """What ``update_live_config`` found and left (settings as written)."""

    before: dict[str, Any]
    after: dict[str, Any]
    version: int | None  # the data version written (None: nothing written)

    @property
    def changes(self) -> list[tuple[str, Any, Any]]:
        """(setting, before, after) for each setting that differs; None means unset."""
        names = sorted(set(self.before) | set(self.after))
        return [(n, self.before.get(n), self.after.get(n)) for n in names if self.before.get(n) != self.after.get(n)]


async def update_live_config(
    zk: ZkSession, layout: Layout, set_: dict[str, str], unset: list[str], *, write: bool = True, replace: bool = False
) -> LiveConfigChange:
    """Merge ``set_`` and ``unset`` into the config znode with a version check.

    Every value is checked by the daemon's own parsers first (``ConfigError``).
    A concurrent writer makes the conditional write fail; it is then read
    again and merged again, so two operators changing different settings
    both land, and neither overwrites what the other wrote.  ``write=False``
    computes the change without writing it (``cachectl config diff``).
    ``replace``: the znode holds exactly ``set_`` afterwards, whatever it held
    (also what no parser reads: the way out of a hand-edited znode).
    """
    for _ in range(_CONFIG_ATTEMPTS):
        before, version = await read_live_config(zk, layout, unreadable_as_empty=replace)
        after = {} if replace else {name: value for name, value in before.items() if name not in unset}
        after.update(set_)
        parse_live(orjson.dumps(after))  # the daemon's own check; ConfigError names the setting
        change = LiveConfigChange(before, after, None)
        if not write or not change.changes:
            return change
        data = orjson.dumps(after, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        try:
            if version is None:
                await zk.create(layout.config, data)
                change.version = 0
            else:
                change.version = int((await zk.set(layout.config, data, version)).version)
            return change
        except (BadVersionError, NodeExistsError, NoNodeError):
            continue  # another operator wrote meanwhile: merge into theirs
    raise CoordinationError(f"{layout.config} kept changing: {_CONFIG_ATTEMPTS} conditional writes lost the race")
