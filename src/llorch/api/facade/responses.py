"""The facade's answers, read off the task's event stream: the whole completion, or its chunks.

Both watch the client: one that goes away before the answer is complete cancels its task
(``cancel``), explicitly, not in a generator's ``finally`` — for an OpenAI client, hanging up is
the only way to cancel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llorch.api.facade.errors import error_body
from llorch.api.problems import STATUS
from llorch.api.sse import SlowClientGuard
from llorch.scheduler.events import EventStream

log = logging.getLogger("llorch.streams")

HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# The statuses a task that failed after admission is answered with: the task API's status for
# its code where the contract declares it on these operations (a deadline that passed while
# queued or running is DEADLINE_UNMET's 400), else 502.
_FAILED_STATUSES = frozenset({400, 429, 502, 503})


@dataclass(frozen=True)
class Shape:
    """What every chunk and completion of one call repeats."""

    chat: bool
    task_id: str
    model: str
    created: int
    include_usage: bool = False

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.task_id

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(end: Mapping[str, Any]) -> dict[str, int]:
    tokens_in, tokens_out = int(end["tokens_in"]), int(end["tokens_out"])
    return {
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }


def completion(
    shape: Shape,
    text: str,
    end: Mapping[str, Any],
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": end["finish_reason"], "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    if shape.chat:
        # OpenAI's content is null when the model only called tools.
        content = None if tool_calls and not text else text
        choice["message"] = {"role": "assistant", "content": content}
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
    else:
        choice["text"] = text
    body = shape.head("chat.completion" if shape.chat else "text_completion")
    return body | {"choices": [choice], "usage": usage(end)}


def chunk(
    shape: Shape, text: str | None, finish_reason: str | None, logprobs: Any = None
) -> dict[str, Any]:
    """One streamed chunk; ``text`` None on the chat role chunk and on the last one; a token's
    ``logprobs`` entries when it has them."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    if shape.chat:
        if finish_reason is not None:
            choice["delta"] = {}
        else:
            choice["delta"] = {"content": text} if text is not None else {"role": "assistant"}
        body = shape.head("chat.completion.chunk")
    else:
        choice["text"] = text or ""
        body = shape.head("text_completion")
    body["choices"] = [choice]
    if shape.include_usage:
        body["usage"] = None
    return body


def tool_call_chunk(shape: Shape, piece: Mapping[str, Any]) -> dict[str, Any]:
    """A streamed piece of a tool call (a ``tool_call`` frame): ``delta.tool_calls``, with the
    call's id, type and name on its first piece (ORCH-OAI-0024)."""
    call: dict[str, Any] = {"index": piece["index"]}
    function: dict[str, Any] = {}
    if "id" in piece:
        call |= {"id": piece["id"], "type": "function"}
    if "name" in piece:
        function["name"] = piece["name"]
    call["function"] = function | {"arguments": piece["arguments"]}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None, "logprobs": None}
    body = shape.head("chat.completion.chunk") | {"choices": [choice]}
    if shape.include_usage:
        body["usage"] = None
    return body


class ToolCalls:
    """The whole tool calls of an answer, joined from its ``tool_call`` frames."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, piece: Mapping[str, Any]) -> None:
        index = int(piece["index"])
        call = self._calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if "id" in piece:
            call["id"] = str(piece["id"])
        if "name" in piece:
            call["function"]["name"] = str(piece["name"])
        call["function"]["arguments"] += str(piece["arguments"])

    def whole(self, task_id: str) -> list[dict[str, Any]]:
        """The calls in index order; one whose engine sent no id gets one from the task's."""
        calls = [self._calls[i] for i in sorted(self._calls)]
        for index, call in zip(sorted(self._calls), calls, strict=True):
            call["id"] = call["id"] or f"call-{task_id}-{index}"
        return calls


