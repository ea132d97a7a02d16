"""ZooKeeper's wire protocol, decoded enough to name what a client and the server exchange.

:class:`RequestCensus` is a ``harness.TcpProxy`` put between one sidecar and
ZooKeeper that counts every request it forwards by opcode and znode kind
(``"multi[create locks/*/*/*, setData versions/*/*]"``) and every watch
notification (``"notify dataChanged versions/*/*"``).
"""

from __future__ import annotations

import struct
import threading
from collections import Counter
from collections.abc import Callable

from harness import TcpProxy

__all__ = ["OPCODES", "RequestCensus", "describe_reply", "describe_request", "znode_kind"]

OPCODES = {
    1: "create",
    2: "delete",
    3: "exists",
    4: "getData",
    5: "setData",
    6: "getACL",
    7: "setACL",
    8: "getChildren",
    9: "sync",
    11: "ping",
    12: "getChildren2",
    13: "check",
    14: "multi",
    15: "create2",
    17: "checkWatches",
    18: "removeWatches",
    19: "createContainer",
    20: "deleteContainer",
    21: "createTTL",
    22: "multiRead",
    100: "auth",
    101: "setWatches",
    103: "getEphemerals",
    104: "getAllChildrenNumber",
    105: "setWatches2",
    106: "addWatch",
    107: "whoAmI",
    -11: "closeSession",
}
_WATCHABLE = {3, 4, 8, 12}  # request body: path, then a "watch" boolean
_EVENTS = {1: "created", 2: "deleted", 3: "dataChanged", 4: "childrenChanged"}


class _Jute:
    """Reads ZooKeeper's jute encoding (big-endian ints, length-prefixed strings)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read_int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(v)

    def read_long(self) -> int:
        (v,) = struct.unpack_from(">q", self.data, self.pos)
        self.pos += 8
        return int(v)

    def read_bool(self) -> bool:
        self.pos += 1
        return self.data[self.pos - 1] != 0

    def read_buffer(self) -> bytes:
        n = self.read_int()
        if n < 0:
            return b""
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def read_string(self) -> str:
        return self.read_buffer().decode("utf-8", "replace")

    def skip_acls(self) -> None:
        for _ in range(max(0, self.read_int())):
            self.read_int()  # perms
            self.read_string()  # scheme
            self.read_string()  # id


def znode_kind(path: str, root: str) -> str:
    """``versions/*/*`` for a version znode, ``locks/*/*/*`` for a lock node, ``<root>`` for the namespace."""
    if path == root:
        return "<root>"
    if not path.startswith(root + "/"):
        return "<other>"
    parts = path[len(root) + 1 :].split("/")
    return "/".join([parts[0], *["*"] * (len(parts) - 1)])


def describe_request(frame: bytes, root: str) -> str:
    """``"setData versions/*/*"``, ``"multi[create locks/*/*/*, setData versions/*/*]"``, ``"ping"``..."""
    buf = _Jute(frame)
    buf.read_int()  # xid
    op = buf.read_int()
    name = OPCODES.get(op, f"op{op}")
    try:
        if op == 14:
            return f"multi[{', '.join(_multi_ops(buf, root))}]"
        if op in (11, -11, 100, 101, 105, 107):
            return name
        path = buf.read_string()
        watch = " +watch" if op in _WATCHABLE and buf.read_bool() else ""
        return f"{name}{watch} {znode_kind(path, root)}"
    except (struct.error, IndexError):
        return name


def _multi_ops(buf: _Jute, root: str) -> list[str]:
    ops = []
    for _ in range(1000):
        op = buf.read_int()
        done = buf.read_bool()
        buf.read_int()  # err
        if done:
            break
        path = buf.read_string()
        if op in (1, 15, 19, 21):  # create*: data, acl, flags (+ ttl)
            buf.read_buffer()
            buf.skip_acls()
            buf.read_int()
            if op == 21:
                buf.read_long()
        elif op == 5:  # setData: data, version
            buf.read_buffer()
            buf.read_int()
        elif op in (2, 13):  # delete, check: version
            buf.read_int()
        elif op in (4, 8):  # multiRead's getData / getChildren: watch
            buf.read_bool()
        ops.append(f"{OPCODES.get(op, f'op{op}')} {znode_kind(path, root)}")
    return ops


def describe_reply(frame: bytes, root: str) -> str | None:
    """A watch notification (xid -1) as ``"notify dataChanged versions/*/*"``; None for replies."""
    buf = _Jute(frame)
    if buf.read_int() != -1:
        return None
    buf.read_long()  # zxid
    buf.read_int()  # err
    event = buf.read_int()
    buf.read_int()  # state
    return f"notify {_EVENTS.get(event, str(event))} {znode_kind(buf.read_string(), root)}"


class RequestCensus(TcpProxy):
    """A proxy to ZooKeeper that counts what it forwards, by request kind (:func:`describe_request`).

    Frames are length-prefixed; the first frame each way is the session
    handshake (no header) and is not counted.
    """

    def __init__(self, target_host: str, target_port: int, root: str) -> None:
        super().__init__(target_host, target_port, observe=self._observe)
        self.root = root
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._buffers: dict[tuple[int, bool], bytes] = {}  # unparsed bytes per connection and direction
        self._past_handshake: set[tuple[int, bool]] = set()

    def snapshot(self) -> Counter[str]:
        """A copy of the counts so far."""
        with self._lock:
            return Counter(self._counts)

    def _observe(self, connection: int, to_target: bool, data: bytes) -> None:
        key = (connection, to_target)
        buf = self._buffers.get(key, b"") + data
        describe: Callable[[bytes, str], str | None] = describe_request if to_target else describe_reply
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">i", buf)
            if len(buf) < 4 + length:
                break
            frame, buf = buf[4 : 4 + length], buf[4 + length :]
            if key not in self._past_handshake:
                self._past_handshake.add(key)
                continue
            what = describe(frame, self.root)
            if what is not None:
                with self._lock:
                    self._counts[what] += 1
        self._buffers[key] = buf
