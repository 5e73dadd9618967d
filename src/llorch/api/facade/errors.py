"""OpenAI's error body on the facade's routes: ``{"error": {"message", "type", "param", "code"}}``.

Every error of those routes — the handlers' domain errors, connexion's validation problems, auth,
413 — is first made into llorch's envelope by the one error table (``api/problems.py``);
:class:`OpenAIErrors` rewrites that envelope on its way out, keeping the status, and adds
``x-should-retry`` (from ``retriable``) and ``retry-after-ms``, which the OpenAI SDKs read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
# Where a validation message names the offending field.
_PARAM_PATTERNS = (
    re.compile(r"\('([^']+)' was unexpected\)"),
    re.compile(r"^'([^']+)' is a required property"),
    re.compile(r"^'([^']+)' does not satisfy"),
    re.compile(r"^'([^']+)' is not served"),
    re.compile(r"^'([^']+)' (?:needs|is only for) "),
    re.compile(r" - '([^']+)'$"),
)


def is_facade(path: str) -> bool:
    return path in _PATHS or path.startswith("/v1/models/")


def error_type(status: int, code: str | None = None) -> str:
    if code == "BUDGET_EXHAUSTED":
        return "insufficient_quota"
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def param_of(message: str) -> str | None:
    for pattern in _PARAM_PATTERNS:
        found = pattern.search(message)
        if found is not None:
            return found.group(1).split(".")[0]
    return None


def error_body(
    status: int, message: str, *, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": error_type(status, code),
            "param": param,
            "code": code.lower() if code is not None else None,
        }
    }


def from_envelope(status: int, envelope: Mapping[str, Any]) -> dict[str, Any]:
    code = str(envelope["code"])
    message = str(envelope.get("message", ""))
    param = param_of(message) if code == "INVALID_PARAMS" else None
    return error_body(status, message, code=code, param=param)


def retry_headers(headers: MutableHeaders, envelope: Mapping[str, Any]) -> None:
    headers["x-should-retry"] = "true" if envelope.get("retriable") else "false"
    if "retry-after" in headers:
        advice = envelope.get("retry_after_ms")
        if advice is None:
            advice = headers.get("x-backoff-ms") or int(headers["retry-after"]) * 1000
        headers["retry-after-ms"] = str(advice)


class OpenAIErrors:
    """Pure ASGI: on the facade's routes, an envelope error answer becomes OpenAI's body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_facade(scope["path"]):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_rewritten(send, held, b"".join(chunks))

        await self.app(scope, receive, rewriting_send)


async def _send_rewritten(send: Send, start: Message, body: bytes) -> None:
    headers = MutableHeaders(scope=start)
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        envelope = None
    if isinstance(envelope, dict) and "code" in envelope and "retriable" in envelope:
        body = orjson.dumps(from_envelope(start["status"], envelope))
        retry_headers(headers, envelope)
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(body))
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
