"""Pure ASGI middlewares (never BaseHTTPMiddleware: it hides client disconnects on streams)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

from connexion.exceptions import UnsupportedMediaTypeProblem
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llorch.errors import PayloadTooLarge
from llorch.metrics import Metrics

correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")
request_log = logging.getLogger("llorch.requests")

_ACCEPTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case, as ASGI gives it)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _untyped_body(scope: Scope) -> bool:
    """The request carries a body (by length or chunked) and no ``Content-Type``."""
    if _header(scope, b"content-type") is not None:
        return False
    length = _header(scope, b"content-length")
    return (length is not None and length.strip() != "0") or (
        _header(scope, b"transfer-encoding") is not None
    )


def _chosen_id(scope: Scope) -> str:
    """The request's own ``X-Correlation-Id`` when it is sane, else a new one."""
    given = _header(scope, b"x-correlation-id")
    return given if given is not None and _ACCEPTABLE_ID.match(given) else uuid.uuid4().hex


class EdgeMiddleware:
    """Outermost but for connexion's server-error handler, one layer for three jobs:

    - ``X-Correlation-Id``: a sane one the client sent is echoed, else one is generated; it goes
      on every response, errors included;
    - every answered request is counted by operationId (``none`` when no operation matched)
      and status, and logged;
    - a body above ``max_body_bytes`` (or its path's own limit) is refused with a 413, by its
      Content-Length before it is read, or while it streams in; a path in ``decoded_limits``
      (``/v1/artifacts``) is also refused as soon as the fewest bytes its JSON can decode to
      (:func:`fewest_decoded_bytes`) pass that limit: a body of plain text after that many
      bytes, long before the raw limit its escaped content may need.

    One layer rather than three: a layer costs every request a call and every message it
    sends (each SSE frame) a wrapper.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        limits: dict[str, int] | None = None,
        decoded_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.limits = limits or {}  # exact path -> its own limit
        self.decoded_limits = decoded_limits or {}  # exact path -> limit on the decoded body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        cid = _chosen_id(scope)
        receive = self._limited(scope, receive)
        status = 500
        # Connexion routes a shallow copy of the scope: this dict is shared with it, and
        # OperationMiddleware, inside the routing, writes the operation into it.
        note: dict[str, str] = {}
        scope["llorch.operation"] = note

        async def edge_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Correlation-Id"] = cid
            await send(message)

        token = correlation_id.set(cid)
        try:
            await self.app(scope, receive, edge_send)
        finally:
            operation_id = note.get("operation_id", "none")
            self.metrics.inc(
                "llorch_http_requests_total", operation_id=operation_id, status=str(status)
            )
            request_log.info(
                "request",
                extra={
                    "event": "request",
                    "correlation_id": cid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "operation_id": operation_id,
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 3),
                },
            )
            correlation_id.reset(token)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """``receive`` that raises the 413 once the body passes its path's limits (the error is
        made only then: an open stream holds this ``receive`` for as long as it is open)."""
        limit = self.limits.get(scope["path"], self.max_body_bytes)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _raising_receive(limit)
        if declared is None and _header(scope, b"transfer-encoding") is None:
            # No body (HTTP/1.1 has none without either header): nothing to count, and an open
            # stream does not hold a counting closure (~500 bytes).
            return receive
        return _counting_receive(receive, limit, self.decoded_limits.get(scope["path"]))


def _too_large(limit: int, decoded: bool = False) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than {limit} bytes{' decoded' if decoded else ''}")


def _raising_receive(limit: int) -> Receive:
    async def receive() -> Message:
        raise _too_large(limit)

    return receive


def _counting_receive(inner: Receive, limit: int, decoded_limit: int | None = None) -> Receive:
    seen = decoded = 0
    last = b""  # the previous part's last byte: a "\\u" may straddle two parts

    async def receive() -> Message:
        nonlocal seen, decoded, last
        message = await inner()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            seen += len(body)
            if seen > limit:
                raise _too_large(limit)
            if decoded_limit is not None and body:
                decoded += fewest_decoded_bytes(body, last)
                last = body[-1:]
                # No escape is longer than six bytes for each byte it stands for.
                if max(decoded, seen // 6) > decoded_limit:
                    raise _too_large(decoded_limit, decoded=True)
        return message

    return receive


def fewest_decoded_bytes(part: bytes, before: bytes = b"") -> int:
    """What a part of a JSON text adds to the fewest bytes the whole can stand for once its
    string escapes are decoded, counted without parsing (three scans of the bytes).

    Every byte counts one, but a backslash may start an escape (``\\n``: two bytes for one) and
    ``\\u`` one of six bytes for one (``\\u0001``); an escaped backslash is counted as if it
    saved more, so the sum over the parts errs low, never high, however the text is split.
    ``before`` is the previous part's last byte (a ``\\u`` may straddle two parts, and then
    this part's share is negative).
    """
    unicode_escapes = (before[-1:] + part).count(b"\\u")
    return len(part) - part.count(b"\\") - 4 * unicode_escapes


class ChunkedBodyMiddleware:
    """Between security and request validation: a body sent ``Transfer-Encoding: chunked``
    (no ``Content-Length``) goes on as if it had been sent with its length.

    Connexion's body validator takes a request without a ``Content-Length`` for one without a
    body: "RequestBody is required", or the schema's default put before the body sent. So the
    body is read here, through the edge's counting ``receive`` (a body over the limit is the
    413 while it streams in), and replayed message by message with the length it turned out to
    have, in place of the transfer coding.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or _header(scope, b"transfer-encoding") is None
            or _header(scope, b"content-length") is not None
        ):
            await self.app(scope, receive, send)
            return
        messages = await _whole_body(receive)
        length = sum(len(message.get("body", b"")) for message in messages)
        headers = [(key, value) for key, value in scope["headers"] if key != b"transfer-encoding"]
        headers.append((b"content-length", str(length).encode("latin-1")))
        await self.app({**scope, "headers": headers}, _replaying(messages, receive), send)


async def _whole_body(receive: Receive) -> list[Message]:
    """The request's messages up to its last body part (or the client's disconnect)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replaying(messages: list[Message], inner: Receive) -> Receive:
    pending = iter(messages)

    async def receive() -> Message:
        return next(pending, None) or await inner()

    return receive


class OperationMiddleware:
    """Inside connexion's routing, around the handler: tells :class:`EdgeMiddleware` which
    operation matched, and puts the correlation id on the response where connexion's response
    validation, which checks the headers the contract requires, sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = scope.get("llorch.operation")
        routing = scope.get("extensions", {}).get("connexion_routing", {})
        if note is not None and "operation_id" in routing:
            note["operation_id"] = routing["operation_id"]
        if _untyped_body(scope):
            # Connexion validates a body by its media type: one without would reach the handler
            # unparsed and unvalidated.
            raise UnsupportedMediaTypeProblem(detail="a request body needs a Content-Type")
        cid = correlation_id.get() or _chosen_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Correlation-Id"] = cid
            await send(message)

        await self.app(scope, receive, send_with_id)
