"""The one table from error code to HTTP status, and the error envelope every non-2xx carries.

``{code, message, retriable, retry_after_ms?, policy_label?, engine?, pool_id?, correlation_id}``
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson
from connexion.exceptions import ProblemException, UnsupportedMediaTypeProblem
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from llorch.api.middleware import correlation_id
from llorch.errors import LlorchError

log = logging.getLogger("llorch.api")

STATUS: dict[str, int] = {
    "INVALID_PARAMS": 400,
    "DEADLINE_UNMET": 400,
    "MISSING_TOKEN": 401,
    "BAD_TOKEN": 401,
    "FORBIDDEN_SCOPE": 403,
    "NOT_FOUND": 404,
    "TASK_NOT_FOUND": 404,
    "SESSION_NOT_FOUND": 404,
    "ARTIFACT_NOT_FOUND": 404,
    "POOL_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "TASK_EXISTS": 409,
    "ALREADY_DRAINING": 409,
    "NOT_DRAINING": 409,
    "RELOAD_IN_PROGRESS": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "ADMISSION_REJECT": 429,
    "QUEUE_FULL_DROP_LRU": 429,
    "BUDGET_EXHAUSTED": 429,
    "RATE_LIMITED": 429,
    "INTERNAL": 500,
    "ARTIFACT_CORRUPT": 500,
    "ENGINE_ERROR": 502,
    "WORKER_RESET": 502,
    "DECODE_TIMEOUT": 504,
    "POOL_UNREADY": 503,
    "QUEUE_TIMEOUT": 503,
    "POOL_UNAVAILABLE": 503,
    "SHUTTING_DOWN": 503,
    "STORAGE_UNAVAILABLE": 503,
    "NOT_READY": 503,
}

# Statuses that carry Retry-After (seconds) and, for 429, X-Backoff-Ms.
_RETRY_STATUSES = frozenset({429, 503})


def envelope_response(
    code: str,
    message: str,
    *,
    retriable: bool,
    retry_after_ms: int | None = None,
    headers: Mapping[str, str] | None = None,
    **labels: str | None,
) -> ConnexionResponse:
    status = STATUS[code]
    body: dict[str, Any] = {"code": code, "message": message, "retriable": retriable}
    headers = dict(headers or {})
    if status in _RETRY_STATUSES:
        retry_after_ms = retry_after_ms if retry_after_ms is not None else 1000
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
        if status == 429:
            headers["X-Backoff-Ms"] = str(retry_after_ms)
    if retry_after_ms is not None and retriable:
        # Advice to retry belongs only on errors a retry can cure; the headers stay, as the
        # contract declares them on every 429 and 503.
        body["retry_after_ms"] = retry_after_ms
    body |= {k: v for k, v in labels.items() if v is not None}
    body["correlation_id"] = correlation_id.get()
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        body=orjson.dumps(body),
        headers=headers,
    )


def domain_error(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, LlorchError)
    status = STATUS[exc.code]
    if status == 500:  # a fault of ours: the traceback is what finds it
        log.error("request failed: %s", exc.message, exc_info=exc)
    elif status >= 500:  # a state of the service (draining, unready) or of an engine
        log.log(
            logging.INFO if status == 503 else logging.WARNING,
            "request refused: %s %s: %s",
            status,
            exc.code,
            exc.message,
        )
    # RFC 6750: a 401 names the scheme that would be accepted.
    challenge = {"WWW-Authenticate": 'Bearer realm="llorch"'} if STATUS[exc.code] == 401 else None
    return envelope_response(
        exc.code,
        # A 500's own message names files and SQL: it goes to the log above, not to the client.
        "internal error" if status == 500 else exc.message,
        retriable=exc.retriable,
        retry_after_ms=exc.retry_after_ms,
        headers=challenge,
        policy_label=exc.policy_label,
        pool_id=exc.pool_id,
        engine=exc.engine,
    )


def problem(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    """Connexion's validation problems become INVALID_PARAMS / UNSUPPORTED_MEDIA_TYPE."""
    assert isinstance(exc, ProblemException)
    if isinstance(exc, UnsupportedMediaTypeProblem) or exc.status == 415:
        return envelope_response("UNSUPPORTED_MEDIA_TYPE", str(exc.detail), retriable=False)
    if 400 <= exc.status < 500:
        return envelope_response("INVALID_PARAMS", str(exc.detail or exc.title), retriable=False)
    log.error("server problem: %s %s", exc.title, exc.detail)
    return envelope_response("INTERNAL", "internal error", retriable=True)


class HttpErrors:
    """Starlette's routing errors as envelopes; 405 lists the path's methods from the contract.

    (Connexion registers one route per operation, so Starlette's own ``Allow`` names only one.)
    """

    def __init__(self, *documents: Mapping[str, Any]) -> None:
        self._paths: list[tuple[re.Pattern[str], str]] = []
        for document in documents:
            for template, item in document.get("paths", {}).items():
                pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
                methods = sorted(m.upper() for m in item if m in _HTTP_METHODS)
                self._paths.append((re.compile(f"^{pattern}$"), ", ".join(methods)))

    def allow(self, path: str) -> str | None:
        return next((methods for regex, methods in self._paths if regex.match(path)), None)

    def __call__(self, request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return envelope_response("NOT_FOUND", "no such route", retriable=False)
        if exc.status_code == 405:
            allow = self.allow(request.url.path) or (exc.headers or {}).get("Allow", "")
            return envelope_response(
                "METHOD_NOT_ALLOWED",
                "method not allowed",
                retriable=False,
                headers={"Allow": allow},
            )
        if exc.status_code < 500:
            return envelope_response("INVALID_PARAMS", str(exc.detail), retriable=False)
        return envelope_response("INTERNAL", "internal error", retriable=True)


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def bad_encoding(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    return envelope_response("INVALID_PARAMS", "request body is not valid UTF-8", retriable=False)


def unexpected(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    log.error("unhandled error", exc_info=exc)
    return envelope_response("INTERNAL", "internal error", retriable=True)
