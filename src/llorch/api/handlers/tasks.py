"""Handlers of the task operations."""

from __future__ import annotations

from typing import Any

from connexion import request

from llorch.api import sse
from llorch.api.auth import caller, principal
from llorch.api.middleware import correlation_id
from llorch.api.runtime import Runtime, format_cost

Reply = tuple[Any, int, dict[str, str]]


class TaskHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def create_task(self, body: dict[str, Any]) -> Reply:
        admission = self._rt.scheduler.admit(body, correlation_id.get(), caller())
        left = admission.remaining
        headers = {
            "Location": f"/v1/tasks/{admission.task_id}",
            "X-Budget-Tokens-Remaining": str(left.tokens),
            "X-Budget-Time-Remaining-Ms": str(left.time_ms),
            "X-Budget-Cost-Remaining": format_cost(left.cost),
        }
        reply = {
            "task_id": admission.task_id,
            "session_id": admission.session_id,
            "state": admission.state,
            "pool_id": admission.pool_id,
            "queue_position": admission.queue_position,
            "predicted_start_ms": admission.predicted_start_ms,
            "backoff_ms": admission.backoff_ms,
            "streams": {"sse": f"/v1/tasks/{admission.task_id}/stream"},
        }
        return reply, 202, headers

    async def list_tasks(
        self,
        session_id: str | None = None,
        state: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Reply:
        page = self._rt.scheduler.tasks(
            session_id=session_id,
            state=state,
            limit=limit,
            cursor=cursor,
            visible_to=principal().visible_owner,
        )
        return page, 200, {}

    async def get_task(self, task_id: str) -> Reply:
        self._rt.check_task_visible(principal(), task_id)
        return self._rt.scheduler.task(task_id), 200, {}

    async def cancel_task(self, task_id: str) -> Reply:
        self._rt.check_task_visible(principal(), task_id)
        self._rt.scheduler.cancel(task_id)
        return None, 204, {}

    async def stream_task(self, task_id: str) -> sse.EventStreamResponse:
        self._rt.check_task_visible(principal(), task_id)
        scheduler = self._rt.scheduler
        view = scheduler.task(task_id)
        stream = scheduler.stream(task_id)
        last = request.headers.get("last-event-id")
        after = int(last) if last is not None else None
        if after is not None and stream.closed:
            # A resume at or past an ended task's terminal frame gets that frame again: an empty
            # 200 would make a browser EventSource reconnect for ever. Live tasks are not touched.
            after = min(after, stream.events[-1].seq - 1)
        headers = self._rt.budget_headers(view["session_id"])
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        server = self._rt.settings.server
        return sse.EventStreamResponse(
            stream,
            task_id=task_id,
            after=after,
            heartbeat_s=server.heartbeat_s,
            metrics=self._rt.metrics,
            guard=self._rt.slow_client_guard(stream, task_id),
            headers=headers,
            on_disconnect=(lambda: scheduler.cancel(task_id))
            if server.cancel_on_disconnect
            else None,
        )
