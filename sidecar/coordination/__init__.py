"""Everything that talks to ZooKeeper. Nothing outside this package imports kazoo."""

from .coordinator import Coordinator, Events, KeyVersion
from .layout import MAX_KEY_BYTES, Layout, escape, unescape, validate_key
from .lock import VersionConflict, WriteLock
from .operations import (
    INTENT,
    Acknowledgement,
    InvalidationReceipt,
    await_acknowledgement,
    list_members,
    publish_invalidation,
    read_version,
)
from .session import ZkSession, ZkState

__all__ = [
    "INTENT",
    "MAX_KEY_BYTES",
    "Acknowledgement",
    "Coordinator",
    "Events",
    "InvalidationReceipt",
    "KeyVersion",
    "Layout",
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
]
