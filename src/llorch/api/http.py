"""The HTTP/1.1 connection guard: limits uvicorn does not have for the parser llorch runs.

uvicorn picks httptools when it is installed (``uvicorn[standard]``), and its httptools protocol
has no limit on a request head (h11's ``h11_max_incomplete_event_size`` applies to h11 only and
answers 400), no deadline for receiving a head or a body, and a ``limit_concurrency`` that refuses
``/livez`` like everything else once slow clients fill it. :class:`GuardedProtocol` adds, per
connection:

- a head larger than ``max_head_bytes`` is answered 431 and the connection closed; the parser is
  never fed more than the limit, so nothing beyond it is buffered;
- a head not received within ``head_timeout_s`` (counted from the connection, or from the last
  response on a kept-alive one) is answered 408, or closed silently when nothing was sent;
- a body not received within ``body_timeout_s`` of its head is answered 408 (when no response
  has started), the handler sees a disconnect, and the connection is closed;
- at ``max_connections`` open connections, a new one evicts the connection that has waited
  longest for its head (a slow client), so health checks and admission keep answering; when
  every connection is busy with a request, the new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from llorch.config import Settings

log = logging.getLogger("llorch.http")

_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
# The kernel's cap on a listen backlog (Linux).
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
# Descriptors kept free under the process limit for the database, engines, logs and the listener.
_DESCRIPTOR_RESERVE = 256


@dataclass
class HttpLimits:
    """The guard's limits, and the connections that are waiting for a head (oldest first)."""

    max_head_bytes: int
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int
    waiting: dict[GuardedProtocol, None] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        server = settings.server
        return cls(
            max_head_bytes=server.max_head_bytes,
            head_timeout_s=server.head_timeout_s,
            body_timeout_s=server.body_timeout_s,
            max_connections=server.max_connections or descriptor_cap(),
        )


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (each open stream is
    a socket; distributions default the soft limit to 1,024); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open (1,048,576 by default).
    want = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    if soft == want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:  # refused (a container's policy): keep the soft one
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)
        return soft
    return want


