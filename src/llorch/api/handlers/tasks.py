"""Handlers of the task operations."""

from __future__ import annotations

from typing import Any

from connexion import request

from llorch.api import sse, views
from llorch.api.auth import caller
from llorch.api.middleware import correlation_id
from llorch.api.runtime import Runtime
from llorch.scheduler.caller import Caller

Reply = tuple[Any, int, dict[str, str]]


class TaskHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def create_task(self, body: dict[str, Any]) -> Reply:
        admission = await self._rt.scheduler.admit_when_free(body, correlation_id.get(), caller())
        headers = {"Location": f"/v1/tasks/{admission.task_id}"}
        headers |= views.budget_headers(admission.remaining)
        return views.admission_body(admission), 202, headers

    async def list_tasks(
        self,
        session_id: str | None = None,
        state: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Reply:
        await self._rt.scheduler.durable()  # no end shown before it is durable and published
        page = await self._rt.scheduler.tasks(
            session_id=session_id, state=state, limit=limit, cursor=cursor, caller=caller()
        )
        return views.task_page(page), 200, {}

    async def get_task(self, task_id: str) -> Reply:
        await self._rt.scheduler.durable()  # no end shown before it is durable and published
        return views.task_view(await self._rt.scheduler.task(task_id, caller())), 200, {}

    async def cancel_task(self, task_id: str) -> Reply:
        await self._rt.scheduler.row(task_id, caller())  # TaskNotFound for another key's task
        # A queued task's end is committed at once: answered when it is durable and published;
        # another instance's task, once the cancel is recorded and sent to it.
        await self._rt.scheduler.cancel_durably(task_id)
        return None, 204, {}

    async def stream_task(self, task_id: str) -> sse.EventStreamResponse:
        # The common case never comes here: api.stream_route serves it below connexion's stack.
        return await event_stream_response(
            self._rt, task_id, caller(), request.headers.get("last-event-id")
        )


async def event_stream_response(
    runtime: Runtime, task_id: str, who: Caller, last_event_id: str | None
) -> sse.EventStreamResponse:
    """The answer to ``GET /v1/tasks/{task_id}/stream`` for a validated request (connexion's
    handler above and :mod:`llorch.api.stream_route` both answer with it); TaskNotFound unless
    ``who`` may see the task."""
    scheduler = runtime.scheduler
    opened = await scheduler.open_stream(task_id, who)
    stream = opened.events
    after = int(last_event_id) if last_event_id is not None else None
    if after is not None and stream.closed:
        # A resume at or past an ended task's terminal frame gets that frame again: an empty
        # 200 would make a browser EventSource reconnect for ever. Live tasks are not touched.
        after = min(after, stream.events[-1].seq - 1)
    headers = views.budget_headers(await scheduler.fetch_remaining(opened.row.session_id))
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    server = runtime.settings.server
    return sse.EventStreamResponse(
        stream,
        task_id=task_id,
        after=after,
        heartbeat_s=server.heartbeat_s,
        metrics=runtime.metrics,
        guard=runtime.slow_client_guard(stream, task_id),
        headers=headers,
        on_disconnect=(lambda: scheduler.cancel(task_id)) if server.cancel_on_disconnect else None,
    )
