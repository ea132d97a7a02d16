"""Everything that talks to ZooKeeper. Nothing outside this package imports kazoo."""

from .coordinator import Coordinator, EventDelivery, Events, KeyState, KeyVersion
from .layout import MAX_KEY_BYTES, Layout, escape, unescape, validate_key
from .lock import CasBasis, LockLost, VersionConflict, WriteLock
from .operations import (
    Acknowledgement,
    InvalidationReceipt,
    LiveConfigChange,
    await_acknowledgement,
    list_members,
    publish_invalidation,
    read_live_config,
    read_version,
    update_live_config,
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
    "LiveConfigChange",
    "LockLost",
    "VersionConflict",
    "WriteLock",
    "ZkSession",
    "ZkState",
    "await_acknowledgement",
    "escape",
    "list_members",
    "publish_invalidation",
    "read_live_config",
    "read_version",
    "unescape",
    "update_live_config",
    "validate_key",
    "version_note",
]