def descriptor_cap() -> int:
    """The default connection cap: the descriptor limit less a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, soft - _DESCRIPTOR_RESERVE)


def listen_backlog(requested: int, somaxconn: Path = SOMAXCONN) -> int:
    """``server.backlog``, for uvicorn; a warning when the kernel will cap it (Linux caps a
    listen backlog at net.core.somaxconn without a word, and a burst of connections past the
    cap waits for the clients' SYN retries: a second, then three, then seven)."""
    try:
        cap = int(somaxconn.read_text(encoding="ascii"))
    except (OSError, ValueError):  # not Linux, or no /proc: nothing to compare with
        return requested
    if requested > cap:
        log.warning(
            "server.backlog is %d but the kernel caps listen backlogs at %d "
            "(net.core.somaxconn); raise it with sysctl to get the backlog configured",
            requested,
            cap,
        )
    return requested


def refusal(status: int, code: str, message: str) -> bytes:
    """A complete ``Connection: close`` response carrying llorch's error envelope."""
    body = json.dumps(
        {
            "code": code,
            "message": message,
            "retriable": status != 431,
            "correlation_id": uuid.uuid4().hex,
        }
    ).encode()
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
    head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    head += b"connection: close\r\n\r\n"
    return head + body


class SlimEvent(asyncio.Event):
    """``asyncio.Event`` with its waiters in a list: the deque it makes takes ~750 bytes with
    its block, and uvicorn holds two per connection (the request's ``message_event``, the flow
    control's writable event), ~1.5 KiB of every open stream. Only one task ever waits on
    either, and asyncio.Event uses nothing but ``append``, ``remove`` and iteration."""

    def __init__(self, *, is_set: bool = False) -> None:
        # Not super().__init__(), which makes the deque; asyncio's loop mixin keeps _loop.
        self._waiters = []  # type: ignore[assignment]
        self._value = is_set


class _GuardState:
    """A connection's guard: the bytes of the head so far, whether a head is awaited, the
    timer of its deadline, and whether the connection was refused at the cap."""

    __slots__ = ("deadline", "head_bytes", "head_open", "refused")

    def __init__(self) -> None:
        self.head_bytes = 0
        self.head_open = False
        self.deadline: asyncio.TimerHandle | None = None
        self.refused = False


class Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests as a list: it only ever ``appendleft``s, ``pop``s
    and tests it, and a connection rarely has a request waiting, so a ``deque`` and its
    ~600-byte block per connection buy nothing."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def protocol_class(limits: HttpLimits) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("BoundGuardedProtocol", (GuardedProtocol,), {"limits": limits})


class GuardedProtocol(HttpToolsProtocol):
    limits: HttpLimits

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # One attribute, not four: uvicorn's protocol sets 28, and an instance with 30 or more
        # loses CPython's key-sharing dict (~1.3 KiB more a connection, bench/NOTES.md).
        self._guard = _GuardState()
        # uvicorn's deque of pipelined requests (~700 bytes with its block), as a list.
        self.pipeline = Pipeline()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._evict_one():
            self._guard.refused = True
            transport.write(refusal(503, "TOO_MANY_CONNECTIONS", "too many open connections"))
            transport.close()
            return
        super().connection_made(transport)
        self.flow._is_writable_event = SlimEvent(is_set=not self.flow.write_paused)
        self._open_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard.refused:  # never counted as a connection
            return
        self._close_head()
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and self._guard.head_open:
            room = self.limits.max_head_bytes - self._guard.head_bytes
            if room <= 0:
                self._refuse(431, "HEADERS_TOO_LARGE", "request head too large")
                return
            piece, data = data[:room], data[room:]
            self._guard.head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._close_head()
        self._disarm()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:
            # The new request's cycle, whose task has not run yet: nothing waits on its event.
            self.cycle.message_event = SlimEvent()
        # Disarmed by on_message_complete, which follows at once for a request without a body.
        self._arm(self.limits.body_timeout_s, self._body_late)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._open_head()

    def _open_head(self) -> None:
        self._guard.head_open = True
        self._guard.head_bytes = 0
        self.limits.waiting[self] = None
        self._arm(self.limits.head_timeout_s, self._head_late)

    def _close_head(self) -> None:
        self._guard.head_open = False
        self.limits.waiting.pop(self, None)

    def _arm(self, delay_s: float, callback: Any) -> None:
        self._disarm()
        self._guard.deadline = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._guard.deadline is not None:
            self._guard.deadline.cancel()
            self._guard.deadline = None

    def _evict_one(self) -> bool:
        """Closes the connection that has waited longest for a head; False if there is none."""
        victim = next(iter(self.limits.waiting), None)
        if victim is None:
            return False
        # Not logged: under a slow-client flood that would be a line per new connection.
        victim._head_late(logged=False)
        return True

    def _head_late(self, *, logged: bool = True) -> None:
        self._guard.deadline = None
        if self._guard.head_bytes == 0:
            self._close_head()
            self.transport.close()
        else:
            self._refuse(408, "REQUEST_TIMEOUT", "request head not received in time", logged)

    def _body_late(self) -> None:
        self._guard.deadline = None
        if not self.cycle.response_started:
            self.transport.write(
                refusal(408, "REQUEST_TIMEOUT", "request body not received in time")
            )
        # The handler waiting on the body sees a disconnect; what it sends is dropped.
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        self.transport.close()

    def _refuse(self, status: int, code: str, message: str, logged: bool = True) -> None:
        if logged:
            extra = {"event": "http_refused", "status": status}
            log.info("connection refused: %s", message, extra=extra)
        self._close_head()
        self._disarm()
        self.transport.write(refusal(status, code, message))
        self.transport.close()
