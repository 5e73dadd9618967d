"""A smoke test with a real instruct model: SmolLM2-135M-Instruct behind a real llama.cpp server.

The random-weight models of the other engine tests prove the plumbing; this one proves that a
real model's answer to a real question comes back through llorch's chat path as readable text,
with the engine's own usage, and that llorch's metrics account for it. The model (98 MB) is
downloaded once per machine (``tests/engines/smollm2.py``); it runs ~50 tokens/s on two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import SettingsFactory
from tests.engines.llamacpp import LlamaServer
from tests.integration.wire import Wire, assert_sequenced, config, events, kinds, serve, tokens

pytestmark = [pytest.mark.llamacpp, pytest.mark.wire]

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
MAX_TOKENS = 16


async def scrape(wire: Wire) -> str:
    response = await wire.client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


def total(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    value = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                value += sample.value
    return value


@pytest.mark.timeout(180)  # the first run on a machine also downloads the model
@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002")
async def test_a_real_instruct_model_answers_a_question_through_llorch(
    smollm2: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(smollm2, n_parallel=1, n_ctx=512, threads=2) as llama:
        async with httpx.AsyncClient(base_url=llama.url, timeout=30) as engine:
            answered = await engine.post(
                "/v1/chat/completions",
                json={"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0},
            )
        assert answered.status_code == 200, answered.text
        direct: dict[str, Any] = answered.json()
        pool = {
            "id": "smollm2",
            "engine": "llamacpp",
            "model": MODEL,
            "endpoints": [llama.url],
            "health_interval_ms": 50,
        }
        async with serve(settings_for(config(pool))) as wire:
            before = await scrape(wire)
            body = {
                "model": MODEL,
                "messages": QUESTION,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            accepted = await wire.client.post("/v1/tasks", json=body)
            assert accepted.status_code == 202, accepted.text
            task_id = accepted.json()["task_id"]
            frames = await wire.read_all(task_id, timeout_s=30)
            task = await wire.task(task_id)
            after = await scrape(wire)

    answer = "".join(f.payload["t"] for f in tokens(frames))
    print(f"SmolLM2 answered {answer!r}")
    assert kinds(frames)[0] == "started"
    assert kinds(frames)[-1] == "end"
    assert_sequenced(frames)
    assert events(frames)[0].payload["replica_id"] == "smollm2-0"
    # Plausible text: printable, with words in it, and the right answer.
    assert answer.strip()
    assert answer.isprintable()
    assert sum(c.isalpha() for c in answer) >= 4
    assert "paris" in answer.lower()
    # llorch relays the engine's text as it is: the same as the engine answers directly.
    assert answer == direct["choices"][0]["message"]["content"]

    end = events(frames)[-1].payload
    # The model stopped on its own, before max_tokens.
    assert end["finish_reason"] == "stop"
    # Usage is the engine's (a count by llorch would estimate the prompt at len/4 = 13 tokens).
    usage = direct["usage"]
    assert end["tokens_in"] == usage["prompt_tokens"] > 0
    assert end["tokens_out"] == usage["completion_tokens"] > 0
    assert task["state"] == "succeeded"
    assert task["usage"]["tokens_in"] == end["tokens_in"]
    assert task["usage"]["tokens_out"] == end["tokens_out"]

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("llorch_tasks_admitted_total", pool_id="smollm2") == 1
    assert moved("llorch_tasks_started_total", pool_id="smollm2", replica_id="smollm2-0") == 1
    assert moved("llorch_tasks_finished_total", pool_id="smollm2", outcome="succeeded") == 1
    assert moved("llorch_tokens_in_total", pool_id="smollm2", model=MODEL) == end["tokens_in"]
    assert moved("llorch_tokens_out_total", pool_id="smollm2", model=MODEL) == end["tokens_out"]
    assert moved("llorch_ttft_seconds_count", pool_id="smollm2", engine="llamacpp") == 1
    assert moved("llorch_engine_errors_total", pool_id="smollm2") == 0
