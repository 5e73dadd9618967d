"""The client's exception tree: every error envelope becomes one typed exception.

::

    ClientError                      anything the client raises
    ├── TransportError               no HTTP answer (connection refused, timeout)
    ├── ProtocolError                an answer that is not the contract (no envelope, bad SSE)
    ├── StreamFailed                 a task's stream ended with an ``error`` frame
    └── ApiError                     a non-2xx answer with the error envelope
        ├── InvalidRequest           400, 413, 415
        ├── AuthError                401, 403
        ├── NotFound                 404
        ├── Conflict                 409
        ├── Overloaded               429 (queue full, budget exhausted, rate limited)
        ├── Unavailable              503
        └── ServerError              500 and any other 5xx

Each carries the envelope's ``code``, ``message``, ``retriable`` and ``retry_after_s`` (from
``Retry-After`` or ``retry_after_ms``), so a caller can decide without parsing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    """The base of every error this client raises."""

    code: str = "CLIENT_ERROR"
    retriable: bool = False
    retry_after_s: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(ClientError):
    """The server could not be reached or did not answer in time."""

    code = "TRANSPORT"
    retriable = True


class ProtocolError(ClientError):
    """The server answered something the contract does not allow."""

    code = "PROTOCOL"


class StreamFailed(ClientError):
    """The task's stream ended with an ``error`` frame."""

    def __init__(
        self, code: str, message: str, *, retriable: bool, retry_after_ms: int | None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable
        self.retry_after_s = retry_after_ms / 1000 if retry_after_ms is not None else None


class ApiError(ClientError):
    """A non-2xx answer carrying the error envelope."""

    def __init__(
        self, status: int, envelope: Mapping[str, Any], headers: Mapping[str, str]
    ) -> None:
        super().__init__(str(envelope.get("message", "")))
        self.status = status
        self.envelope = dict(envelope)
        self.code = str(envelope.get("code", "UNKNOWN"))
        self.retriable = bool(envelope.get("retriable", False))
        self.correlation_id = str(envelope.get("correlation_id", ""))
        self.retry_after_s = _retry_after_s(envelope, headers)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class InvalidRequest(ApiError):
    pass


class AuthError(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Overloaded(ApiError):
    pass


class Unavailable(ApiError):
    pass


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    429: Overloaded,
    503: Unavailable,
}


def api_error(status: int, envelope: Mapping[str, Any], headers: Mapping[str, str]) -> ApiError:
    """The exception for a non-2xx answer (any 5xx but 503 is a ServerError)."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return kind(status, envelope, headers)


def _retry_after_s(envelope: Mapping[str, Any], headers: Mapping[str, str]) -> float | None:
    header = headers.get("retry-after")
    if header is not None and header.strip().isdigit():
        return float(header.strip())
    ms = envelope.get("retry_after_ms")
    if isinstance(ms, int) and not isinstance(ms, bool):
        return ms / 1000
    return None
