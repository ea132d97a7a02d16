"""Everything that talks to ZooKeeper. Nothing outside this package imports kazoo."""

from .coordinator import Coordinator, EventDelivery, Events, KeyState, KeyVersion
from .layout import MAX_KEY_BYTES, Layout, escape, unescape, validate_key
from .lock import CasBasis, LockLost, VersionConflict, WriteLock
from .operations import (
    Acknowledgement,
    InvalidationReceipt,
    await_acknowledgement,
    list_members,
    publish_invalidation,
    read_version,
    version_note,
)
from .session import ZkSession, ZkState

__all__ = [
    "MAX_KEY_BYTES",
    "Acknowledgement",
    "CasBasis",
    "Coordinator",
    "EventDelivery",
    "Events",
    "InvalidationReceipt",
    "KeyState",
    "KeyVersion",
    "Layout",
    "LockLost",
    "VersionConflict",
    "WriteLock",
    "ZkSession",
    "ZkState",
    "await_acknowledgement",
    "escape",
    "list_members",
    "publish_invalidation",
    "read_version",
    "unescape",
    "validate_key",
    "version_note",
]
