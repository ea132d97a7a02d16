"""Where things live in ZooKeeper, and how keys become znode names.

Under the namespace root (``<zk_root>/<namespace>``, default ``/zkcache/default``)::

    versions/<bucket>/<escaped key>   version znode; its mzxid is the key's version
    locks/<bucket>/<escaped key>      ephemeral: the key's write lock (see lock.py)
    members/<member id>               ephemeral, JSON describing one live sidecar
    epoch                             bumped by invalidate-all; every sidecar watches it
    ackreq                            bumped to ask every sidecar to acknowledge what it
                                      applied (invalidate --wait); every sidecar watches it
    prefixes/<escaped prefix>~<seq>   sequential log of prefix invalidations;
                                      every sidecar child-watches prefixes/

Keys are escaped with percent-encoding of every byte of their UTF-8 form except
``A-Z a-z 0-9 - _ ~``, so a znode name never contains ``/``, never is ``.`` or
``..`` and never contains characters ZooKeeper rejects.  ``<bucket>`` is the
first three hex digits of the key's BLAKE2b hash (4096 buckets), which keeps
each parent's child list small (a million keys is about 250 children each).
The bucket count is part of the wire layout: changing it splits a fleet.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, unquote

from ..errors import InvalidKey

__all__ = ["MAX_KEY_BYTES", "Layout", "escape", "unescape", "validate_key"]

MAX_KEY_BYTES = 1024
_SAFE = "-_~"  # quote() also keeps A-Z a-z 0-9; '.' must go (".", "..")
_SEQ_SEP = "~"  # never produced by escape() followed by 10 digits at the end
_PREFIX_ENTRY = re.compile(r"^(?P<prefix>.*)~(?P<seq>\d{10})$")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid cache key, else raise :class:`InvalidKey`."""
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("key is not valid UTF-8") from None
    if not 1 <= n <= MAX_KEY_BYTES:
        raise InvalidKey(f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8, got {n}")
    return key


def escape(text: str) -> str:
    """Escape a key (or prefix) into a znode name; inverse of :func:`unescape`."""
    return quote(text, safe=_SAFE).replace(".", "%2E")


def unescape(name: str) -> str:
    """Recover the key from a znode name made by :func:`escape`."""
    return unquote(name, errors="strict")


def _bucket(key: str) -> str:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=2).hexdigest()[:3]


class Layout:
    """Paths of one namespace's znodes."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.versions = f"{root}/versions"
        self.locks = f"{root}/locks"
        self.members = f"{root}/members"
        self.epoch = f"{root}/epoch"
        self.ackreq = f"{root}/ackreq"
        self.prefixes = f"{root}/prefixes"

    def version_path(self, key: str) -> str:
        """The version znode of ``key``."""
        return f"{self.versions}/{_bucket(key)}/{escape(key)}"

    def lock_path(self, key: str) -> str:
        """The ephemeral znode that is ``key``'s write lock (see ``lock``)."""
        return f"{self.locks}/{_bucket(key)}/{escape(key)}"

    def member_path(self, member_id: str) -> str:
        """The ephemeral membership znode of a sidecar."""
        return f"{self.members}/{member_id}"

    def key_of_version_path(self, path: str) -> str | None:
        """The key whose version znode is ``path``, or ``None`` if it is not one."""
        head, _, name = path.rpartition("/")
        if not name or head.rpartition("/")[0] != self.versions:
            return None
        return unescape(name)

    def prefix_entry_base(self, prefix: str) -> str:
        """Path to pass to a sequential create for a prefix invalidation."""
        return f"{self.prefixes}/{escape(prefix)}{_SEQ_SEP}"

    @staticmethod
    def parse_prefix_entry(name: str) -> tuple[int, str] | None:
        """``(sequence, prefix)`` of a prefixes/ child name, or ``None`` if foreign."""
        m = _PREFIX_ENTRY.match(name)
        if m is None:
            return None
        try:
            return int(m.group("seq")), unescape(m.group("prefix"))
        except UnicodeDecodeError:
            return None  # not written by us: ignore rather than wedge the watcher
