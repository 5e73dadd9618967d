"""Tool calls and penalties through both doors, to a scripted vLLM-shaped engine that answers
with a tool call: the official ``openai`` SDK (whole, streamed, and the next turn with the
tool's result) and the task API (``tool_call`` frames, the trace)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from tests.api.test_openai import HELLO, wait_ready
from tests.conftest import SettingsFactory
from tests.engines.scripted import Reply, ScriptedEngine, chunk
from tests.integration.wire import Wire, config, events, serve
from tests.support import MODEL, pool

pytestmark = pytest.mark.wire

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ARGUMENTS = ['{"city": ', '"Paris"}']
CALL = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def _delta(delta: dict[str, Any], finish: str | None = None) -> str:
    return chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


# vLLM's stream of one tool call: its id and name first, then its arguments in pieces.
TOOL_CALL = Reply(
    (
        _delta({"role": "assistant"}),
        _delta(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call-1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        *(_delta({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in ARGUMENTS),
        _delta({}, "tool_calls"),
        chunk({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9}}),
        "data: [DONE]\n\n",
    )
)
HTTP_POOL = {
    "id": "vllm",
    "engine": "vllm",
    "model": MODEL,
    "health_interval_ms": 50,
    "timeouts": {"connect_ms": 300},
}


@asynccontextmanager
async def _live(settings_for: SettingsFactory) -> AsyncIterator[tuple[ScriptedEngine, Wire]]:
    """llorch with a mock pool (of another model) and a vLLM pool on the scripted engine."""
    async with ScriptedEngine([TOOL_CALL]) as fake:
        http_pool = HTTP_POOL | {"endpoints": [fake.url]}
        async with serve(
            settings_for(config(pool(id="mock", model="mock-only"), http_pool))
        ) as wire:
            await wait_ready(wire, "vllm")
            yield fake, wire


def _sdk(wire: Wire) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{wire.client.base_url}/v1", api_key="unused", max_retries=0
    )


async def _trace(wire: Wire, task_id: str) -> dict[str, Any]:
    task = await wire.wait_state(task_id, "succeeded")
    assert task["trace_artifact_id"], task
    artifact = (await wire.client.get(f"/v1/artifacts/{task['trace_artifact_id']}")).json()
    trace: dict[str, Any] = json.loads(artifact["content"])
    return trace


@pytest.mark.req("ORCH-OAI-0015", "ORCH-OAI-0016", "ORCH-OAI-0024", "ORCH-OAI-0020")
async def test_the_sdk_gets_the_engines_tool_call_whole_and_sends_back_its_result(
    settings_for: SettingsFactory,
) -> None:
    async with _live(settings_for) as (fake, wire), _sdk(wire) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=HELLO,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={"42": -100},
            max_tokens=32,
        )
        answer = raw.parse()
        message = answer.choices[0].message
        # The next turn, as an agent loop sends it: the assistant's call, the tool's result.
        turn: list[ChatCompletionMessageParam] = [
            *HELLO,
            message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": "call-1", "content": '{"sky": "clear"}'},
        ]
        await sdk.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER])
        task_id = raw.headers["x-task-id"]
        task = await wire.task(task_id)
        trace = await _trace(wire, task_id)

    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.id, call.type, call.function.name) == ("call-1", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert answer.usage is not None and answer.usage.completion_tokens == 9
    # The call was a task that ended on its tool call, with the pieces in its trace.
    assert (task["state"], task["finish_reason"], task["pool_id"]) == (
        "succeeded",
        "tool_calls",
        "vllm",
    )
    pieces = [f["data"] for f in trace["transcript"] if f["event"] == "tool_call"]
    assert "".join(p["arguments"] for p in pieces) == "".join(ARGUMENTS)
    first, second = (p.body for p in fake.posts())
    assert first["tools"] == [WEATHER]
    assert (first["tool_choice"], first["parallel_tool_calls"]) == ("required", False)
    assert (first["presence_penalty"], first["frequency_penalty"]) == (0.5, 0.25)
    assert first["logit_bias"] == {"42": -100}
    # The engine got the whole conversation back, tool call and tool result included.
    assistant, tool = second["messages"][1:]
    assert assistant["role"] == "assistant" and assistant["content"] == ""
    assert assistant["tool_calls"][0]["id"] == "call-1"
    assert assistant["tool_calls"][0]["function"]["arguments"] == "".join(ARGUMENTS)
    assert tool == {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call-1"}
    assert "tool_choice" not in second and "presence_penalty" not in second


@pytest.mark.req("ORCH-OAI-0015", "ORCH-OAI-0021", "ORCH-OAI-0024")
async def test_a_streamed_tool_call_comes_as_delta_pieces_the_sdk_joins(
    settings_for: SettingsFactory,
) -> None:
    async with _live(settings_for) as (_, wire), _sdk(wire) as sdk:
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            tools=[WEATHER],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        # The SDK's own accumulator (its `.stream()` helper) rebuilds the whole call.
        async with sdk.chat.completions.stream(
            model=MODEL, messages=HELLO, tools=[WEATHER]
        ) as helper:
            final = await helper.get_final_completion()

    *body, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 9
    pieces = [d for c in body for d in (c.choices[0].delta.tool_calls or [])]
    assert len(pieces) == 1 + len(ARGUMENTS)  # one chunk per piece, as the engine sent them
    assert (pieces[0].index, pieces[0].id, pieces[0].type) == (0, "call-1", "function")
    assert pieces[0].function is not None and pieces[0].function.name == "get_weather"
    assert all(p.id is None and p.index == 0 for p in pieces[1:])
    assert "".join((p.function.arguments or "") for p in pieces if p.function) == "".join(ARGUMENTS)
    assert [c.choices[0].finish_reason for c in body][-1] == "tool_calls"
    call = final.choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "get_weather"
    assert json.loads(call[0].function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.req("ORCH-DATA-0034", "ORCH-DATA-0050", "ORCH-ENG-0014")
async def test_the_task_api_streams_a_tool_call_as_tool_call_frames(
    settings_for: SettingsFactory,
) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "tools": [WEATHER]}
    async with _live(settings_for) as (fake, wire):
        accepted = await wire.client.post("/v1/tasks", json=body | {"tool_choice": "auto"})
        assert accepted.status_code == 202, accepted.text
        frames = await wire.read_all(accepted.json()["task_id"])
        task = await wire.task(accepted.json()["task_id"])

    named = [f for f in events(frames) if f.event in ("token", "tool_call")]
    assert [f.event for f in named] == ["tool_call"] * 3
    assert [f.payload["i"] for f in named] == [0, 1, 2]
    first = {"i": 0, "index": 0, "id": "call-1", "name": "get_weather", "arguments": ""}
    assert named[0].payload == first
    assert [f.payload["arguments"] for f in named[1:]] == ARGUMENTS
    assert all(set(f.payload) == {"i", "index", "arguments"} for f in named[1:])
    end = events(frames)[-1]
    assert (end.event, end.payload["finish_reason"]) == ("end", "tool_calls")
    assert task["finish_reason"] == "tool_calls"
    assert fake.posts()[0].body["tool_choice"] == "auto"


@pytest.mark.req("ORCH-DATA-0034", "ORCH-ENG-0009")
async def test_the_task_api_routes_tools_and_penalties_to_engines_that_serve_them(
    settings_for: SettingsFactory,
) -> None:
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    prompt = {"model": MODEL, "prompt": "p", "max_tokens": 4}
    refused = {
        "'tools' is not served for a prompt": prompt | {"tools": [WEATHER]},
        "'presence_penalty' is not served by the engine": chat
        | {"model": "mock-only", "presence_penalty": 1, "tools": [WEATHER]},
        "'tool_choice' needs 'tools'": chat | {"tool_choice": "auto"},
        "'tool_call_id' is a required property": chat
        | {"messages": [{"role": "tool", "content": "sunny"}], "tools": [WEATHER]},
        "'tool_calls' is only for assistant messages": chat
        | {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
    }
    async with _live(settings_for) as (fake, wire):
        answers = {m: await wire.client.post("/v1/tasks", json=b) for m, b in refused.items()}
        # A penalty is not chat's alone: a prompt with one goes to the engine that serves it.
        penalized = await wire.client.post("/v1/tasks", json=prompt | {"frequency_penalty": 1.5})
        assert penalized.status_code == 202, penalized.text
        await wire.wait_state(penalized.json()["task_id"], "succeeded")
        capabilities = (await wire.client.get("/v1/capabilities")).json()

    for message, answer in answers.items():
        assert answer.status_code == 400, (message, answer.text)
        assert answer.json()["code"] == "INVALID_PARAMS"
        assert answer.json()["message"].startswith(message), answer.text
    (sent,) = (p.body for p in fake.posts())  # nothing refused reached the engine
    assert (sent["prompt"], sent["frequency_penalty"]) == ("p", 1.5)
    features = {p["pool_id"]: p["features"] for p in capabilities["pools"]}
    assert features["mock"] == []
    assert set(features["vllm"]) >= {"tools", "presence_penalty", "frequency_penalty"}


def _scored(token: str, logprob: float) -> dict[str, Any]:
    alternative = {"token": token.upper(), "logprob": logprob - 1, "bytes": None}
    return {"token": token, "logprob": logprob, "bytes": None, "top_logprobs": [alternative]}


SCORED = [_scored("Par", -0.25), _scored("is", -0.5)]
SCORED_TEXT = Reply(
    (
        *(
            chunk(
                {
                    "choices": [
                        {"index": 0, "delta": {"content": e["token"]}, "logprobs": {"content": [e]}}
                    ]
                }
            )
            for e in SCORED
        ),
        _delta({}, "stop"),
        "data: [DONE]\n\n",
    )
)


@pytest.mark.req("ORCH-OAI-0017", "ORCH-DATA-0035")
async def test_logprobs_reach_the_sdk_per_chunk_and_whole(settings_for: SettingsFactory) -> None:
    async with ScriptedEngine([SCORED_TEXT]) as fake:
        http_pool = HTTP_POOL | {"endpoints": [fake.url]}
        async with serve(settings_for(config(http_pool))) as wire:
            await wait_ready(wire, "vllm")
            async with _sdk(wire) as sdk:
                whole = await sdk.chat.completions.create(
                    model=MODEL, messages=HELLO, logprobs=True, top_logprobs=1
                )
                stream = await sdk.chat.completions.create(
                    model=MODEL, messages=HELLO, logprobs=True, top_logprobs=1, stream=True
                )
                chunks = [c async for c in stream]

    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [e.model_dump() for e in logprobs.content] == SCORED
    assert whole.choices[0].message.content == "Paris"
    scored = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.delta.content for c in scored] == ["Par", "is"]
    assert [[e.model_dump() for e in c.logprobs.content or []] for c in scored if c.logprobs] == [
        [e] for e in SCORED
    ]
    assert fake.posts()[0].body["top_logprobs"] == 1
