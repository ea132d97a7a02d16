"""Which key watches this sidecar may hold in ZooKeeper, and their removal.

A key's one-shot watch stays in ZooKeeper until the key changes or the
connection ends.  Left alone, every key ever read (absent keys, evicted
entries, fills that installed nothing) keeps one, and ZooKeeper's memory
grows with the keyspace read instead of with the cache (issue #11).  So the
cache tells us when a key is *vacated* (no entry and no fill in flight) and
its watch is removed (``removeWatches``).

The ledger over-approximates, on purpose: a key may be listed without a
watch in the server (a removal then answers NoWatcher, harmlessly), never
the other way round.  The one subtle case is an event racing an arm of the
same key: when the event arrives while an ``exists`` with a watch is in
flight, the server may have armed that new watch after firing the old one,
so the key stays listed.  Every method runs on the event loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.exceptions import NoWatcherError

from .kazoo_watches import check_kazoo, remove_watch_async
from .session import ZkSession

__all__ = ["KeyWatches"]

log = logging.getLogger(__name__)


class KeyWatches:
    """The keys whose version znode this sidecar may watch; removes the watches of vacated keys."""

    def __init__(self, zk: ZkSession, path_of: Callable[[str], str], watcher: Callable[[Any], None]) -> None:
        check_kazoo(zk.client)  # at startup, loudly, rather than at the first removal
        self._zk = zk
        self._path_of = path_of
        self._watcher = watcher  # the one function every key watch is registered with
        self._listed: set[str] = set()
        self._arming: Counter[str] = Counter()  # exists-with-watch calls in flight, per key
        self.removals = 0  # removeWatches requests sent (metrics)

    def __len__(self) -> int:
        return len(self._listed)

    def __contains__(self, key: str) -> bool:
        return key in self._listed

    def arming(self, keys: Iterable[str]) -> None:
        """An ``exists`` with a watch on each of ``keys`` is about to be sent."""
        for key in keys:
            self._listed.add(key)
            self._arming[key] += 1

    def armed(self, keys: Iterable[str]) -> None:
        """Those calls ended (answered, failed or cancelled)."""
        for key in keys:
            n = self._arming[key] - 1
            if n > 0:
                self._arming[key] = n
            else:
                del self._arming[key]

    def fired(self, key: str) -> None:
        """The key's watch fired: ZooKeeper holds none now, unless an arm in flight set a new one."""
        if not self._arming[key]:
            self._listed.discard(key)

    def connection_lost(self) -> None:
        """The server dropped every watch with the connection; arms still queued may land on the next one."""
        self._listed = {key for key in self._listed if self._arming[key]}

    def vacated(self, key: str) -> None:
        """The cache holds no entry and no fill for ``key``: remove its watch if we may hold one.

        Sent at once (pipelined, not awaited): any later arm of the key goes
        out after it on the same connection, so it can never remove a watch
        set for a fill that starts after this call.
        """
        if key not in self._listed or self._arming[key]:
            return  # nothing held, or an arm in flight belongs to someone (over-approximate: keep)
        self._listed.discard(key)
        self.removals += 1
        try:
            result = remove_watch_async(self._zk.client, self._path_of(key), watcher=self._watcher)
        except Exception as exc:  # the client is closed: its watches are gone with it
            log.debug("removing the watch of %r: %s", key, exc)
            return
        result.rawlink(_log_failure)


def _log_failure(result: Any) -> None:
    # kazoo's thread. NoWatcher: it fired or went with a connection meanwhile.
    try:
        result.get_nowait()
    except NoWatcherError:
        pass
    except Exception as exc:  # connection trouble: the server drops the watch with the connection
        log.debug("removeWatches failed: %s", exc)
