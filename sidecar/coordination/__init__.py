"""Everything that talks to ZooKeeper. Nothing outside this package imports kazoo."""

from .coordinator import Coordinator, Events
from .layout import MAX_KEY_BYTES, Layout, escape, unescape, validate_key
from .operations import InvalidationReceipt, list_members, publish_invalidation, read_version
from .session import ZkSession, ZkState

__all__ = [
    "MAX_KEY_BYTES",
    "Coordinator",
    "Events",
    "InvalidationReceipt",
    "Layout",
    "ZkSession",
    "ZkState",
    "escape",
    "list_members",
    "publish_invalidation",
    "read_version",
    "unescape",
    "validate_key",
]
