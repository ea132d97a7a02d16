"""Where things live in ZooKeeper, and how keys become znode names.

Under the namespace root (``<zk_root>/<namespace>``, default ``/zkcache/default``)::

    versions/<hh>/<hh>/<escaped key>  version znode; its mzxid is the key's version
    locks/<hh>/<hh>/<escaped key>     ephemeral: the key's write lock (see lock.py)
    members/<member id>               ephemeral, JSON describing one live sidecar
    uncertain/<hh>/<escaped key>      a writer kept the key in intent on purpose (its
                                      origin write's outcome is unknown): the
                                      housekeeper never repairs that intent
    leader/c-<id>-<seq>               ephemeral sequential: housekeeper election
                                      (election.py); the parent's data is the last
                                      housekeeping round's report
    retired                           bumped by the housekeeper before it deletes
                                      version znodes: absent keys' version (see
                                      housekeeping.py)
    layout                            the layout's name: sidecars of another refuse it
    config                            JSON of live settings (cachectl config); every
                                      sidecar watches it (live_config.py)
    epoch                             bumped by invalidate-all; every sidecar watches it
    ackreq                            bumped to ask every sidecar to acknowledge what it
                                      applied (invalidate --wait); every sidecar watches it
    prefixes/<escaped prefix>~<seq>   sequential log of prefix invalidations;
                                      every sidecar child-watches prefixes/

Keys are escaped with percent-encoding of every byte of their UTF-8 form except
``A-Z a-z 0-9 - _ ~``, so a znode name never contains ``/``, never is ``.`` or
``..`` and never contains characters ZooKeeper rejects.  ``<hh>/<hh>`` (the
bucket) is the key's 16-bit BLAKE2b hash in hex, split in two levels: 65,536
buckets, and no parent lists more than 256 of them.

Why 65,536: a ``getChildren`` reply must stay well under ZooKeeper's 1 MB
packet limit (``jute.maxbuffer``), and it carries every child's name.  At
10^7 version znodes (about 10 GB of ZooKeeper heap at 1 KB each, so beyond
any ensemble we claim) a bucket holds about 153 children, under 220 for the
fullest by the binomial tail, which is under 700 KB even if every key is
1,024 bytes escaped to 3,072; typical 40-byte keys make 10 KB.  At 10^8 keys
of at most 100 escaped bytes it is about 160 KB.  4,096 buckets held about
24,000 children each at 10^8 keys (2.4 MB with 100-byte names).  Version
znodes exist only for keys written within ``version_retention``
(housekeeping.py), so these are counts of recently written keys.

The bucket function is part of the wire layout: sidecars of one namespace
must agree on it, so the namespace records it (``LAYOUT_NAME`` in
``layout``) and a sidecar of another layout refuses to join.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, unquote

from ..errors import InvalidKey

__all__ = ["LAYOUT_NAME", "MAX_KEY_BYTES", "Layout", "escape", "unescape", "validate_key"]

MAX_KEY_BYTES = 1024
# Changing the bucket function needs a new name here: it splits a fleet.
LAYOUT_NAME = b"zkcache-layout-2 buckets=blake2b16/2x256"
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
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=2).hexdigest()
    return f"{digest[:2]}/{digest[2:]}"


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
        self.leader = f"{root}/leader"
        self.retired = f"{root}/retired"
        self.layout = f"{root}/layout"
        self.uncertain = f"{root}/uncertain"
        self.config = f"{root}/config"

    def version_path(self, key: str) -> str:
        """The version znode of ``key``."""
        return f"{self.versions}/{_bucket(key)}/{escape(key)}"

    def lock_path(self, key: str) -> str:
        """The ephemeral znode that is ``key``'s write lock (see ``lock``)."""
        return f"{self.locks}/{_bucket(key)}/{escape(key)}"

    def uncertain_path(self, key: str) -> str:
        """The marker of an intent ``key``'s writer kept on purpose (one bucket level: such keys are few)."""
        return f"{self.uncertain}/{_bucket(key)[:2]}/{escape(key)}"

    def member_path(self, member_id: str) -> str:
        """The ephemeral membership znode of a sidecar."""
        return f"{self.members}/{member_id}"

    def lock_path_of_version_path(self, path: str) -> str:
        """The lock znode of the key whose version znode is ``path``."""
        return self.locks + path[len(self.versions) :]

    def uncertain_path_of_version_path(self, path: str) -> str:
        """The kept-intent marker of the key whose version znode is ``path``."""
        bucket, _, name = path[len(self.versions) + 1 :].split("/")
        return f"{self.uncertain}/{bucket}/{name}"

    def version_path_of_uncertain_path(self, path: str) -> str | None:
        """The version znode of the key whose kept-intent marker is ``path`` (None if foreign)."""
        head, _, name = path.rpartition("/")
        if not name or head.rpartition("/")[0] != self.uncertain:
            return None
        try:
            return self.version_path(unescape(name))
        except UnicodeDecodeError:
            return None

    def key_of_version_path(self, path: str) -> str | None:
        """The key whose version znode is ``path``, or ``None`` if it is not one."""
        head, _, name = path.rpartition("/")
        if not name or head.rpartition("/")[0].rpartition("/")[0] != self.versions:
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
