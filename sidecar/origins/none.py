"""``none``: no origin. The application loads from its own store (cache-aside).

Reads miss with a lease (see ``service.CacheService.lease``); the application
installs what it loaded with ``PUT ?fill=true``. There is nothing to write
through, so plain PUT and DELETE are refused with a clear message.
"""

from __future__ import annotations

from ..errors import BadRequest
from .base import OriginValue

__all__ = ["NoOrigin"]

_HINT = (
    "origin is 'none': there is nothing to write through; install values with "
    "PUT ?fill=true and If-Match: <lease>, and POST /v1/invalidate after writing your store"
)


class NoOrigin:
    """The origin that holds nothing."""

    name = "none"
    applies_late = False  # writes nothing

    async def get(self, key: str) -> OriginValue | None:
        """Always a miss."""
        return None

    async def put(self, key: str, value: OriginValue) -> None:
        """Refused: there is no origin."""
        raise BadRequest(_HINT)

    async def delete(self, key: str) -> None:
        """Refused: there is no origin."""
        raise BadRequest(_HINT)

    async def health(self) -> list[str]:
        """Nothing can be wrong."""
        return []

    async def close(self) -> None:
        """Nothing to release."""