def failure(error: Mapping[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A task that ended in error after admission: status, OpenAI body and retry headers."""
    code = str(error["code"])
    status = STATUS.get(code, 502)
    status = status if status in _FAILED_STATUSES else 502
    retriable = bool(error.get("retriable"))
    headers = {"x-should-retry": "true" if retriable else "false"}
    if status in (429, 503):
        advice_ms = int(error.get("retry_after_ms") or 1000)
        headers |= {
            "Retry-After": str(max(1, -(-advice_ms // 1000))),
            "retry-after-ms": str(advice_ms),
        }
        if status == 429:
            headers["X-Backoff-Ms"] = str(advice_ms)
    return status, error_body(status, str(error.get("message", "")), code=code), headers


def _frame(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def sse_chunks(stream: EventStream, shape: Shape, heartbeat_s: float) -> AsyncIterator[bytes]:
    """The task's events as OpenAI chunks: role, one per token, the finish, usage, [DONE]."""
    async for event in stream.subscribe(heartbeat_s=heartbeat_s):
        if event is None:
            yield HEARTBEAT
        elif event.kind == "started" and shape.chat:
            yield _frame(chunk(shape, None, None))
        elif event.kind == "token":
            yield _frame(chunk(shape, str(event.data["t"]), None, event.data.get("lp")))
        elif event.kind == "tool_call" and shape.chat:
            yield _frame(tool_call_chunk(shape, event.data))
        elif event.kind == "end":
            yield _frame(chunk(shape, None, str(event.data["finish_reason"])))
            if shape.include_usage:
                yield _frame(
                    shape.head(_chunk_object(shape)) | {"choices": [], "usage": usage(event.data)}
                )
            yield DONE
        elif event.kind == "error":
            yield _frame(failure(event.data)[1])


def _chunk_object(shape: Shape) -> str:
    return "chat.completion.chunk" if shape.chat else "text_completion"


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Watched:
    """Runs ``work`` while watching the client; a client gone first runs ``cancel``.

    With a ``guard``, ``work`` writes under the slow-client rules: a client dropped for falling
    behind did not hang up, so its task runs on (ORCH-OAI-0023, as ORCH-REL-0001).
    """

    task_id: str
    cancel: Callable[[], None]
    guard: SlowClientGuard | None = None
    done: bool = field(default=False)

    async def run(self, receive: Receive, work: Awaitable[None]) -> None:
        job = asyncio.ensure_future(work)
        listen = asyncio.ensure_future(_until_disconnect(receive))
        if self.guard is not None:
            self.guard.start(job)
        try:
            await asyncio.wait({job, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self.guard is not None:
                self.guard.stop()
            for task in (job, listen):
                task.cancel()
            await asyncio.gather(job, listen, return_exceptions=True)
        if job.done() and not job.cancelled() and job.exception() is not None:
            raise job.exception()  # type: ignore[misc]
        if self.guard is not None and self.guard.slow is not None:
            self.guard.report()
            # Returning without the last body message makes the server close the connection.
            return
        if not self.done:
            log.info(
                "OpenAI client disconnected: canceling its task",
                extra={"event": "openai_disconnect_cancel", "task_id": self.task_id},
            )
            self.cancel()


class ChunkStream(Response):
    """``stream: true``: ``text/event-stream`` of OpenAI chunks."""

    def __init__(
        self,
        stream: EventStream,
        shape: Shape,
        *,
        heartbeat_s: float,
        headers: Mapping[str, str],
        cancel: Callable[[], None],
        guard: SlowClientGuard,
    ) -> None:
        super().__init__(media_type="text/event-stream", headers=dict(headers))
        # A stream has no length (Response, given no content, would declare 0).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._chunks = sse_chunks(stream, shape, heartbeat_s)
        self._guard = guard
        self._watch = _Watched(shape.task_id, cancel, guard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self._chunks:
                await self._guard.send(send, data)
            self._watch.done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self._watch.run(receive, pump())


class WholeCompletion(Response):
    """No ``stream``: the answer waits for the task's end, then is one JSON body."""

    def __init__(
        self,
        stream: EventStream,
        shape: Shape,
        *,
        headers: Mapping[str, str],
        cancel: Callable[[], None],
    ) -> None:
        super().__init__(media_type="application/json", headers=dict(headers))
        self._stream = stream
        self._shape = shape
        self._extra = dict(headers)
        self._watch = _Watched(shape.task_id, cancel)

    async def _answer(self, send: Send) -> None:
        text: list[str] = []
        logprobs: list[Any] = []
        calls = ToolCalls()
        terminal = None
        async for event in self._stream.subscribe():
            if event is None:
                continue
            if event.kind == "token":
                text.append(str(event.data["t"]))
                logprobs += event.data.get("lp", ())
            elif event.kind == "tool_call":
                calls.add(event.data)
            elif event.kind in ("end", "error"):
                terminal = event
        self._watch.done = True
        if terminal is not None and terminal.kind == "end":
            whole = calls.whole(self._shape.task_id)
            answer = completion(self._shape, "".join(text), terminal.data, whole, logprobs)
            status, body = 200, answer
            headers = self._extra
        else:
            lost = {"code": "WORKER_RESET", "message": "task events were lost", "retriable": True}
            status, body, retry = failure(terminal.data if terminal is not None else lost)
            headers = {"X-Task-Id": self._shape.task_id} | retry
        payload = orjson.dumps(body)
        reply = Response(
            payload, status_code=status, media_type="application/json", headers=headers
        )
        await send({"type": "http.response.start", "status": status, "headers": reply.raw_headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._watch.run(receive, self._answer(send))
