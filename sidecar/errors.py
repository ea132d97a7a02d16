"""The one exception hierarchy of the sidecar.

Every error a client can see is a subclass of :class:`SidecarError`, and each
class carries the HTTP status and the problem ``type`` it is rendered as.  The
HTTP layer renders them in exactly one place (``http_api._problem_middleware``)
as ``application/problem+json`` (RFC 9457); the CLI maps them to exit codes in
one place (``cli.main``).

    SidecarError
    ├── BadRequest                  400  bad-request
    │   └── InvalidKey              400  invalid-key
    ├── Unauthorized                401  unauthorized
    ├── FillsNotAllowed             403  fills-not-allowed (PUT ?fill=true over a read-through origin)
    ├── NotFound                    404  not-found
    ├── PreconditionFailed          412  precondition-failed
    ├── RequestTimeout              408  request-timeout (the body did not arrive in http_body_timeout)
    ├── PayloadTooLarge             413  payload-too-large
    ├── UnsupportedMediaType        415  unsupported-content-encoding (a Content-Encoding on a body)
    ├── PreconditionRequired        428  precondition-required (PUT ?fill=true without If-Match)
    ├── NotCached                   504  not-cached (GET with Cache-Control: only-if-cached)
    ├── NotAcknowledged             504  not-acknowledged (invalidate --wait timed out)
    ├── ServiceBusy                 503  busy (max_inflight_bytes held by others; Retry-After)
    │   └── TooManyConnections      503  too-many-connections (max_connections, all busy)
    ├── ConfigError                 (exit status 2, never an HTTP response)
    ├── CoordinationError           503  coordination-unavailable
    │   ├── LayoutMismatch          503  layout-mismatch (the namespace has another wire layout)
    │   ├── NotConnected            503  zookeeper-unavailable
    │   ├── LockTimeout             503  lock-timeout   (also asyncio.TimeoutError)
    │   ├── WriteOutcomeUncertain   503  write-outcome-uncertain
    │   └── InvalidationNotPublished 503 invalidation-not-published
    └── OriginError                 502  origin-error
        ├── OriginUnavailable       502  origin-unavailable
        └── OriginTimeout           504  origin-timeout (also asyncio.TimeoutError)
"""

from __future__ import annotations

import asyncio

__all__ = [
    "BadRequest",
    "ConfigError",
    "CoordinationError",
    "FillsNotAllowed",
    "InvalidKey",
    "InvalidationNotPublished",
    "LayoutMismatch",
    "LockTimeout",
    "MethodNotAllowed",
    "NotAcknowledged",
    "NotCached",
    "NotConnected",
    "NotFound",
    "OriginError",
    "OriginTimeout",
    "OriginUnavailable",
    "PayloadTooLarge",
    "PreconditionFailed",
    "PreconditionRequired",
    "RequestTimeout",
    "ServiceBusy",
    "SidecarError",
    "TooManyConnections",
    "Unauthorized",
    "UnsupportedMediaType",
    "WriteOutcomeUncertain",
    "ZkAccessDenied",
]

PROBLEM_BASE = "https://zk-cache-sidecar.dev/problems/"


class SidecarError(Exception):
    """Root of every error the sidecar reports to a client."""

    status: int = 500
    problem: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    @property
    def type_uri(self) -> str:
        """The RFC 9457 ``type`` member of the problem document."""
        return PROBLEM_BASE + self.problem


class BadRequest(SidecarError):
    status, problem, title = 400, "bad-request", "Bad request"


class InvalidKey(BadRequest):
    problem, title = "invalid-key", "Invalid key"


class Unauthorized(SidecarError):
    status, problem, title = 401, "unauthorized", "Missing or wrong bearer token"


class FillsNotAllowed(SidecarError):
    """Cache-aside fills asked of a sidecar that reads through its origin (``fills = auto``)."""

    status, problem, title = 403, "fills-not-allowed", "Cache-aside fills are off on this sidecar"


class MethodNotAllowed(SidecarError):
    status, problem, title = 405, "method-not-allowed", "Method not allowed on this resource"

    def __init__(self, method: str, allow: str) -> None:
        super().__init__(f"{method} is not supported here; use {allow}")
        self.allow = allow  # the Allow header of the response


class NotFound(SidecarError):
    status, problem, title = 404, "not-found", "Not found"


