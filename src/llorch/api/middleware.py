"""Pure ASGI middlewares (never BaseHTTPMiddleware: it hides client disconnects on streams)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llorch.errors import PayloadTooLarge
from llorch.metrics import Metrics

correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")
request_log = logging.getLogger("llorch.requests")

_ACCEPTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class CorrelationIdMiddleware:
    """Echo a sane ``X-Correlation-Id`` or generate one; it goes on every response.

    Installed twice: outermost, so error responses carry it too, and innermost, so that
    connexion's response validation sees the header the contract requires. The inner one reuses
    the id the outer one chose.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = correlation_id.get()
        if not cid:
            given = Headers(scope=scope).get("x-correlation-id", "")
            cid = given if _ACCEPTABLE_ID.match(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Correlation-Id"] = cid
            await send(message)

        token = correlation_id.set(cid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            correlation_id.reset(token)


class BodyLimitMiddleware:
    """Refuse bodies above ``max_body_bytes``, by Content-Length or while they stream in."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limits = limits or {}  # exact path -> its own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.max_body_bytes)
        too_large = PayloadTooLarge(f"request body larger than {limit} bytes")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            receive = _raising_receive(too_large)
        else:
            receive = _counting_receive(receive, limit, too_large)
        await self.app(scope, receive, send)


def _raising_receive(error: Exception) -> Receive:
    async def receive() -> Message:
        raise error

    return receive


def _counting_receive(inner: Receive, limit: int, error: Exception) -> Receive:
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await inner()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise error
        return message

    return receive


class RequestMetricsMiddleware:
    """Count every answered request by operationId (``none`` when no operation matched) and
    status; outermost but for the correlation id, so error answers are counted too."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()
        # Connexion routes a shallow copy of the scope: this dict is shared with it, and
        # OperationNoteMiddleware, inside the routing, writes the operation into it.
        note: dict[str, str] = {}
        scope["llorch.operation"] = note

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            operation_id = note.get("operation_id", "none")
            self.metrics.inc(
                "llorch_http_requests_total", operation_id=operation_id, status=str(status)
            )
            request_log.info(
                "request",
                extra={
                    "event": "request",
                    "correlation_id": correlation_id.get(),
                    "method": scope["method"],
                    "path": scope["path"],
                    "operation_id": operation_id,
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 3),
                },
            )


class OperationNoteMiddleware:
    """Inside connexion's routing: tell RequestMetricsMiddleware which operation matched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        note = scope.get("llorch.operation")
        routing = scope.get("extensions", {}).get("connexion_routing", {})
        if note is not None and "operation_id" in routing:
            note["operation_id"] = routing["operation_id"]
        await self.app(scope, receive, send)
