"""An HTTP origin: ``GET/PUT/DELETE <base>/<percent-encoded key>``.

Upstream 404 means "no value".  Any other failure is the origin's, not the
client's: 5xx, unexpected statuses and refused connections become 502
(``OriginError``/``OriginUnavailable``), timeouts 504 (``OriginTimeout``).
"""

from __future__ import annotations

from urllib.parse import quote

import aiohttp

from ..errors import OriginError, OriginTimeout, OriginUnavailable
from .base import DEFAULT_CONTENT_TYPE, OriginValue
from .monitor import probe_read

__all__ = ["HttpOrigin"]


class HttpOrigin:
    """A REST key-value upstream."""

    def __init__(self, base_url: str, timeout: float, max_value_bytes: int, max_connections: int = 32) -> None:
        self.base = base_url.rstrip("/")
        self.name = self.base
        self.applies_late = True  # a request may finish at the upstream after we gave up
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._seconds = timeout
        self._max = max_value_bytes
        self._connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the connection pool."""
        connector = aiohttp.TCPConnector(limit=self._connections)
        self._session = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False, connector=connector)

    def _url(self, key: str) -> str:
        return f"{self.base}/{quote(key, safe='')}"

    @property
    def _http(self) -> aiohttp.ClientSession:
        assert self._session is not None, "HttpOrigin.open() was not awaited"
        return self._session

    async def get(self, key: str) -> OriginValue | None:
        """GET the value; ``None`` on 404."""
        try:
            async with self._http.get(self._url(key)) as resp:
                if resp.status == 404:
                    return None
                self._check(resp, "GET")
                if resp.content_length is not None and resp.content_length > self._max:
                    raise OriginError(f"origin value for key exceeds {self._max} bytes")
                body = await resp.content.read(self._max + 1)
                if len(body) > self._max:
                    raise OriginError(f"origin value for key exceeds {self._max} bytes")
                return OriginValue(body, resp.headers.get("Content-Type", DEFAULT_CONTENT_TYPE))
        except TimeoutError:
            raise OriginTimeout(f"{self.base}: GET timed out after {self._seconds:g}s") from None
        except aiohttp.ClientError as exc:
            raise OriginUnavailable(f"{self.base}: GET failed: {exc}") from exc

    async def put(self, key: str, value: OriginValue) -> None:
        """PUT the value; any 2xx is success."""
        await self._send("PUT", key, value)

    async def delete(self, key: str) -> None:
        """DELETE the value; 404 counts as success."""
        await self._send("DELETE", key, None)

    async def _send(self, method: str, key: str, value: OriginValue | None) -> None:
        kwargs = {} if value is None else {"data": value.value, "headers": {"Content-Type": value.content_type}}
        try:
            async with self._http.request(method, self._url(key), **kwargs) as resp:  # type: ignore[arg-type]
                if method == "DELETE" and resp.status == 404:
                    return
                self._check(resp, method)
        except TimeoutError:
            raise OriginTimeout(f"{self.base}: {method} timed out after {self._seconds:g}s") from None
        except aiohttp.ClientError as exc:
            raise OriginUnavailable(f"{self.base}: {method} failed: {exc}") from exc

    def _check(self, resp: aiohttp.ClientResponse, method: str) -> None:
        if not 200 <= resp.status < 300:
            raise OriginError(f"{self.base}: {method} answered {resp.status} {resp.reason}")

    async def health(self) -> list[str]:
        """One read of a key nobody writes."""
        return await probe_read(self)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