class PreconditionFailed(SidecarError):
    status, problem, title = 412, "precondition-failed", "Precondition failed"

    def __init__(self, detail: str = "", current_version: int | None = None) -> None:
        super().__init__(detail)
        self.current_version = current_version


class PreconditionRequired(SidecarError):
    status, problem, title = 428, "precondition-required", "If-Match required"


class RequestTimeout(SidecarError):
    """The request body did not arrive within ``http_body_timeout``."""

    status, problem, title = 408, "request-timeout", "Request body not received in time"


class PayloadTooLarge(SidecarError):
    status, problem, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(SidecarError):
    """A request body with a ``Content-Encoding``: values are stored as sent, never decoded."""

    status, problem, title = 415, "unsupported-content-encoding", "Content-Encoding not supported"


class ServiceBusy(SidecarError):
    """Too many bytes or connections in flight; retry (``Retry-After``)."""

    status, problem, title = 503, "busy", "Too much in flight; retry"


class TooManyConnections(ServiceBusy):
    """Every connection up to ``max_connections`` has a request in progress (answered before any is read)."""

    problem, title = "too-many-connections", "Too many connections"


class NotCached(SidecarError):
    """``Cache-Control: only-if-cached`` and the key is not cached (RFC 9111, 5.2.1.7)."""

    status, problem, title = 504, "not-cached", "Not in this sidecar's cache"


class NotAcknowledged(SidecarError):
    """``wait`` ran out before every live sidecar confirmed an invalidation.

    The invalidation was published; ``missing`` names who did not confirm.
    """

    status, problem, title = 504, "not-acknowledged", "Not every sidecar confirmed the invalidation"

    def __init__(self, detail: str, missing: list[str], confirmed: list[str]) -> None:
        super().__init__(detail)
        self.missing, self.confirmed = missing, confirmed


class ConfigError(SidecarError):
    """An invalid setting. The daemon exits with status 2 and this one line."""

    problem, title = "config-error", "Invalid configuration"


class CoordinationError(SidecarError):
    status, problem, title = 503, "coordination-unavailable", "ZooKeeper operation failed"


class ZkAccessDenied(CoordinationError):
    problem, title = "zookeeper-access-denied", "ZooKeeper refused access (check zk_auth and the znodes' ACLs)"


class LayoutMismatch(CoordinationError):
    """The namespace in ZooKeeper was laid out by sidecars of another wire layout."""

    problem, title = "layout-mismatch", "The namespace uses another ZooKeeper layout"


class NotConnected(CoordinationError):
    problem, title = "zookeeper-unavailable", "Not connected to ZooKeeper"


class LockTimeout(CoordinationError, asyncio.TimeoutError):
    problem, title = "lock-timeout", "Timed out waiting for the key's write lock"


class WriteOutcomeUncertain(CoordinationError):
    """The origin was written, but the session (and so the lock) was lost meanwhile.

    Another writer may have taken the lock and written after, or before, this
    write reached the origin; the version was still bumped, so caches are
    coherent with whatever the origin holds. Read the key to see which won.
    """

    problem, title = "write-outcome-uncertain", "Written, but the lock was lost: the outcome is uncertain"


class WriteAbandoned(SidecarError):
    """Nothing was written: the client went away, or the sidecar began to stop, before the write took its lock.

    A write waits up to ``lock_timeout`` for a connection and for the key's
    lock; one that nobody waits for any more must not land later, over a
    write the client made elsewhere meanwhile.  Past the lock a write always
    runs to its end.
    """

    status, problem, title = 503, "write-abandoned", "Nothing written: the client left or the sidecar is stopping"


class InvalidationNotPublished(CoordinationError):
    """The origin was written but the version bump could not be published.

    Other sidecars may keep serving the previous value until their TTL or
    until the key is invalidated again; the client is told so explicitly.
    """

    problem, title = "invalidation-not-published", "Write applied, invalidation not published"


class OriginError(SidecarError):
    status, problem, title = 502, "origin-error", "The origin failed"


class OriginUnavailable(OriginError):
    problem, title = "origin-unavailable", "The origin is unreachable"


class OriginTimeout(OriginError, asyncio.TimeoutError):
    status, problem, title = 504, "origin-timeout", "The origin timed out"
