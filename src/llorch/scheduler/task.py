"""The task state machine and the in-memory record of a live task."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llorch.engines.base import ChatMessage, CompletionRequest
from llorch.errors import InvalidParams
from llorch.persistence import TaskRow
from llorch.scheduler.events import EventStream
from llorch.scheduler.queue import Priority
from llorch.sessions import Reservation

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "canceled",
)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELED})

Phase = Literal["queued", "dispatched", "running", "ending"]

# Every allowed transition; anything else is a bug.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class TaskRecord:
    """A task from admission until its terminal event; identity is the object."""

    row: TaskRow
    request: CompletionRequest
    priority: Priority
    reservation: Reservation
    tokens_in_estimate: int
    affinity_replica_id: str | None
    deadline_at: float | None  # loop time by which the task must end
    # Loop time by which it must have left the queue (ORCH-DATA-0097).
    wait_until: float | None = None
    # Whom the queue's round-robin counts it for (scheduler.pools.PoolRuntime.flow_for).
    flow: str = ""
    events: EventStream = field(default_factory=EventStream)
    state: str = QUEUED
    replica_id: str | None = None
    # Why placement chose its replica (scheduler.placement.Reason), once dispatched.
    placement: str | None = None
    started_ms: int | None = None
    ttft_ms: int | None = None
    # Tokens relayed so far (scheduler.engine_call), checkpointed by the dispatcher.
    tokens_out: int = 0
    # Prompt tokens the engine served from its cache, when it reports them.
    tokens_cached: int | None = None
    queue_position_at_start: int = 0
    # Times its engine refused it as busy and it went back to the queue (ORCH-ENG-0015).
    requeues: int = 0
    cancel_requested: bool = False
    # Why its run is stopped to end it WORKER_RESET rather than canceled (its instance lost
    # the database for most of a heartbeat's life, ORCH-STATE-0037).
    reset_why: str | None = None
    # Its end is decided and being written (scheduler.ending.conclude); nothing may end it again.
    ending: bool = False
    runner: asyncio.Task[None] | None = None
    # Its run has begun (scheduler.engine_call): cancelling the runner now ends the task, also
    # while it waits for an engine to accept it (phase ``dispatched``).
    calling: bool = False

    @property
    def task_id(self) -> str:
        return self.row.task_id

    @property
    def session_id(self) -> str:
        return self.row.session_id

    @property
    def pool_id(self) -> str:
        return self.row.pool_id

    @property
    def phase(self) -> Phase:
        """Where a live task is, from its state and flags:

        ======= ====== ====== ============= =====================================================
        state   runner ending phase         meaning
        ======= ====== ====== ============= =====================================================
        queued  None   False  ``queued``    in its pool's queue
        queued  set    False  ``dispatched`` on a replica slot; no engine has accepted it yet
        running set    False  ``running``   its engine call under way
        any     any    True   ``ending``    its end decided and being written (Settlement)
        ======= ====== ====== ============= =====================================================
        """
        if self.ending:
            return "ending"
        if self.state == QUEUED:
            return "queued" if self.runner is None else "dispatched"
        return "running"

    def check_move(self, state: str) -> None:
        """The one transition check: IllegalTransition unless ``state`` may follow."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"task {self.task_id}: {self.state} -> {state}")

    def move_to(self, state: str) -> None:
        self.check_move(state)
        self.state = state


def completion_request(
    task_id: str, body: Mapping[str, Any], correlation_id: str
) -> CompletionRequest:
    """The engine request of a task's (validated) body."""
    messages = body.get("messages")
    response_format = body.get("response_format")
    if response_format is not None and response_format["type"] == "text":
        response_format = None  # what every engine does anyway
    tools = tuple(body.get("tools") or ())
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none") and not tools:
        raise InvalidParams(f"'tool_choice' needs 'tools': {tool_choice!r} names no tool to call")
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise InvalidParams("'top_logprobs' needs 'logprobs': true")
    return CompletionRequest(
        task_id=task_id,
        model=body["model"],
        prompt=body.get("prompt"),
        messages=tuple(_message(m) for m in messages) if messages is not None else None,
        max_tokens=body["max_tokens"],
        seed=body.get("seed"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=tuple(body.get("stop", ())),
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.get("parallel_tool_calls"),
        presence_penalty=body.get("presence_penalty"),
        frequency_penalty=body.get("frequency_penalty"),
        logit_bias=body.get("logit_bias"),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=body.get("top_logprobs"),
        correlation_id=correlation_id,
    )


def _message(message: Mapping[str, Any]) -> ChatMessage:
    """A (validated) message; a tool result needs the call it answers, and only the
    assistant makes calls (ORCH-DATA-0034)."""
    role, call_id, calls = message["role"], message.get("tool_call_id"), message.get("tool_calls")
    if role == "tool" and call_id is None:
        raise InvalidParams("'tool_call_id' is a required property of a tool message")
    if role != "tool" and call_id is not None:
        raise InvalidParams(f"'tool_call_id' is only for tool messages, not {role!r} ones")
    if role != "assistant" and calls is not None:
        raise InvalidParams(f"'tool_calls' is only for assistant messages, not {role!r} ones")
    return ChatMessage(role, message["content"], tuple(calls or ()), call_id)
