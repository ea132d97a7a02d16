"""What every origin (backing store) offers the cache service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["DEFAULT_CONTENT_TYPE", "MAX_CONTENT_TYPE_BYTES", "Origin", "OriginValue"]

DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Longest content type a value may carry (PUT refuses longer; the Redis origin too).
MAX_CONTENT_TYPE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class OriginValue:
    """A value as stored in the origin, with the Content-Type it was written with."""

    value: bytes
    content_type: str = DEFAULT_CONTENT_TYPE


class Origin(Protocol):
    """A backing store. Every method is bounded by the origin timeout.

    Raise ``OriginTimeout`` on a timeout and ``OriginError`` (or a subclass) on
    any other failure; never a bare library exception.
    """

    name: str
    # True if a write the sidecar gave up on (timed out, connection lost) may
    # still be applied later (an HTTP upstream finishing the request). Such
    # a writer marks its key before the origin write (coordination/lock.py),
    # and the housekeeper never ends that intent on its own.
    applies_late: bool

    async def get(self, key: str) -> OriginValue | None:
        """The stored value, or ``None`` if the origin has none."""
        ...

    async def put(self, key: str, value: OriginValue) -> None:
        """Store ``value`` durably before returning."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the value; absent keys are not an error."""
        ...

    async def health(self) -> list[str]:
        """What is wrong with the origin, one line each; empty when it is healthy (``/readyz``)."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...
