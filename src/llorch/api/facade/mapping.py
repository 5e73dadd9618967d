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
_CHAT_NEUTRAL: dict[str, object] = {
    "n": 1,
    "tools": [],
    "tool_choice": "none",
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_COMPLETION_NEUTRAL: dict[str, object] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "suffix": "",
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
# `logprobs` of a completion is a count: any value asks for something llorch does not return.
_COMPLETION_NEVER = ("logprobs",)
# Why a field is refused, where it is not only "not at its default" (ORCH-OAI-0015).
_WHY = {
    name: f"{name} is not supported by this server: a task's stream carries text only, so a "
    "tool call the engine made could not reach the client"
    for name in ("tools", "tool_choice")
}

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
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in body["messages"]
    ]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    task = {
        "model": body["model"],
        "messages": messages,
        "max_tokens": max_tokens or max_tokens_out,
    }
    # Passed on: admission places it on a pool whose engine serves it, or refuses it naming it.
    if body.get("response_format") is not None:
        task["response_format"] = body["response_format"]
    return _finish(task, body, knobs, tier=body.get("service_tier"))


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
            raise Refusal(name, _WHY.get(name, why))
