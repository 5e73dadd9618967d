"""OpenAI request bodies → llorch task bodies: what is mapped, what is refused (`.specs/openai.md`).

The body has passed the contract (``OaiChatRequest`` / ``OaiCompletionRequest``: unknown fields
are already a 400 there). Here a field llorch declares but does not serve is refused, naming it,
unless it holds the value that changes nothing; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Fields refused unless absent, null or this value (which is OpenAI's default behaviour).
_CHAT_NEUTRAL: dict[str, object] = {"n": 1}
_COMPLETION_NEUTRAL: dict[str, object] = {"n": 1, "best_of": 1, "echo": False, "suffix": ""}
# `logprobs` of a completion is a count: any value asks for something llorch does not return.
_COMPLETION_NEVER = ("logprobs",)
# Passed on to the task unless at their neutral value (0, {}): admission places the task on a
# pool whose engine serves them, or refuses it naming the field (ORCH-OAI-0016).
_STEERING = ("presence_penalty", "frequency_penalty", "logit_bias")

# OpenAI's service tiers → llorch's priorities.
_TIERS = {
    "auto": "interactive",
    "default": "interactive",
    "priority": "interactive",
    "flex": "batch",
}

# OpenAI's default max_tokens of a (legacy) completion.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Refusal(Exception):
    """A field the facade does not serve: a 400 naming it in ``param``."""

    param: str
    message: str


@dataclass(frozen=True)
class Knobs:
    """llorch's own request headers (``X-Llorch-Priority``, ``X-Session-Id``, ...)."""

    priority: str | None = None
    session_id: str | None = None
    deadline_ms: int | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class Mapped:
    task: dict[str, Any]
    stream: bool
    include_usage: bool
    # Recorded in the task's log line, not sent to the engine.
    user: str | None
    safety_identifier: str | None


def knobs_from(headers: Mapping[str, str]) -> Knobs:
    deadline = headers.get("x-deadline-ms")
    return Knobs(
        priority=headers.get("x-llorch-priority"),
        session_id=headers.get("x-session-id"),
        deadline_ms=int(deadline) if deadline is not None else None,
        task_id=headers.get("x-task-id"),
    )


def chat_task(body: Mapping[str, Any], knobs: Knobs, max_tokens_out: int) -> Mapped:
    _refuse_unserved(body, _CHAT_NEUTRAL, ())
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    task = {
        "model": body["model"],
        "messages": [_message(m) for m in body["messages"]],
        "max_tokens": max_tokens or max_tokens_out,
    }
    # Passed on: admission places the task on a pool whose engine serves them, or refuses it
    # naming the field (a tool_choice without tools too).
    if body.get("response_format") is not None:
        task["response_format"] = body["response_format"]
    if body.get("tools"):
        task["tools"] = body["tools"]
        if body.get("parallel_tool_calls") is not None:  # else it changes nothing
            task["parallel_tool_calls"] = body["parallel_tool_calls"]
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and ("tools" in task or tool_choice != "none"):
        task["tool_choice"] = tool_choice
    if body.get("logprobs"):
        task["logprobs"] = True
    if body.get("top_logprobs") is not None and (body.get("logprobs") or body["top_logprobs"]):
        task["top_logprobs"] = body["top_logprobs"]  # without logprobs: refused by admission
    return _finish(task, body, knobs, tier=body.get("service_tier"))


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A chat message of the task: ``developer`` is ``system``; ``content`` may be null only
    beside an assistant's ``tool_calls`` (the task's is then empty)."""
    content = message.get("content")
    if content is None and not (message["role"] == "assistant" and message.get("tool_calls")):
        raise Refusal("messages", "a message's content may be null only beside its tool_calls")
    role = "system" if message["role"] == "developer" else message["role"]
    mapped: dict[str, Any] = {"role": role, "content": content or ""}
    for name in ("tool_calls", "tool_call_id"):
        if message.get(name) is not None:
            mapped[name] = message[name]
    return mapped


def completion_task(body: Mapping[str, Any], knobs: Knobs) -> Mapped:
    _refuse_unserved(body, _COMPLETION_NEUTRAL, _COMPLETION_NEVER)
    max_tokens = body.get("max_tokens") or COMPLETION_DEFAULT_MAX_TOKENS
    task = {"model": body["model"], "prompt": body["prompt"], "max_tokens": max_tokens}
    return _finish(task, body, knobs, tier=None)


def _finish(
    task: dict[str, Any], body: Mapping[str, Any], knobs: Knobs, *, tier: str | None
) -> Mapped:
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            task[name] = body[name]
    task |= {name: body[name] for name in _STEERING if body.get(name)}
    stop = body.get("stop")
    if stop is not None:
        task["stop"] = [stop] if isinstance(stop, str) else list(stop)
    priority = knobs.priority or (_TIERS[tier] if tier is not None else None)
    if priority is not None:
        task["priority"] = priority
    optional = {
        "session_id": knobs.session_id,
        "deadline_ms": knobs.deadline_ms,
        "task_id": knobs.task_id,
    }
    task |= {k: v for k, v in optional.items() if v is not None}
    options = body.get("stream_options") or {}
    return Mapped(
        task=task,
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
        user=body.get("user"),
        safety_identifier=body.get("safety_identifier"),
    )


def _refuse_unserved(
    body: Mapping[str, Any], neutral: Mapping[str, object], never: tuple[str, ...]
) -> None:
    for name, value in body.items():
        if value is None:
            continue
        if name in never or (name in neutral and value != neutral[name]):
            why = f"{name} is not supported by this server other than at its default"
            raise Refusal(name, why)
