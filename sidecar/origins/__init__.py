"""Backing stores the sidecar reads through and writes through."""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import DEFAULT_CONTENT_TYPE, MAX_CONTENT_TYPE_BYTES, Origin, OriginValue
from .http import HttpOrigin
from .none import NoOrigin
from .sqlite import SqliteOrigin

__all__ = ["DEFAULT_CONTENT_TYPE", "MAX_CONTENT_TYPE_BYTES", "NoOrigin", "Origin", "OriginValue", "open_origin"]


async def open_origin(url: str, timeout: float, max_value_bytes: int, max_connections: int = 32) -> Origin:
    """Open the origin named by ``url`` (already validated by ``config``)."""
    if url == "none":
        return NoOrigin()
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        sqlite = SqliteOrigin(url, timeout)
        await sqlite.open()
        return sqlite
    if scheme.startswith("redis"):
        from .redis import RedisOrigin  # redis-py is imported only when used

        redis = RedisOrigin(url, timeout, max_value_bytes, max_connections)
        try:
            await redis.open()
        except BaseException:
            await redis.close()
            raise
        return redis
    http = HttpOrigin(url, timeout, max_value_bytes, max_connections)
    await http.open()
    return http
