"""The one calling convention every engine adapter speaks.

An engine replica streams a completion as an async iterator: one :class:`Accepted` once the engine
has taken the request (an HTTP engine: its 200 answer's head), then :class:`Token` chunks (and
:class:`ToolCallDelta` pieces of the tool calls it makes), then exactly one :class:`Finish`. Tokens
and pieces that arrived together (an HTTP engine's network read) may come as one list of them
(:data:`Outputs`): the caller relays them in one step, each still its own frame. An
engine that refuses the request raises before ``Accepted``. Cancel is asyncio cancellation of the
consuming task: an adapter closes its connection to the engine when the iterator is closed or
cancelled. Engines raise only
:class:`llorch.errors.EngineError` subclasses.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

# Request features beyond text generation that an engine may serve (``Engine.features``); a task
# that needs one is placed only on a pool whose engine serves it.
RESPONSE_FORMAT = "response_format"
TOOLS = "tools"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
LOGIT_BIAS = "logit_bias"
LOGPROBS = "logprobs"
# Those that only a chat (messages) can ask for.
CHAT_FEATURES = frozenset({RESPONSE_FORMAT, TOOLS, LOGPROBS})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # OpenAI's tool_calls of an assistant message, as the contract's ToolCall objects.
    tool_calls: tuple[dict[str, Any], ...] = ()
    # The call a tool message answers.
    tool_call_id: str | None = None

    @property
    def uses_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)


@dataclass(frozen=True)
class CompletionRequest:
    task_id: str
    model: str
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    max_tokens: int
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's response_format (json_object / json_schema), never {"type": "text"}.
    response_format: dict[str, Any] | None = None
    # OpenAI's tools (function definitions), tool_choice and parallel_tool_calls, sent as they are.
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # None (or {}) when the task did not ask: a neutral value needs nothing of the engine.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # OpenAI's chat logprobs: each token's log-probability, and its top_logprobs alternatives.
    logprobs: bool = False
    top_logprobs: int | None = None
    correlation_id: str = ""

    @property
    def features(self) -> frozenset[str]:
        """The engine features this request needs."""
        needs = {
            RESPONSE_FORMAT: self.response_format is not None,
            TOOLS: bool(self.tools) or any(m.uses_tools for m in self.messages or ()),
            PRESENCE_PENALTY: bool(self.presence_penalty),
            FREQUENCY_PENALTY: bool(self.frequency_penalty),
            LOGIT_BIAS: bool(self.logit_bias),
            LOGPROBS: self.logprobs,
        }
        return frozenset(name for name, needed in needs.items() if needed)


def prompt_bytes(request: CompletionRequest) -> int:
    """The prompt's UTF-8 bytes, with 8 for the markers a chat template puts around a message."""
    if request.prompt is not None:
        return len(request.prompt.encode())
    messages = request.messages or ()
    size = sum(len(m.content.encode()) + 8 for m in messages)
    # Tool definitions and calls are rendered into the prompt too (their JSON bounds them).
    calls = [c for m in messages for c in m.tool_calls]
    return size + sum(_json_bytes(item) for item in (*request.tools, *calls))


def _json_bytes(item: dict[str, Any]) -> int:
    # The standard library's encoder: a client's JSON may hold integers beyond 64 bits.
    return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode())


def estimate_tokens_in(request: CompletionRequest) -> int:
    """The typical prompt size (4 bytes a token): for context limits, and the count of a prompt
    whose engine did not report one (a task that ended before its engine counted it, or an
    engine that sends no usage)."""
    return max(1, math.ceil(prompt_bytes(request) / 4))


def bound_tokens_in(request: CompletionRequest) -> int:
    """The most prompt tokens an engine can count, for reservations: a byte-level tokenizer
    (BPE over UTF-8 bytes, SentencePiece with byte fallback) makes at most a token a byte, and
    8 more cover the begin/end markers."""
    return prompt_bytes(request) + 8


@dataclass(frozen=True)
class Accepted:
    """The engine took the request: what follows is its completion (ORCH-ENG-0015)."""


@dataclass(frozen=True)
class Token:
    text: str
    # With logprobs asked for: OpenAI's ``logprobs.content`` entries of the chunk's tokens
    # (``token``, ``logprob``, ``bytes``, ``top_logprobs``), as the engine sent them.
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a tool call the engine streams (OpenAI's ``delta.tool_calls[]``): ``index``
    says which call; its first piece carries the call's ``id`` and function ``name``, every
    piece a part of its ``arguments``."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Finish:
    finish_reason: FinishReason
    tokens_in: int
    tokens_out: int
    # False when the engine sent no usage and llorch counted what it streamed.
    usage_reported: bool = True
    # Prompt tokens the engine took from its cache instead of evaluating them (OpenAI's
    # usage.prompt_tokens_details.cached_tokens), when it says.
    tokens_cached: int | None = None


Output = Token | ToolCallDelta
# Outputs that arrived together, never empty: one step of the iterator for all of them costs a
# relayed token ~0.4 µs less than a step each (bench/NOTES.md).
Outputs = list[Output]
Chunk = Accepted | Token | ToolCallDelta | Outputs | Finish


@dataclass(frozen=True)
class EngineLoad:
    """What an engine says about its own load, as its health probe last read it (ORCH-ENG-0025):
    llama.cpp ``/slots``, vLLM ``/metrics``. A field the engine does not report is None."""

    busy_slots: int | None = None  # llama.cpp slots processing; vLLM requests running
    total_slots: int | None = None
    waiting: int | None = None  # requests queued inside the engine (vLLM)
    kv_cache_usage: float | None = None  # 0..1 (vLLM)

    def fraction(self, slots: int, *, busy_now: int = 0, busy_then: int = 0) -> float | None:
        """The engine's load as a share of ``slots`` (its own count of them when it reports
        one), above 1 when requests queue inside it; None when it reports nothing.

        The reading is as old as the last probe: of its busy slots, the ``busy_then`` that were
        llorch's own are counted as llorch's count is now (``busy_now``), so a slot llorch freed
        since is free, and only the others' work (other clients) is added to it.
        """
        total = max(1, self.total_slots or slots)
        parts = []
        if self.busy_slots is not None:
            others = max(0, self.busy_slots - busy_then)
            parts.append((busy_now + others) / total)
        if self.kv_cache_usage is not None:
            parts.append(self.kv_cache_usage)
        if not parts and self.waiting is None:
            return None
        return max(parts, default=0.0) + (self.waiting or 0) / total


class Engine(Protocol):
    """One replica of an inference engine."""

    replica_id: str
    engine: str
    # What the engine reports about itself; a health probe may update both.
    version: str
    context_size: int | None  # tokens per slot, None when the engine does not say
    # Request features it serves beyond text generation (e.g. RESPONSE_FORMAT).
    features: frozenset[str]
    # Its own load, read by its health probe; None when it reports none (ORCH-ENG-0025).
    load: EngineLoad | None

    @property
    def slots(self) -> int:
        """How many completions this replica runs at once (it may learn it from the engine)."""
        ...

    async def health(self) -> bool:
        """True when the replica can take work; also refreshes what the engine reports
        (slots, context size, version) where it reports them. An engine that cannot be
        reached raises :class:`llorch.errors.EngineError`, whose message says why."""
        ...

    def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        """Stream one completion: ``Accepted``, ``Token``\\ s (and ``ToolCallDelta``\\ s), then
        one ``Finish``."""
        ...

    async def close(self) -> None: ...
