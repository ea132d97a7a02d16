"""Which key watches this sidecar may hold in ZooKeeper, and their removal.

A key's one-shot watch stays in ZooKeeper until the key changes or the
connection ends.  Left alone, every key ever read (absent keys, evicted
entries, fills that installed nothing) keeps one, and ZooKeeper's memory
grows with the keyspace read instead of with the cache (issue #11).  So the
cache tells us when a key is *vacated* (no entry and no fill in flight) and
its watch is removed (``removeWatches``).

Invariant: a removal never takes away a watch that an entry or a fill
needs.  A removal goes out only for a key with no arm (``exists`` with a
watch, or ``setWatches``) in flight; an arm cancels the key's removal if it
is still queued; once a removal is sent, every later arm of the key goes out
after it on the same connection (kazoo's queue is FIFO).

The ledger over-approximates, on purpose: a key may be listed without a
watch in the server (its removal then answers NoWatcher, harmlessly), never
the other way round.  Two orders need care, because kazoo delivers replies
and watch events on two different threads:

* an event arriving while an arm of the same key is in flight: the server
  may have armed the new watch after firing the old one, so the key stays
  listed;
* an arm's reply overtaking, on the way to the loop, an event the server
  sent before it: an arm counts as ended only once kazoo's event thread has
  passed every event read before its reply (a barrier queued behind them),
  so such an event still finds the arm in flight.

An arm counts as ended when kazoo has its reply, not when the caller stops
waiting (a timeout), and a vacated key with an arm in flight is removed when
the arm ends.  Removals are sent from a queue, at most ``window`` in flight
and only while connected: an invalidate-all of 100,000 entries must neither
block the loop on kazoo's wake-up socket nor flood ZooKeeper.  Every method
runs on the event loop.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.exceptions import NoWatcherError
from kazoo.protocol.states import Callback

from .. import bridge
from .kazoo_watches import check_kazoo, remove_watch_async
from .session import ZkSession, ZkState

__all__ = ["KeyWatches"]

log = logging.getLogger(__name__)


def _once(fn: Callable[[], None]) -> Callable[[Any], None]:
    """A kazoo ``rawlink`` callback that runs ``fn`` only the first time.

    kazoo 2.11 runs *every* callback of a completed result again whenever
    another one is linked to it (``AsyncResult.rawlink``), and the bridge
    links one after us: without this an arm could end twice.  Callbacks run
    on kazoo's single completion thread, so a plain flag is enough.
    """
    done = False

    def run(_: Any) -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return run


class KeyWatches:
    """The keys whose version znode this sidecar may watch; removes the watches of vacated keys."""

    def __init__(
        self, zk: ZkSession, path_of: Callable[[str], str], watcher: Callable[[Any], None], *, window: int = 64
    ) -> None:
        check_kazoo(zk.client)  # at startup, loudly, rather than at the first removal
        self._zk = zk
        self._path_of = path_of
        self._watcher = watcher  # the one function every key watch is registered with
        self._window = window
        self._listed: set[str] = set()
        self._arming: Counter[str] = Counter()  # arms not yet ended, per key
        self._deferred: set[str] = set()  # vacated while an arm was in flight
        self._queue: dict[str, None] = {}  # removals not sent yet, oldest first
        self._in_flight = 0
        self.removals = 0  # removeWatches requests sent (metrics)

    def __len__(self) -> int:
        return len(self._listed) + len(self._queue)

    def __contains__(self, key: str) -> bool:
        return key in self._listed

    # -- arms ---------------------------------------------------------------
    def arming(self, keys: Iterable[str], result: Any) -> None:
        """A request that arms the watch of each of ``keys`` was just queued in kazoo as ``result``.

        Call it right after creating the kazoo request, before anything
        else runs on the loop.
        """
        keys = list(keys)
        for key in keys:
            self._listed.add(key)
            self._arming[key] += 1
            self._deferred.discard(key)  # whoever arms now reports the key again when done
            self._queue.pop(key, None)  # a removal not sent yet would go out after this arm
        loop, handler = self._zk.loop, self._zk.client.handler

        def replied() -> None:
            # kazoo's completion thread. Events the server sent before this
            # reply are already on the event thread's queue: go behind them.
            handler.dispatch_callback(Callback("armed", bridge.post, (loop, self._armed, keys)))

        result.rawlink(_once(replied))

    def _armed(self, keys: list[str]) -> None:
        for key in keys:
            n = self._arming[key] - 1
            if n > 0:
                self._arming[key] = n
                continue
            del self._arming[key]
            if key in self._deferred:
                self._deferred.discard(key)
                self.vacated(key)

    def fired(self, key: str) -> None:
        """The key's watch fired: ZooKeeper holds none now, unless an arm in flight set a new one."""
        if not self._arming[key]:
            self._listed.discard(key)

    # -- connection -----------------------------------------------------------
    def connection_lost(self) -> None:
        """The server dropped every watch with the connection; arms still queued may land on the next one."""
        self._listed = {key for key in self._listed if self._arming[key]}
        self._queue.clear()

    def connected(self) -> None:
        """Connected again: send what was vacated meanwhile."""
        self._pump()

    # -- removal ------------------------------------------------------------
    def vacated(self, key: str) -> None:
        """The cache holds no entry and no fill for ``key``: remove its watch if we may hold one."""
        if key not in self._listed:
            return
        if self._arming[key]:
            self._deferred.add(key)  # removed when that arm ends, unless someone arms the key again
            return
        self._listed.discard(key)
        self._queue[key] = None
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._in_flight < self._window and self._zk.state is ZkState.CONNECTED:
            key = next(iter(self._queue))
            del self._queue[key]
            try:
                result = remove_watch_async(self._zk.client, self._path_of(key), watcher=self._watcher)
            except Exception as exc:  # the client is closed: its watches are gone with it
                log.debug("removing the watch of %r: %s", key, exc)
                continue
            self._in_flight += 1
            self.removals += 1
            result.rawlink(_once(functools.partial(bridge.post, self._zk.loop, self._removed, result)))

    def _removed(self, result: Any) -> None:
        self._in_flight -= 1
        try:
            result.get_nowait()
        except NoWatcherError:
            pass  # it fired, or went with a connection, meanwhile
        except Exception as exc:  # connection trouble: the server drops the watch with the connection
            log.debug("removeWatches failed: %s", exc)
        self._pump()
