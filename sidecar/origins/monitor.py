"""Whether the origin is down, and what it says about itself (``/readyz``).

An origin is *down* from a call that failed to reach it (unavailable or timed
out) until a later call succeeds, or until its own health check finds
nothing wrong.  Errors about one key (a value too large, a wrong Redis type)
say nothing about the origin and do not count.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..errors import OriginError, OriginTimeout, OriginUnavailable
from .base import Origin, OriginValue

__all__ = ["MonitoredOrigin", "probe_read"]

PROBE_KEY = "__zkcache_health__"
_HEALTH_TTL = 1.0  # seconds a health answer is reused: /readyz is polled, the origin should not be


async def probe_read(origin: Origin) -> list[str]:
    """A health check for origins with none of their own: one read of a key nobody writes."""
    try:
        await origin.get(PROBE_KEY)
    except OriginError as exc:
        return [exc.detail]
    return []


class MonitoredOrigin:
    """An :class:`Origin` that remembers whether its last attempt to reach the store failed."""

    def __init__(self, inner: Origin) -> None:
        self.inner = inner
        self.name = inner.name
        self.applies_late = inner.applies_late
        self._error: str | None = None
        self._checked_at = -_HEALTH_TTL
        self._reasons: list[str] = []
        self._check: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        """The last call that went to the origin failed to reach it."""
        return self._error is not None

    async def _track(self, call: Any) -> Any:
        try:
            result = await call
        except (OriginUnavailable, OriginTimeout) as exc:
            self._error = exc.detail
            raise
        self._error = None
        return result

    async def get(self, key: str) -> OriginValue | None:
        """See :meth:`Origin.get`."""
        return await self._track(self.inner.get(key))  # type: ignore[no-any-return]

    async def put(self, key: str, value: OriginValue) -> None:
        """See :meth:`Origin.put`."""
        await self._track(self.inner.put(key, value))

    async def delete(self, key: str) -> None:
        """See :meth:`Origin.delete`."""
        await self._track(self.inner.delete(key))

    async def health(self) -> list[str]:
        """The origin's own health check (see :meth:`Origin.health`)."""
        return await self.inner.health()

    async def status(self) -> dict[str, Any]:
        """``{"status": "ok"}``, or ``"down"`` with the last error and what the origin says about itself.

        Never waits for the origin: ``/readyz`` must answer within its probe's
        timeout while the origin hangs. The origin's health check runs in the
        background, at most once a second; its last answer is reported, and an
        answer that finds nothing wrong ends the outage.
        """
        if self._error is None:
            return {"status": "ok"}
        now = time.monotonic()
        if now - self._checked_at >= _HEALTH_TTL and (self._check is None or self._check.done()):
            self._checked_at = now
            self._check = asyncio.ensure_future(self._run_check())
        return {"status": "down", "reasons": [self._error, *self._reasons]}

    async def _run_check(self) -> None:
        try:
            reasons = await self.inner.health()
        except Exception as exc:  # health() reports, it should not raise; if it does, that is the reason
            reasons = [f"health check failed: {exc}"]
        self._reasons = reasons
        if not reasons:
            self._error = None  # the origin answers again, and says nothing is wrong

    async def close(self) -> None:
        """See :meth:`Origin.close`."""
        if self._check is not None:
            self._check.cancel()
        await self.inner.close()
