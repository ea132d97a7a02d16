"""A model-based test of coherence: three real sidecars, a real ZooKeeper, one SQLite origin.

Hypothesis drives a :class:`~hypothesis.stateful.RuleBasedStateMachine`
against a real cluster (``tests/model_support.py``): one ZooKeeper, three
``cache-sidecar`` processes that each reach it through their own
:class:`~harness.TcpProxy`, and one SQLite file they share as the
origin.  No mocks.  The cluster is started once per test function; every
example uses keys of its own (a fresh key prefix) and ends with every link
healed and every sidecar ready (:meth:`CoherenceModel.teardown`).

Sidecar settings: a 4 s session, ``suspended_grace = 1s`` (a cut-off
sidecar may serve what it cached for one second after its first loss of
watches that no completed revalidation repaired, then reads the origin),
``lock_timeout = 8s`` (a write through a cut-off sidecar waits that long
for a connection: if the link heals meanwhile, a write its client gave up on
would land unless dropped), and fills allowed over the read-through origin.

**Rules** (keys ``u/a``, ``u/b``, ``o/a``, ``o/c`` under the example's
prefix, so the prefixes ``u/``, ``o/`` and the example's own prefix cover
two or all of them; ``o/c`` is used cache-aside only; the origin starts with
a row for each key, and an example may start with every cache warm):

* ``write``: PUT, PUT with ``If-Match`` (the model's version of the key, or a
  stale one), PUT with ``If-None-Match: *``, DELETE, through any sidecar;
* ``outside_write_and_invalidate``: another application writes (or deletes)
  the row in SQLite, then invalidates the key, a covering prefix or
  everything through any sidecar, with ``?wait=true`` or without, and
  maybe reads it back strongly on every sidecar right after the answer;
* ``take_lease`` / ``fill``: ``GET ?fill=true`` hands out a lease on a miss;
  the application reads the origin right then, and later installs exactly
  that value with ``PUT ?fill=true`` and ``If-Match: "<lease>"``;
  ``stale_set_race`` does lease, another application's update and
  acknowledged invalidation, maybe a restart of the leasing sidecar, and the
  fill, in that order;
* ``read``: eventual or strong, on one sidecar or on all three at once;
* ``cut_link`` (once per example), ``heal_link`` (optionally only after
  ZooKeeper expired the session), ``heal_then_cut_again`` (a second cut while
  the sidecar is reconnecting and revalidating), ``restart_sidecar`` (once
  per example: processes are slow to start); an
  example may also run with one slow link throughout (latency on every
  packet: its sidecar hears of changes late);
  ``second_loss_during_revalidation`` (instead of ``cut_link``): a cached
  key, a cut, an update and invalidation elsewhere, a slow heal cut again
  while the sidecar revalidates, and a read just after the first cut's grace;
  ``write_during_restore`` (instead of ``cut_link``): a cut (maybe past the
  session), an update elsewhere, and a PUT through the sidecar while it
  restores its watches on a slow link, which must be accepted;
* ``concurrent_wait_invalidations`` (4 to 6 clients sending ``?wait=true``
  invalidations back to back, at once, every link up and fast),
  ``write_racing_invalidation``, ``write_racing_strong_read``,
  ``invalidation_then_strong_read`` (a strong read on a sidecar whose slow
  link has not told it of the invalidation answered just before).

**The model** knows the origin exactly (every write goes through the test),
every value ever written per key, the key's current version when it can be
known, and per sidecar and key how fresh an eventual read must be:

* ``EXACT``: the sidecar serves the origin's value now: no sidecar has read
  the key yet, or this sidecar acknowledged its last write, or an
  acknowledged ``?wait=true`` invalidation (200) covered the key since the
  origin last changed;
* ``CONVERGE``: a write through a sidecar or an invalidation without
  confirmation (202, or 504 while a link is cut) covered the key: the
  sidecar serves the origin's value within ``CONVERGE_SECONDS`` (the
  propagation window, re-read until then); the writer itself at once;
* ``ANY``: the origin changed behind the sidecars' backs and no invalidation
  followed yet, or the sidecar accepted a fill of a value the origin no
  longer has: any value ever written.

What every answer is checked against:

* no read returns a value that was never written to the key;
* a sidecar that is not ready (its link cut) serves the origin's value on
  strong reads, and on eventual reads too once ``GRACE`` has passed since
  its first loss of watches not repaired by a completed revalidation (the
  model counts from when the cut was seen, and from a second cut only if
  the sidecar's stats show a revalidation or new session since the heal);
* a strong read returns the origin's value once every origin change of the
  key was followed by an acknowledged (200 or 202) write or invalidation of
  any kind covering it; racing a write, the value before or after it;
* a fill under a lease taken before an acknowledged covering invalidation
  (``?wait=true``, 200: key, prefix or all), a published key invalidation
  (202, 504: the key's version moved), or an acknowledged write of the key,
  is refused with 412;
* a write through a cut-off sidecar waits for a connection; its client gives
  up after ``WRITE_GIVE_UP_SECONDS``, and that write must never land, also
  once the sidecar reconnects (checked after the heal and at teardown);
* concurrent ``?wait=true`` invalidations all answer 200 while every link is
  up; one answers 504 only while a link is cut;
* an acknowledged write is in the origin; a refused one (412) or one through
  a cut-off sidecar (503) changed nothing; conditional writes answer 200 or
  412 exactly as the model's version and origin say.

Profiles: ``ZKCACHE_MODEL_PROFILE=ci`` (default: 6 programs of up to 25
steps, about 70 s here; CI's whole run has 15 minutes) or ``soak`` (200
programs).

Reading a failure: Hypothesis prints the shrunk program (shrinking is capped,
so it may keep a few steps that do not matter), and every failed check
carries the example's trail as a note: its rules and every HTTP exchange
with its answer.  A failure that depends on a race inside a sidecar may not
reproduce when Hypothesis replays it; it is then reported as flaky, with the
original error and its trail, which is still a genuine violation.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from harness import LocalZooKeeper, TcpProxy
from sidecar.config import Config
from sidecar.origins.sqlite import sqlite_path
from tests.conftest import SidecarFactory
from tests.model_support import Cluster, Reply, wait_until

pytestmark = pytest.mark.slow

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# -- profiles -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Profile:
    settings: settings
    timeout: int  # pytest-timeout for the whole test, seconds
    shrink_seconds: int  # cap on Hypothesis's shrinking (its default is 300 s)


_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]
settings.register_profile(
    "zkcache-model-ci",
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "zkcache-model-soak",
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
_PROFILES = {
    # Shrinking re-runs programs against real processes; capped so that a
    # failure is reported (shrunk as far as it got) within the test timeout.
    "ci": _Profile(settings.get_profile("zkcache-model-ci"), timeout=300, shrink_seconds=120),
    "soak": _Profile(settings.get_profile("zkcache-model-soak"), timeout=3600, shrink_seconds=600),
}
PROFILE = _PROFILES[os.environ.get("ZKCACHE_MODEL_PROFILE", "ci")]

# -- the model's vocabulary -----------------------------------------------

N = 3  # sidecars
# "o/c" is used cache-aside only (leases, fills, origin writes, invalidations):
# no read-through read caches it, so a lease GET on it is a miss unless a
# fill of it was accepted there.  The others are also read and written through.
KEYS = ("u/a", "u/b", "o/a", "o/c")
READ_THROUGH = ("u/a", "u/b", "o/a")
CONVERGE_SECONDS = 2.0  # propagation window allowed after a write or an unconfirmed invalidation
# A write through a cut-off sidecar waits for a connection (lock_timeout, 8 s);
# its client gives up sooner, and the write must then never land (write-abandoned).
WRITE_GIVE_UP_SECONDS = 0.3
GAVE_UP = 599  # the status the model records when its client gave up
WAIT_TIMEOUT = 10  # ?wait=true timeout while every link is up: confirmations take milliseconds
WAIT_TIMEOUT_CUT = 0.5  # ... while one is cut: it answers 504 (or 200 once the session expired)
# Added per chunk, each way, on a slow link: well above a client's reaction
# time (a few ms), so its sidecar reliably hears of changes after the client.
SLOW_LINK_LATENCY = 0.02
# suspended_grace of every sidecar: a cut-off sidecar may serve what it has
# cached for this long after its first loss of watches that no completed
# revalidation has repaired, and must read the origin after that.
GRACE = 1.0
# Latency on a link while its sidecar sets its session up again in
# `second_loss_during_revalidation`: each round trip then takes 2 * this, so
# the second cut reliably lands after the handshake and before revalidation ends.
SETUP_LATENCY = 0.15
CONCURRENT_WAIT_TIMEOUT = 5
CONCURRENT_REPEATS = 12
TRAIL_LINES = 60  # of the example's trail attached to a failure
# The expensive steps, per example: a heal waits for kazoo's reconnect backoff
# (up to a second; heal_then_cut_again adds second cuts), a restart for a new
# process (about 0.6 s; stale_set_race may restart too).
CUTS_PER_EXAMPLE = 1
RESTARTS_PER_EXAMPLE = 1

sidecar_ids = st.integers(0, N - 1)
keys = st.sampled_from(KEYS)
rt_keys = st.sampled_from(READ_THROUGH)
# group: "u/" or "o/"; example: every key of the example; all: everything; key: the key itself.
# (Hypothesis favours the first option of a sampled_from, and shrinks towards it:
# the options that exercise the most protocol come first, here and below.)
scopes = st.sampled_from(["group", "example", "all", "key"])

_examples = itertools.count(1)


class Fresh(enum.IntEnum):
    """How fresh an eventual read of a key on a sidecar must be (stricter is larger)."""

    ANY = 0  # any value ever written
    CONVERGE = 1  # the origin's value within CONVERGE_SECONDS
    EXACT = 2  # the origin's value now


@dataclasses.dataclass(eq=False)
class Lease:
    """A cache-aside lease, and the value the application read from its store right after getting it.

    ``take_lease`` always yields one, with ``lease=None`` when there was
    nothing to fill (a hit, or no row in the store): whether a GET hits
    depends on timing, and Hypothesis needs the bundle's contents to depend
    only on the program.
    """

    sidecar: int
    key: str  # the model's key name (without the example prefix)
    lease: int | None = None
    value: bytes = b""
    refuse_because: str | None = None  # set when a fill under it must be refused

    def __repr__(self) -> str:
        return f"Lease(sidecar={self.sidecar}, key={self.key!r}, lease={self.lease})"


def _sidecar_settings() -> dict[str, str]:
    """What every sidecar of the model runs with (see the module docstring)."""
    chosen = {
        "zk_session_timeout": "4s",
        "suspended_grace": f"{GRACE:g}s",
        "suspended_reads": "origin",
        "lock_timeout": "8s",
        "shutdown_timeout": "5s",
        "log_level": "info",
    }
    # Fills over a read-through origin became opt-in; older daemons allow them
    # without the setting (and would refuse an unknown one).
    if "fills" in {f.name for f in dataclasses.fields(Config)}:
        chosen["fills"] = "allow"
    return chosen


# -- the state machine ----------------------------------------------------


def step(rule_function: F) -> F:
    """Record a rule in the example's trail; a failing check gets the trail as a note.

    Hypothesis prints the shrunk program of a failure it can reproduce.  A
    race that does not reproduce is reported as flaky with only the original
    error: the trail (rules and HTTP exchanges so far) is then what shows how
    the example got there.
    """

    @functools.wraps(rule_function)
    def run(self: CoherenceModel, **kwargs: Any) -> Any:
        self.trail.append(f"{rule_function.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        try:
            return rule_function(self, **kwargs)
        except AssertionError as exc:
            if not getattr(exc, "__notes__", None):  # once, by the outermost rule
                trail = "\n  ".join(self.trail[-TRAIL_LINES:])
                exc.add_note(f"example {self.prefix} so far (newest last):\n  {trail}")
            raise

    return cast(F, run)


class CoherenceModel(RuleBasedStateMachine):
    """Rules drive the cluster; the model says what each answer may be (module docstring)."""

    leases = Bundle("leases")

    def __init__(self, cluster: Cluster) -> None:
        super().__init__()
        self.cluster = cluster
        self.prefix = f"m{next(_examples)}/"  # this example's keys (the namespace is the test's own)
        self.origin: dict[str, bytes | None] = dict.fromkeys(KEYS)
        self.history: dict[str, set[bytes | None]] = {k: {None} for k in KEYS}
        # Fresh keys: no sidecar has read them, so every read goes to the origin.
        self.fresh: dict[tuple[int, str], Fresh] = {(i, k): Fresh.EXACT for i in range(N) for k in KEYS}
        self.strong_exact: dict[str, bool] = dict.fromkeys(KEYS, True)
        self.version: dict[str, int | None] = dict.fromkeys(KEYS, 0)  # 0: never written
        self.open_leases: list[Lease] = []
        self.cut: int | None = None  # the sidecar whose link is cut (at most one)
        # Writes whose client gave up while their sidecar was cut off: none may ever land.
        self.abandoned: list[tuple[str, bytes | None]] = []
        # Per sidecar: the latest time at which its first loss of watches not
        # yet repaired (by a completed revalidation) can have happened; it
        # may serve cached entries until GRACE after that (see `check_eventual`).
        self.lost_watches_at: dict[int, float | None] = dict.fromkeys(range(N))
        self.cuts = self.restarts = 0  # rules that may run only so often (see CUTS_PER_EXAMPLE)
        self.slow: int | None = None  # the sidecar whose link has added latency
        self._values = itertools.count(1)
        self.trail: list[str] = []  # rules and HTTP exchanges of this example (see `step`)

    # -- helpers --------------------------------------------------------------
    def key(self, k: str) -> str:
        return self.prefix + k

    def call(self, i: int, method: str, path: str, **kw: Any) -> Reply:
        """A request to sidecar ``i``, logged in the trail (from any thread); 599 if the client gave up."""
        try:
            reply = self.cluster.call(i, method, path, **kw)
        except TimeoutError:
            reply = Reply(GAVE_UP, {}, b"(the client gave up waiting)", time.monotonic())
        shown = path.replace(self.prefix, "")
        body = kw.get("body")
        sent = f" {body.decode(errors='replace')}" if body and method == "POST" else ""
        self.trail.append(f"  sidecar {i}: {method} {shown}{sent} -> {reply!r}")
        return reply

    def heal(self, i: int) -> None:
        """Heal sidecar ``i``'s link; a slow link stays slow (the proxy's heal removes latency too)."""
        self.cluster.heal(i)
        if self.slow == i:
            self.cluster.slow(i, SLOW_LINK_LATENCY)

    def ready(self, i: int) -> bool:
        """The model's view: a sidecar is ready unless its link is cut (heals wait for readiness)."""
        return i != self.cut

    def new_value(self, k: str, source: str) -> bytes:
        """A value never written before; remembered as written before it is sent."""
        value = f"{k}#{next(self._values)}@{source}".encode()
        self.history[k].add(value)
        return value

    def scope(self, scope: str, k: str) -> tuple[dict[str, Any], set[str]]:
        """The invalidation body for ``scope`` around key ``k``, and the model keys it covers."""
        if scope == "key":
            return {"keys": [self.key(k)]}, {k}
        if scope == "group":
            group = k.split("/")[0] + "/"
            return {"prefixes": [self.prefix + group]}, {kk for kk in KEYS if kk.startswith(group)}
        if scope == "example":
            return {"prefixes": [self.prefix]}, set(KEYS)
        return {"all": True}, set(KEYS)

    def wait_path(self, wait: bool, timeout: float | None = None) -> str:
        if not wait:
            return "/v1/invalidate"
        if timeout is None:
            timeout = WAIT_TIMEOUT if self.cut is None else WAIT_TIMEOUT_CUT
        return f"/v1/invalidate?wait=true&timeout={timeout:g}"

    def expected_invalidation(self, via: int, wait: bool) -> set[int]:
        if not self.ready(via):
            return {503}
        if not wait:
            return {202}
        # With a link cut, the cut sidecar cannot confirm (504) unless ZooKeeper
        # already expired its session (200: it is no longer a member).
        return {200} if self.cut is None else {200, 504}

    def parallel(self, calls: list[Callable[[], T]]) -> list[T]:
        """Run ``calls`` in threads released together; every result within a bound."""
        barrier = threading.Barrier(len(calls))

        def run(call: Callable[[], T]) -> T:
            barrier.wait(10)
            return call()

        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(run, call) for call in calls]
            return [f.result(timeout=60) for f in futures]

    def invalidate_call(self, via: int, body: dict[str, Any], path: str) -> Callable[[], Reply]:
        return lambda: self.call(via, "POST", path, body=json.dumps(body).encode())

    def write_timeout(self, i: int) -> float:
        """A cut-off sidecar's write waits for a connection (lock_timeout): its client gives up first."""
        return 30.0 if self.ready(i) else WRITE_GIVE_UP_SECONDS

    def refused_or_abandoned(self, i: int, k: str, value: bytes | None, reply: Reply) -> None:
        """A write that did not answer 200: the origin is unchanged, and stays so if its client gave up."""
        stored = self.cluster.origin_get(self.key(k))
        assert stored == self.origin[k], f"a write refused through sidecar {i} ({reply!r}) changed the origin"
        if reply.status == GAVE_UP:
            self.abandoned.append((k, value))

    def check_abandoned(self) -> None:
        """Writes given up by their clients must never land, also once their sidecar reconnected."""
        for k, value in self.abandoned:
            stored = self.cluster.origin_get(self.key(k))
            assert stored == self.origin[k], (
                f"a write of {value!r} to {k!r}, given up by its client while its sidecar was cut off, "
                f"landed later: the origin has {stored!r}, the model {self.origin[k]!r}"
            )
        self.abandoned.clear()

    def put_call(self, i: int, k: str, value: bytes) -> Callable[[], Reply]:
        headers = {"Content-Type": "text/plain"}
        path, timeout = f"/v1/keys/{self.key(k)}", self.write_timeout(i)
        return lambda: self.call(i, "PUT", path, body=value, headers=headers, timeout=timeout)

    def get_call(self, i: int, k: str, strong: bool) -> Callable[[], Reply]:
        path = f"/v1/keys/{self.key(k)}" + ("?consistency=strong" if strong else "")
        return lambda: self.call(i, "GET", path)

    # -- model updates ----------------------------------------------------------
    def origin_changed_outside(self, k: str, value: bytes | None) -> None:
        """Another application wrote the origin: until an invalidation, anything goes."""
        self.origin[k] = value
        self.history[k].add(value)
        self.strong_exact[k] = False
        for i in range(N):
            self.fresh[i, k] = Fresh.ANY

    def write_acknowledged(self, k: str, value: bytes | None, writer: int, version: int | None) -> None:
        stored = self.cluster.origin_get(self.key(k))
        assert stored == value, f"sidecar {writer} acknowledged writing {value!r} to {k!r}; the origin has {stored!r}"
        self.origin[k] = value
        self.strong_exact[k] = True
        self.version[k] = version
        for i in range(N):
            # The writer drops its entry before acknowledging; the others are
            # told by their watch, within the propagation window.
            self.fresh[i, k] = Fresh.EXACT if i == writer else Fresh.CONVERGE
        self.refuse_leases({k}, f"the write of {k!r} acknowledged by sidecar {writer}")

    def refuse_leases(self, covered: set[str], because: str) -> None:
        for lease in self.open_leases:
            if lease.key in covered and lease.refuse_because is None:
                lease.refuse_because = because

    def invalidated(self, scope: str, k: str, covered: set[str], reply: Reply) -> None:
        """Apply an invalidation's outcome (200, 202, 504 or 503) to the model."""
        status = reply.status
        what = f"{scope} invalidation around {k!r} ({status})"
        if status in (200, 202, 504):  # published
            for kk in covered:
                for i in range(N):
                    if status == 200:
                        self.fresh[i, kk] = Fresh.EXACT
                    else:  # applied as watches fire; a cut sidecar revalidates before it is ready again
                        self.fresh[i, kk] = max(self.fresh[i, kk], Fresh.CONVERGE)
                if status != 504:
                    self.strong_exact[kk] = True
            if status == 200:
                self.refuse_leases(covered, f"the acknowledged {what}")
            elif scope == "key":
                self.refuse_leases(covered, f"the {what}, which moved the key's version")
        if scope == "key":
            receipt = reply.json() if status in (200, 202) else None
            if receipt is None:
                self.version[k] = None  # 504, or 503 maybe midway: unknown
            else:
                bumped = int(receipt["keys"][self.key(k)])
                known = self.version[k]
                self.version[k] = bumped if known is None else max(known, bumped)

    # -- checks -------------------------------------------------------------
    def value_of(self, i: int, k: str, reply: Reply, what: str) -> bytes | None:
        assert reply.status in (200, 404), f"{what} of {k!r} on sidecar {i}: unexpected answer {reply!r}"
        value = reply.body if reply.status == 200 else None
        assert value in self.history[k], f"{what} of {k!r} on sidecar {i} returned {value!r}, never written"
        return value

    def check_eventual(self, i: int, k: str, reply: Reply) -> None:
        value = self.value_of(i, k, reply, "eventual read")
        expected = self.origin[k]
        if not self.ready(i):
            lost = self.lost_watches_at[i]
            assert lost is not None, f"sidecar {i} is cut off, but the model has no time for its loss"
            if reply.sent <= lost + GRACE:
                return  # within the grace: whatever it had cached (any value ever written)
            assert value == expected, (
                f"sidecar {i} is cut off and its grace ({GRACE:g}s) ran out {reply.sent - lost - GRACE:.3f}s before "
                f"this read (counted from its first loss of watches not repaired since), but it served {value!r} "
                f"for {k!r}; the origin has {expected!r} ({reply!r})"
            )
            return
        state = self.fresh[i, k]
        if value == expected or state is Fresh.ANY:
            return
        assert state is Fresh.CONVERGE, (
            f"eventual read of {k!r} on sidecar {i} returned {value!r}; the origin has {expected!r}, and nothing "
            f"allows this sidecar a stale value (an acknowledged ?wait=true invalidation covered the key since the "
            f"origin last changed, or this sidecar wrote it, or nobody had read it) ({reply!r})"
        )
        deadline = time.monotonic() + CONVERGE_SECONDS
        rereads = 0
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.02)
            reply = self.cluster.call(i, "GET", f"/v1/keys/{self.key(k)}")  # not logged one by one
            value = self.value_of(i, k, reply, "eventual read")
            rereads += 1
        self.trail.append(f"  sidecar {i}: {rereads} re-reads of {k} until {reply!r}")
        assert value == expected, (
            f"sidecar {i} still serves {value!r} for {k!r} {CONVERGE_SECONDS:g}s after an acknowledged write or "
            f"invalidation; the origin has {expected!r} ({reply!r})"
        )

    def check_strong(self, i: int, k: str, reply: Reply, allowed: set[bytes | None] | None = None) -> None:
        if not self.ready(i) and reply.status == 503:
            return  # allowed for a sidecar without ZooKeeper
        value = self.value_of(i, k, reply, "strong read")
        if allowed is None:
            allowed = {self.origin[k]}
        if self.ready(i) and not self.strong_exact[k]:
            return  # the origin changed and nobody was told yet
        assert value in allowed, (
            f"strong read of {k!r} on sidecar {i} returned {value!r}; expected one of {allowed!r} (no older than "
            f"the newest acknowledged write or invalidation) ({reply!r})"
        )

    # -- rules ----------------------------------------------------------------
    @initialize(slow=st.sampled_from([*range(N), None, None]), warm=st.sampled_from([True, False]))
    @step
    def start(self, slow: int | None, warm: bool) -> None:
        """Every sidecar ready (the previous teardown saw to it), the origin seeded, maybe a slow link.

        A slow link (for the whole example) is what makes late watch events
        observable: its sidecar hears of an invalidation tens of milliseconds
        after the publisher answered, long enough for a client's next request
        to arrive first.  ``warm``: every sidecar reads every key first, so
        that there are cached values to go stale.
        """
        for i in range(N):
            assert self.cluster.ready(i), f"sidecar {i} not ready at the start of an example"
        if slow is not None:
            self.cluster.slow(slow, SLOW_LINK_LATENCY)
            self.slow = slow
        # Rows exist before any sidecar looks (no sidecar has seen these keys,
        # so nothing needs invalidating): reads and leases have values to serve.
        for k in KEYS:
            value = self.new_value(k, "seed")
            self.cluster.origin_set(self.key(k), value)
            self.origin[k] = value
        if warm:
            for k in READ_THROUGH:
                replies = self.parallel([self.get_call(i, k, strong=False) for i in range(N)])
                for i, reply in enumerate(replies):
                    self.check_eventual(i, k, reply)

    @rule(
        i=sidecar_ids,
        k=rt_keys,
        mode=st.sampled_from(["put", "put_if_match", "put_if_stale", "put_if_none_match", "delete"]),
    )
    @step
    def write(self, i: int, k: str, mode: str) -> None:
        """A write through sidecar ``i``; conditional ones must answer exactly as the model says."""
        headers = {"Content-Type": "text/plain"}
        value: bytes | None = None
        known = self.version[k]
        if mode == "delete":
            method, ok = "DELETE", 204
        else:
            method, ok = "PUT", 200
            value = self.new_value(k, f"sidecar{i}")
        expected = {ok}
        if mode == "put_if_match" and known is not None:
            headers["If-Match"] = f'"{known}"'
        elif mode in ("put_if_match", "put_if_stale"):
            # Never the current version: that is `known` (when known), and no
            # key of a fresh prefix has ever been at zxid 1.
            headers["If-Match"] = f'"{known - 1}"' if known is not None and known > 1 else '"1"'
            expected = {412}
        elif mode == "put_if_none_match":
            headers["If-None-Match"] = "*"
            expected = {ok} if self.origin[k] is None else {412}
        if not self.ready(i):
            expected = {503, GAVE_UP}
        reply = self.call(
            i, method, f"/v1/keys/{self.key(k)}", body=value, headers=headers, timeout=self.write_timeout(i)
        )
        assert reply.status in expected, f"{mode} of {k!r} through sidecar {i}: expected {expected}, got {reply!r}"
        if reply.status == ok:
            self.write_acknowledged(k, value, i, reply.etag)
        else:
            self.refused_or_abandoned(i, k, value, reply)

    @rule(
        k=keys,
        change=st.sampled_from(["put", "put", "delete", "none"]),  # mostly a new value: what staleness shows
        scope=scopes,
        wait=st.booleans(),
        via=sidecar_ids,
        read_back=st.sampled_from([True, True, False]),  # mostly: it also puts the key back in every cache
    )
    @step
    def outside_write_and_invalidate(
        self, k: str, change: str, scope: str, wait: bool, via: int, read_back: bool
    ) -> None:
        """Another application writes the origin, then invalidates through sidecar ``via``.

        With ``read_back`` (read-through keys) it then reads the key strongly
        on every sidecar at once, as soon as the invalidation is answered
        (with or without ``wait``): the moment at which a sidecar that has not
        applied it yet would still hold the old value.
        """
        if change != "none":
            value = self.new_value(k, "outside") if change == "put" else None
            self.cluster.origin_set(self.key(k), value)
            self.origin_changed_outside(k, value)
        body, covered = self.scope(scope, k)
        expected = self.expected_invalidation(via, wait)
        reply = self.invalidate_call(via, body, self.wait_path(wait))()
        assert reply.status in expected, f"{body} through sidecar {via}: expected {expected}, got {reply!r}"
        self.invalidated(scope, k, covered, reply)
        if read_back and k in READ_THROUGH:
            replies = self.parallel([self.get_call(i, k, strong=True) for i in range(N)])
            for i, read in enumerate(replies):
                self.check_strong(i, k, read)

    @rule(target=leases, i=sidecar_ids, k=keys)
    @step
    def take_lease(self, i: int, k: str) -> Lease:
        """``GET ?fill=true``: a hit, or a lease; on a lease the application reads its store."""
        reply = self.call(i, "GET", f"/v1/keys/{self.key(k)}?fill=true")
        lease = Lease(i, k)
        if not self.ready(i):
            if reply.status == 200:  # a hit within the grace
                self.check_eventual(i, k, reply)
            else:
                assert reply.status == 503, f"a lease from cut-off sidecar {i}: {reply!r}"
            return lease
        if reply.status == 200:
            self.check_eventual(i, k, reply)
            return lease
        assert reply.status == 404 and reply.etag is not None, f"lease for {k!r} on sidecar {i}: {reply!r}"
        app_value = self.cluster.origin_get(self.key(k))
        if app_value is not None:  # else nothing in the store: nothing to fill
            lease.lease, lease.value = reply.etag, app_value
            self.open_leases.append(lease)
        return lease

    @rule(lease=consumes(leases))
    @step
    def fill(self, lease: Lease) -> None:
        """``PUT ?fill=true`` with the value read at lease time."""
        if lease.lease is None:
            return  # the application had a hit, or nothing to fill
        self.open_leases.remove(lease)
        i, k = lease.sidecar, lease.key
        headers = {"If-Match": f'"{lease.lease}"', "Content-Type": "text/plain"}
        reply = self.call(i, "PUT", f"/v1/keys/{self.key(k)}?fill=true", body=lease.value, headers=headers)
        if not self.ready(i):
            assert reply.status == 503, f"a fill on cut-off sidecar {i}: {reply!r}"
            return
        if lease.refuse_because is not None:
            assert reply.status == 412, (
                f"sidecar {i} accepted a fill of {lease.value!r} for {k!r} under lease {lease.lease}, taken before "
                f"{lease.refuse_because} (the origin now has {self.origin[k]!r}): {reply!r}"
            )
            return
        assert reply.status in (200, 412), f"fill of {k!r} on sidecar {i}: {reply!r}"
        if reply.status == 200 and lease.value != self.origin[k]:
            # Allowed (no acknowledged invalidation since the lease), but this
            # sidecar may now serve the older value on eventual reads.
            self.fresh[i, k] = Fresh.ANY

    @rule(i=sidecar_ids, k=keys, scope=scopes, via=sidecar_ids, restart=st.sampled_from([False, True]))
    @step
    def stale_set_race(self, i: int, k: str, scope: str, via: int, restart: bool) -> None:
        """The cache-aside race of the README, in its worst order.

        Application A misses on sidecar ``i`` (a lease) and reads the row;
        application B updates the row and invalidates it (``scope``,
        ``?wait=true``) through sidecar ``via``; A then fills the row it read.
        The fill must be refused once the invalidation was acknowledged, also
        when A's sidecar restarted in between (``restart``): the lease was
        handed out by its previous life.
        """
        lease = self.take_lease(i=i, k=k)
        self.outside_write_and_invalidate(k=k, change="put", scope=scope, wait=True, via=via, read_back=False)
        if restart and self.ready(i):
            self.cluster.restart(i)
        self.fill(lease=lease)

    @precondition(lambda self: self.cut is None)
    @rule(k=rt_keys, scope=scopes, via=sidecar_ids, reader=sidecar_ids)
    @step
    def invalidation_then_strong_read(self, k: str, scope: str, via: int, reader: int) -> None:
        """A strong read that begins as soon as an invalidation was published, on a sidecar not told yet.

        ``reader`` caches ``k``; another application updates ``k`` and
        invalidates it (``scope``, no wait) through ``via``; the application
        then reads ``k`` strongly on ``reader``, whose link is slow for this
        rule, so the invalidation's notification is still on its way (or its
        prefix-log entries are still being read) when the read begins.
        """
        reader = reader if reader != via else (via + 1) % N
        self.read(k=k, where=reader, strong=False)  # cached there now
        if self.slow != reader:
            self.cluster.slow(reader, SLOW_LINK_LATENCY)
        try:
            self.outside_write_and_invalidate(k=k, change="put", scope=scope, wait=False, via=via, read_back=False)
            self.check_strong(reader, k, self.get_call(reader, k, strong=True)())
        finally:
            if self.slow != reader:
                self.cluster.slow(reader, 0.0)

    @rule(k=rt_keys, where=st.sampled_from([None, 0, 1, 2]), strong=st.booleans())
    @step
    def read(self, k: str, where: int | None, strong: bool) -> None:
        """Eventual or strong reads on one sidecar, or on all three at once (``where=None``)."""
        targets = list(range(N)) if where is None else [where]
        replies = self.parallel([self.get_call(i, k, strong) for i in targets])
        for i, reply in zip(targets, replies, strict=True):
            if strong:
                self.check_strong(i, k, reply)
            else:
                self.check_eventual(i, k, reply)

    @precondition(lambda self: self.cut is None and self.cuts < CUTS_PER_EXAMPLE)
    @rule(i=sidecar_ids)
    @step
    def cut_link(self, i: int) -> None:
        """Partition sidecar ``i`` from ZooKeeper (connections reset, new ones refused)."""
        self.cut_off(i)
        self.cuts += 1

    def cut_off(self, i: int, repairs: int | None = None) -> None:
        """Cut sidecar ``i``'s link: a first loss, or (``repairs`` counted before a heal) a second one.

        The sidecar's grace counts from its first loss that no completed
        revalidation (or new session) has repaired: a second cut restarts
        it only if the sidecar finished one since the heal.
        """
        self.cluster.cut(i)  # returns once the sidecar said it is not ready: its loss happened before now
        now = time.monotonic()
        self.cut = i
        if self.lost_watches_at[i] is None or (repairs is not None and self.cluster.repairs(i) > repairs):
            self.lost_watches_at[i] = now

    @precondition(lambda self: self.cut is not None)
    @rule(after_expiry=st.integers(0, 5).map(lambda n: n == 5))  # one in six: it costs a session timeout
    @step
    def heal_link(self, after_expiry: bool) -> None:
        """Heal the cut link (optionally once ZooKeeper expired the session) and wait until ready."""
        i = self.cut
        assert i is not None
        if after_expiry:
            wait_until(
                lambda: not self.cluster.member_alive(i), timeout=15, what=f"ZooKeeper expiring sidecar {i}'s session"
            )
        self.heal(i)
        self.cluster.wait_ready(i)
        self.cut = None
        self.lost_watches_at[i] = None  # ready: watches armed, entries re-checked
        self.check_abandoned()

    @precondition(lambda self: self.cut is not None)
    @rule(pause=st.sampled_from([0.0, 0.002, 0.005, 0.01, 0.03]))
    @step
    def heal_then_cut_again(self, pause: float) -> None:
        """Heal, and cut again ``pause`` seconds after the sidecar reconnected (during its revalidation)."""
        i = self.cut
        assert i is not None
        before, repairs = self.cluster.connections(i), self.cluster.repairs(i)
        self.heal(i)
        wait_until(lambda: self.cluster.connections(i) > before, timeout=5, what=f"sidecar {i} reconnecting")
        time.sleep(pause)
        self.cut_off(i, repairs)

    @precondition(lambda self: self.cut is None and self.cuts < CUTS_PER_EXAMPLE)
    @rule(i=sidecar_ids, k=rt_keys, scope=scopes, via=sidecar_ids)
    @step
    def second_loss_during_revalidation(self, i: int, k: str, scope: str, via: int) -> None:
        """A rolling restart's worst order for sidecar ``i`` (which caches ``k``).

        Its link is cut; another application updates ``k`` and invalidates it
        (``scope``, no wait) through another sidecar; the link comes back
        slow, and is cut again once the sidecar has reconnected but before
        its revalidation ended.  Its grace still counts from the first cut:
        a read just after that runs out must return the origin's value.
        """
        via = via if via != i else (i + 1) % N
        self.read(k=k, where=i, strong=False)  # cached there now
        self.cut_link(i=i)
        self.outside_write_and_invalidate(k=k, change="put", scope=scope, wait=False, via=via, read_back=False)
        repairs = self.cluster.repairs(i)
        self.cluster.heal(i)
        self.cluster.slow(i, SETUP_LATENCY)

        wait_until(
            self.cluster.sidecars[i].setting_up,
            timeout=10,
            interval=0.005,
            what=f"sidecar {i} reconnected and setting up",
        )
        self.cut_off(i, repairs)
        lost = self.lost_watches_at[i]
        assert lost is not None
        self.trail.append(f"  cut again {time.monotonic() - lost:.3f}s into the grace")
        time.sleep(max(0.0, lost + GRACE + 0.05 - time.monotonic()))
        self.read(k=k, where=i, strong=False)

    @precondition(lambda self: self.cut is None and self.cuts < CUTS_PER_EXAMPLE)
    @rule(
        i=sidecar_ids,
        k=rt_keys,
        k2=rt_keys,
        after_expiry=st.integers(0, 5).map(lambda n: n == 5),  # one in six: it costs a session timeout
    )
    @step
    def write_during_restore(self, i: int, k: str, k2: str, after_expiry: bool) -> None:
        """A PUT of ``k`` through sidecar ``i`` while it restores its watches after a cut.

        ``i`` caches ``k`` and ``k2``; its link is cut (maybe until ZooKeeper
        expires its session); ``k2`` is updated elsewhere meanwhile; the link
        comes back slow, and the PUT goes in once ``i`` is connected but not
        ready.  ZooKeeper answers, so the write must be accepted (writes do not
        wait for the restore), and everyone must serve it, ``i`` included
        once ready; ``k2``'s restore must still drop the old value.
        """
        self.read(k=k, where=i, strong=False)
        self.read(k=k2, where=i, strong=False)
        self.cut_link(i=i)
        if k2 != k:
            self.outside_write_and_invalidate(
                k=k2, change="put", scope="key", wait=False, via=(i + 1) % N, read_back=False
            )
        if after_expiry:
            wait_until(
                lambda: not self.cluster.member_alive(i), timeout=15, what=f"ZooKeeper expiring sidecar {i}'s session"
            )
        session = self.cluster.sidecars[i].stats()["zookeeper"]["session"]
        self.cluster.heal(i)
        self.cluster.slow(i, SETUP_LATENCY)
        wait_until(
            lambda: self.cluster.sidecars[i].setting_up(other_than_session=session if after_expiry else None),
            timeout=15,
            interval=0.005,
            what=f"sidecar {i} reconnected and setting up",
        )
        value = self.new_value(k, f"sidecar{i}")
        reply = self.call(i, "PUT", f"/v1/keys/{self.key(k)}", body=value, headers={"Content-Type": "text/plain"})
        assert reply.status == 200, f"PUT of {k!r} through sidecar {i} while it restores its watches: {reply!r}"
        self.write_acknowledged(k, value, i, reply.etag)
        self.heal(i)  # back to the example's own latency
        self.cluster.wait_ready(i)
        self.cut = None
        self.lost_watches_at[i] = None
        for j in range(N):
            self.read(k=k, where=j, strong=False)
        self.read(k=k2, where=i, strong=False)

    @precondition(lambda self: self.cut is None and self.restarts < RESTARTS_PER_EXAMPLE)
    @rule(i=sidecar_ids)
    @step
    def restart_sidecar(self, i: int) -> None:
        """SIGTERM sidecar ``i``, start it again, wait until ready (an empty cache, a new session)."""
        self.cluster.restart(i)
        self.restarts += 1

    @precondition(lambda self: self.cut is None)
    @rule(specs=st.lists(st.tuples(scopes, keys, sidecar_ids), min_size=4, max_size=6))
    @step
    def concurrent_wait_invalidations(self, specs: list[tuple[str, str, int]]) -> None:
        """Several clients each send ``?wait=true`` invalidations back to back: all must be confirmed.

        With every link up, each call answers 200 within its timeout.  Each
        client repeats its call ``CONCURRENT_REPEATS`` times, so that
        confirmations keep overlapping inside the sidecars: whether two of
        them overlap is a matter of microseconds, and a failure Hypothesis
        cannot reproduce is reported as flaky instead of shrunk.
        """
        bodies = [self.scope(scope, k) for scope, k, _ in specs]
        path = self.wait_path(True, CONCURRENT_WAIT_TIMEOUT)

        def client(via: int, body: dict[str, Any]) -> Callable[[], list[Reply]]:
            def run() -> list[Reply]:
                replies = []
                for _ in range(CONCURRENT_REPEATS):
                    replies.append(self.invalidate_call(via, body, path)())
                    if replies[-1].status != 200:
                        break  # the others still finish theirs
                return replies

            return run

        clients = [client(via, body) for (_, _, via), (body, _) in zip(specs, bodies, strict=True)]
        if self.slow is not None:
            # Each confirmation costs a slow link several delayed round trips:
            # the repeats would take seconds.  Fast for the burst only.
            self.cluster.slow(self.slow, 0.0)
        try:
            answers = self.parallel(clients)
        finally:
            if self.slow is not None:
                self.cluster.slow(self.slow, SLOW_LINK_LATENCY)
        failed = [(n, r) for n, replies in enumerate(answers) for r in replies if r.status != 200]
        assert not failed, (
            f"{len(specs)} clients sending ?wait=true invalidations at once, every sidecar connected: "
            f"{len(failed)} answered otherwise, e.g. client {failed[0][0]}: {failed[0][1]!r}"
        )
        for (scope, k, _), (_, covered), replies in zip(specs, bodies, answers, strict=True):
            self.invalidated(scope, k, covered, replies[-1])

    @rule(i=sidecar_ids, k=rt_keys, j=sidecar_ids, scope=scopes, k2=keys)
    @step
    def write_racing_invalidation(self, i: int, k: str, j: int, scope: str, k2: str) -> None:
        """A PUT of ``k`` through ``i`` while a ``?wait=true`` invalidation goes through ``j``."""
        value = self.new_value(k, f"sidecar{i}")
        body, covered = self.scope(scope, k2)
        expected_put = {200} if self.ready(i) else {503, GAVE_UP}
        expected_inv = self.expected_invalidation(j, True)
        put, inv = self.parallel([self.put_call(i, k, value), self.invalidate_call(j, body, self.wait_path(True))])
        assert put.status in expected_put, f"PUT of {k!r} through sidecar {i} racing {body}: {put!r}"
        assert inv.status in expected_inv, f"{body} through sidecar {j} racing a PUT of {k!r}: {inv!r}"
        self.invalidated(scope, k2, covered, inv)
        if put.status != 200:
            self.refused_or_abandoned(i, k, value, put)
            return
        bumped = self.version[k] if scope == "key" and k2 == k else None
        self.write_acknowledged(k, value, i, put.etag)
        # Both moved the key's version when the invalidation named it: the newer is current.
        if scope == "key" and k2 == k:
            self.version[k] = None if bumped is None or put.etag is None else max(bumped, put.etag)

    @rule(i=sidecar_ids, j=sidecar_ids, k=rt_keys)
    @step
    def write_racing_strong_read(self, i: int, j: int, k: str) -> None:
        """A strong read of ``k`` on ``j`` while a PUT goes through ``i``: the value before or after."""
        before = self.origin[k]
        value = self.new_value(k, f"sidecar{i}")
        put, read = self.parallel([self.put_call(i, k, value), self.get_call(j, k, strong=True)])
        expected_put = {200} if self.ready(i) else {503, GAVE_UP}
        assert put.status in expected_put, f"PUT of {k!r} through sidecar {i} racing a strong read: {put!r}"
        self.check_strong(j, k, read, allowed={before, value} if put.status == 200 else {before})
        if put.status == 200:
            self.write_acknowledged(k, value, i, put.etag)
        else:
            self.refused_or_abandoned(i, k, value, put)

    def teardown(self) -> None:
        # Heal every link, wait until every sidecar is ready, and make sure
        # they confirm ?wait=true invalidations (restarting them if wedged).
        self.cluster.restore(probe_key=self.prefix + "probe")
        self.check_abandoned()


