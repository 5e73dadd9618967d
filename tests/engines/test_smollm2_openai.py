"""The SmolLM2 smoke test through the OpenAI door: the official ``openai`` SDK, pointed at llorch
instead of the engine, gets a real model's answer, and the call is a task of the task API.

Same model, server and question as ``test_smollm2.py`` (which asks through ``POST /v1/tasks``).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from tests.conftest import SettingsFactory
from tests.engines.llamacpp import LlamaServer
from tests.engines.test_smollm2 import MAX_TOKENS, MODEL, QUESTION
from tests.integration.wire import config, serve

pytestmark = [pytest.mark.llamacpp, pytest.mark.wire]

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": message["content"]} for message in QUESTION
]


@pytest.mark.timeout(180)  # the first run on a machine also downloads the model
@pytest.mark.req("ORCH-ENG-0002", "ORCH-OAI-0010", "ORCH-OAI-0020", "ORCH-OAI-0021")
async def test_the_openai_sdk_gets_a_real_models_answer_through_llorch(
    smollm2: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(smollm2, n_parallel=1, n_ctx=512, threads=2) as llama:
        async with httpx.AsyncClient(base_url=llama.url, timeout=30) as engine:
            answered = await engine.post(
                "/v1/chat/completions",
                json={"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0},
            )
        assert answered.status_code == 200, answered.text
        direct = answered.json()
        pool = {
            "id": "smollm2",
            "engine": "llamacpp",
            "model": MODEL,
            "endpoints": [llama.url],
            "health_interval_ms": 50,
        }
        async with serve(settings_for(config(pool))) as wire:
            sdk = openai.AsyncOpenAI(
                base_url=f"{wire.client.base_url}/v1", api_key="unused", max_retries=0
            )
            whole = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
            )
            completion = whole.parse()
            streamed = await sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in streamed]
            task = await wire.task(whole.headers["x-task-id"])
            await sdk.close()

    answer = completion.choices[0].message.content or ""
    print(f"SmolLM2 answered {answer!r} through the OpenAI door")
    assert "paris" in answer.lower()
    # The door relays the engine's text and usage as they are.
    assert answer == direct["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == direct["usage"]["completion_tokens"]
    # Streamed, token by token, the same answer; the last chunk carries the usage.
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == direct["usage"]["completion_tokens"]
    # The call was a task: it shows in the task API, with the engine's usage.
    assert task["state"] == "succeeded"
    assert task["usage"]["tokens_out"] == direct["usage"]["completion_tokens"]


@pytest.mark.timeout(180)
@pytest.mark.req("ORCH-OAI-0017", "ORCH-ENG-0014", "ORCH-DATA-0035")
async def test_a_real_models_logprobs_reach_the_sdk_through_llorch(
    smollm2: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(smollm2, n_parallel=1, n_ctx=512, threads=2) as llama:
        pool = {
            "id": "smollm2",
            "engine": "llamacpp",
            "model": MODEL,
            "endpoints": [llama.url],
            "health_interval_ms": 50,
        }
        async with serve(settings_for(config(pool))) as wire:
            sdk = openai.AsyncOpenAI(
                base_url=f"{wire.client.base_url}/v1", api_key="unused", max_retries=0
            )
            whole = await sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=6,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            streamed = await sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=6,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
                stream=True,
            )
            chunks = [chunk async for chunk in streamed]
            await sdk.close()

    text = whole.choices[0].message.content or ""
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    # One entry per generated token, whose texts make the answer, each with its alternatives.
    assert "".join(e.token for e in logprobs.content) == text
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in logprobs.content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in logprobs.content)
    # Streamed, the same tokens, each chunk with its own.
    pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    entries = [p.logprobs.content if p.logprobs else None for p in pieces]
    assert all(entries)
    streamed_tokens = [e.token for content in entries for e in content or []]
    assert streamed_tokens == [e.token for e in logprobs.content]
