"""``GET /v1/tasks/{task_id}/stream`` served below connexion's middleware stack.

An open event stream is an open request. Through connexion it holds, for as long as it stays
open, a coroutine frame and a wrapped ``send`` in each of some fifteen layers (exceptions,
swagger UI, three nested routers, security, request and response validation, context,
lifespan), and every frame it writes passes through every wrapper: at 10,000 open streams
that was the largest share of the memory a stream held besides the allocator's own, and
relaying a streamed task spent more CPU in those layers than in its handler.

:class:`StreamRoute` sits just inside :class:`~llorch.api.middleware.EdgeMiddleware` (so the
correlation id, the request metric, the request log line and the body limit are unchanged) and
answers the requests it can prove connexion would accept: ``GET``, a task id that satisfies the
contract's ``Id`` pattern, no query string, no body, at most one ``Last-Event-ID`` that satisfies
its pattern (both patterns read from ``data.yaml``). It authenticates with the same
:meth:`~llorch.api.auth.AuthKeys.authenticate` connexion's security middleware calls, builds the
same response with the same function as the connexion handler
(:func:`~llorch.api.handlers.tasks.event_stream_response`), and turns every error into the
envelope with the same error handlers. Every other request goes on to connexion unchanged, which
refuses it as before (400, 401, 405, ...); since it authenticates first there, as connexion
does, a refused request is never authenticated twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llorch.api import problems
from llorch.api.auth import scope_caller
from llorch.api.handlers.tasks import event_stream_response
from llorch.api.runtime import Runtime
from llorch.contracts import openapi
from llorch.errors import LlorchError

__all__ = ["StreamRoute", "contract_patterns", "event_stream_response"]

OPERATION_ID = "streamTask"
_TEMPLATE = "/v1/tasks/{task_id}/stream"


def _ref(document: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        found: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def contract_patterns(document: Mapping[str, Any]) -> tuple[str, str]:
    """The patterns of the operation's ``task_id`` and ``Last-Event-ID`` in the contract."""
    item = document["paths"][_TEMPLATE]
    operation = item["get"]
    assert operation["operationId"] == OPERATION_ID, "the contract moved the event stream"
    patterns: dict[str, str] = {}
    for parameter in (*item.get("parameters", ()), *operation.get("parameters", ())):
        parameter = _ref(document, parameter)
        patterns[parameter["name"]] = _ref(document, parameter["schema"])["pattern"]
    return patterns["task_id"], patterns["Last-Event-ID"]


def _response(answer: Any) -> Response:
    """A connexion error handler's answer as the Starlette response connexion makes of it."""
    return Response(
        content=answer.body,
        status_code=answer.status_code,
        media_type=answer.mimetype,
        headers=answer.headers,
    )


class StreamRoute:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self._rt = runtime
        task_id, last_event_id = contract_patterns(openapi("data"))
        # As connexion validates: jsonschema's ``pattern`` is re.search; Starlette's path
        # parameter is ``[^/]+``.
        self._task_id = re.compile(task_id)
        self._last_event_id = re.compile(last_event_id)
        self._path = re.compile(r"^/v1/tasks/([^/]+)/stream$")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope) if scope["type"] == "http" else None
        if matched is None:
            await self.app(scope, receive, send)
            return
        task_id, last_event_id = matched
        note = scope.get("llorch.operation")
        if note is not None:
            note["operation_id"] = OPERATION_ID
        try:
            who = scope_caller(self._rt.auth, scope, OPERATION_ID)
            response: Response = await event_stream_response(self._rt, task_id, who, last_event_id)
        except LlorchError as exc:
            response = _response(problems.domain_error(None, exc))
        except Exception as exc:  # as connexion's handler of Exception: the envelope, logged
            response = _response(problems.unexpected(None, exc))
        await response(scope, receive, send)

    def _match(self, scope: Scope) -> tuple[str, str | None] | None:
        """(task id, Last-Event-ID) of a request connexion would pass to the handler as it is;
        None for anything else."""
        if scope["method"] != "GET" or scope["query_string"]:
            return None
        path = self._path.match(scope["path"])
        if path is None or self._task_id.search(path.group(1)) is None:
            return None
        last_event_id = None
        for key, value in scope["headers"]:
            if key == b"last-event-id":
                if last_event_id is not None:
                    return None
                last_event_id = value.decode("latin-1")
                if self._last_event_id.search(last_event_id) is None:
                    return None
            elif key == b"transfer-encoding" or (key == b"content-length" and value != b"0"):
                return None
        return path.group(1), last_event_id