# -- the test ---------------------------------------------------------------


@pytest.fixture
def model_cluster(
    zk_server: LocalZooKeeper, sidecars: SidecarFactory, sqlite_url: str, namespace: str
) -> Iterator[Cluster]:
    """Three sidecars, each behind its own proxy to the shared ZooKeeper, on one SQLite file."""
    proxies = []
    for _ in range(N):
        proxy = TcpProxy(zk_server.host, zk_server.port)
        proxy.start()
        proxies.append(proxy)
    procs = [sidecars(f"m{i}", wait_ready=False, zk=proxies[i].address, **_sidecar_settings()) for i in range(N)]
    for proc in procs:
        proc.wait_ready(30)
    cluster = Cluster(
        zk_hosts=zk_server.hosts,
        namespace=namespace,
        sqlite_path=sqlite_path(sqlite_url),
        proxies=proxies,
        sidecars=procs,
    )
    yield cluster
    # Stop the sidecars while their links still work (a graceful stop closes
    # the session), then the proxies; the `sidecars` fixture prints the logs
    # if the test failed.
    for i in range(N):
        cluster.heal(i)
    for proc in procs:
        proc.stop()
    cluster.close()


@pytest.mark.timeout(PROFILE.timeout)
def test_sidecars_follow_the_coherence_model(model_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random programs of writes, invalidations, leases, reads and link faults against the model."""
    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", PROFILE.shrink_seconds)

    def machine() -> CoherenceModel:
        return CoherenceModel(model_cluster)

    run_state_machine_as_test(machine, settings=PROFILE.settings)  # type: ignore[arg-type]
