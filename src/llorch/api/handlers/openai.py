"""Handlers of the OpenAI-compatible front door (`.specs/openai.md`).

Each chat or completion call is admitted as a task through the same ``scheduler.admit`` as
``POST /v1/tasks`` and answered off the task's event stream; the facade translates shapes and
errors and owns no queue, budget or engine logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from connexion import request
from starlette.responses import Response

from llorch.api import views
from llorch.api.auth import caller
from llorch.api.facade import mapping
from llorch.api.facade.errors import error_body
from llorch.api.facade.responses import ChunkStream, Shape, WholeCompletion
from llorch.api.middleware import correlation_id
from llorch.api.runtime import Runtime

Reply = tuple[Any, int, dict[str, str]]

log = logging.getLogger("llorch.tasks")


def _refused(status: int, message: str, *, code: str, param: str | None) -> Reply:
    body = error_body(status, message, code=code, param=param)
    return body, status, {"Content-Type": "application/json", "x-should-retry": "false"}


class OpenAIHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def _models(self) -> dict[str, int]:
        """Every served model and the largest max_tokens_out of a pool serving it."""
        served: dict[str, int] = {}
        for pool in self._rt.scheduler.capabilities():
            served[pool.model] = max(served.get(pool.model, 0), pool.max_tokens_out)
        return served

    async def list_models(self) -> Reply:
        data = [_model(name) for name in sorted(self._models())]
        return {"object": "list", "data": data}, 200, {}

    async def get_model(self, model: str) -> Reply:
        if model not in self._models():
            return _not_found(model)
        return _model(model), 200, {}

    async def create_chat_completion(self, body: dict[str, Any]) -> Reply | Response:
        models = self._models()
        if body["model"] not in models:
            return _not_found(body["model"])
        knobs = mapping.knobs_from(request.headers)
        return await self._run(
            lambda: mapping.chat_task(body, knobs, models[body["model"]]), chat=True
        )

    async def create_completion(self, body: dict[str, Any]) -> Reply | Response:
        if body["model"] not in self._models():
            return _not_found(body["model"])
        knobs = mapping.knobs_from(request.headers)
        return await self._run(lambda: mapping.completion_task(body, knobs), chat=False)

    async def _run(self, mapper: Callable[[], mapping.Mapped], *, chat: bool) -> Reply | Response:
        try:
            mapped = mapper()
        except mapping.Refusal as refusal:
            return _refused(400, refusal.message, code="unsupported_parameter", param=refusal.param)
        scheduler = self._rt.scheduler
        admission = await scheduler.admit_when_free(mapped.task, correlation_id.get(), caller())
        task_id = admission.task_id
        _record(task_id, mapped)
        headers = {"X-Task-Id": task_id} | views.budget_headers(admission.remaining)
        shape = Shape(
            chat=chat,
            task_id=task_id,
            model=mapped.task["model"],
            created=int(time.time()),
            include_usage=mapped.include_usage,
        )
        stream = await scheduler.fetch_stream(task_id)

        def cancel() -> None:
            scheduler.cancel(task_id)

        if mapped.stream:
            headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return ChunkStream(
                stream,
                shape,
                heartbeat_s=self._rt.settings.server.heartbeat_s,
                headers=headers,
                cancel=cancel,
                guard=self._rt.slow_client_guard(stream, task_id, framing="openai"),
            )
        return WholeCompletion(stream, shape, headers=headers, cancel=cancel)


def _record(task_id: str, mapped: mapping.Mapped) -> None:
    """The end user the client named (``user`` / ``safety_identifier``), in the task's log."""
    extra: Mapping[str, Any] = {
        "event": "openai_call",
        "task_id": task_id,
        "user": mapped.user,
        "safety_identifier": mapped.safety_identifier,
        "stream": mapped.stream,
    }
    log.info("OpenAI call admitted as task", extra=dict(extra))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llorch"}


def _not_found(model: str) -> Reply:
    body = error_body(404, f"model {model!r} does not exist", code="model_not_found", param="model")
    return body, 404, {"Content-Type": "application/json", "x-should-retry": "false"}
