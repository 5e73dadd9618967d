"""llorch in front of a real llama.cpp server (xllamacpp's llama-server in a subprocess).

The model is a tiny random-weight GGUF written by the session fixtures: its text is gibberish,
but at temperature 0 it is deterministic, so what llorch relays can be compared with what the
same engine answers directly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from tests.conftest import SettingsFactory
from tests.engines.llamacpp import ROOT, LlamaServer
from tests.engines.scripted import Reply, ScriptedEngine
from tests.integration.wire import (
    Wire,
    assert_sequenced,
    config,
    events,
    kinds,
    nth_token,
    rest,
    serve,
    take_until,
    tokens,
)
from tests.support import free_port

from llorch.contracts import load_config
from llorch.engines.base import EngineLoad
from llorch.engines.openai_http import OpenAIHttpEngine

pytestmark = [pytest.mark.llamacpp, pytest.mark.wire]

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Say something."}]


def llama_pool(*urls: str, **overrides: Any) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "id": "llama",
        "engine": "llamacpp",
        "model": "tiny",
        "endpoints": list(urls),
        "health_interval_ms": 50,
        # The random model may pick an end token: runs go to max_tokens.
        "extra_body": {"ignore_eos": True},
    }
    pool.update(overrides)
    return pool


async def submit(wire: Wire, **body: Any) -> dict[str, Any]:
    payload = {"model": "tiny", "max_tokens": 8, "temperature": 0, **body}
    if "messages" not in payload:
        payload.setdefault("prompt", PROMPT)
    response = await wire.client.post("/v1/tasks", json=payload)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def pool_health(wire: Wire, pool_id: str = "llama") -> dict[str, Any]:
    response = await wire.client.get(f"/v1/pools/{pool_id}/health")
    assert response.status_code == 200, response.text
    health: dict[str, Any] = response.json()
    return health


async def wait_replica_state(
    wire: Wire, replica: str, state: str, pool_id: str = "llama"
) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            health = await pool_health(wire, pool_id)
            if any(r["id"] == replica and r["state"] == state for r in health["replicas"]):
                return health
            await asyncio.sleep(0.02)


async def direct(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post(path, json={**body, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


async def engine_get(url: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get(path)
        assert response.status_code == 200, response.text
        return response.json()


async def wait_slots_idle(url: str) -> list[dict[str, Any]]:
    """llama.cpp's own view of its slots, once none of them is processing."""
    async with asyncio.timeout(10):
        while True:
            slots: list[dict[str, Any]] = await engine_get(url, "/slots")
            if not any(s["is_processing"] for s in slots):
                return slots
            await asyncio.sleep(0.02)


def text_of(frames: list[Any]) -> str:
    return "".join(f.payload["t"] for f in tokens(frames))


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002")
async def test_a_completion_streams_through_llorch_with_the_engine_usage(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(tiny_model) as llama:
        expected = await direct(llama.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
        async with serve(settings_for(config(llama_pool(llama.url)))) as wire:
            task_id = (await submit(wire, max_tokens=12))["task_id"]
            frames = await wire.read_all(task_id)
            task = await wire.task(task_id)

    assert kinds(frames)[0] == "started"
    assert kinds(frames)[-1] == "end"
    assert_sequenced(frames)
    assert events(frames)[0].payload["engine"] == "llamacpp"
    assert text_of(frames) == expected["choices"][0]["text"]
    end = events(frames)[-1].payload
    assert end["tokens_in"] == expected["usage"]["prompt_tokens"]
    assert end["tokens_out"] == expected["usage"]["completion_tokens"] == 12
    assert end["finish_reason"] == "length"
    assert task["usage"]["tokens_in"] == end["tokens_in"]
    assert task["state"] == "succeeded"


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002")
async def test_a_chat_streams_through_llorch_with_the_engine_usage(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(tiny_model) as llama:
        expected = await direct(
            llama.url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10}
        )
        async with serve(settings_for(config(llama_pool(llama.url)))) as wire:
            task_id = (await submit(wire, messages=MESSAGES, max_tokens=10))["task_id"]
            frames = await wire.read_all(task_id)

    assert kinds(frames)[-1] == "end"
    assert text_of(frames) == expected["choices"][0]["message"]["content"]
    end = events(frames)[-1].payload
    assert end["tokens_in"] == expected["usage"]["prompt_tokens"]
    assert end["tokens_out"] == expected["usage"]["completion_tokens"]


@pytest.mark.req("ORCH-ENG-0005")
async def test_cancel_mid_stream_frees_the_engine_slot(
    slow_model: Path, settings_for: SettingsFactory
) -> None:
    with LlamaServer(slow_model, n_parallel=1) as llama:
        async with serve(settings_for(config(llama_pool(llama.url)))) as wire:
            task_id = (await submit(wire, max_tokens=4000))["task_id"]
            async with wire.stream(task_id) as (_, frames):
                await take_until(frames, nth_token(3))
                busy = await engine_get(llama.url, "/slots")
                assert (await wire.cancel(task_id)).status_code == 204
                after = await rest(frames)
            idle = await wait_slots_idle(llama.url)
            # The one slot serves the next task.
            second = (await submit(wire, max_tokens=4))["task_id"]
            second_frames = await wire.read_all(second)

    assert busy[0]["is_processing"] is True
    assert idle[0]["is_processing"] is False
    assert kinds(after)[-1] == "end"
    assert events(after)[-1].payload["finish_reason"] == "canceled"
    assert events(after)[-1].payload["tokens_out"] < 4000
    assert kinds(second_frames)[-1] == "end"


@pytest.mark.req("ORCH-ENG-0020", "ORCH-ENG-0021")
async def test_two_replicas_session_affinity_then_least_loaded(
    tiny_model: Path, slow_model: Path, settings_for: SettingsFactory
) -> None:
    with (
        LlamaServer(slow_model, n_parallel=1) as slow,
        LlamaServer(tiny_model, n_parallel=1, n_ctx=768) as fast,
    ):
        props = await engine_get(fast.url, "/props")
        # One block is the whole PROMPT: the long task shares the first task's prefix.
        pool = llama_pool(slow.url, fast.url, slots_per_replica=4)
        settings = settings_for(config({**pool, "placement": {"prefix_block_chars": 16}}))
        async with serve(settings) as wire:
            await wait_replica_state(wire, "llama-1", "ready")
            health = await pool_health(wire)
            capabilities = (await wire.client.get("/v1/capabilities")).json()
            first = await submit(wire, max_tokens=4)
            session = first["session_id"]
            first_frames = await wire.read_all(first["task_id"])
            again_frames = await wire.read_all((await submit(wire, session_id=session))["task_id"])
            long_id = (await submit(wire, max_tokens=4000))["task_id"]
            async with wire.stream(long_id) as (_, long_frames):
                long_started = events(await take_until(long_frames, nth_token(1)))[0]
                moved = await submit(wire, session_id=session)
                moved_frames = await wire.read_all(moved["task_id"])
                await wire.cancel(long_id)

    # Slots, context and version come from the engines, not from slots_per_replica.
    assert [r["slots_total"] for r in health["replicas"]] == [1, 1]
    (pool,) = [p for p in capabilities["pools"] if p["pool_id"] == "llama"]
    assert pool["ctx_max"] == props["default_generation_settings"]["n_ctx"]
    assert pool["engine_version"] == props["build_info"]
    placed = [events(f)[0].payload for f in (first_frames, again_frames, moved_frames)]
    # The first task goes to either (equal loads: a random tie-break), the session stays there,
    # a new session with the same prompt follows the prefix, and with that replica full the
    # session moves to the least loaded one.
    warm = placed[0]["replica_id"]
    other = ({"llama-0", "llama-1"} - {warm}).pop()
    assert [(p["replica_id"], p["kv_warmth"], p["placement"]) for p in placed] == [
        (warm, False, "least_loaded"),
        (warm, True, "session"),
        (other, False, "least_loaded"),
    ]
    assert (long_started.payload["replica_id"], long_started.payload["placement"]) == (
        warm,
        "prefix",
    )
    assert all(kinds(f)[-1] == "end" for f in (first_frames, again_frames, moved_frames))


@pytest.mark.req("ORCH-ENG-0010", "ORCH-ENG-0011", "ORCH-ENG-0012")
async def test_a_replica_killed_mid_stream_opens_its_circuit_until_it_returns(
    tiny_model: Path, slow_model: Path, settings_for: SettingsFactory
) -> None:
    pool = llama_pool(
        breaker={"failure_threshold": 1, "cooldown_ms": 100},
        retry={"attempts": 2, "backoff_ms": 10},
        placement={"tie_break": "replica_order"},  # the first task goes to the doomed one
    )
    with LlamaServer(tiny_model, n_parallel=1) as survivor:
        doomed = LlamaServer(slow_model, n_parallel=1).start()
        try:
            pool["endpoints"] = [doomed.url, survivor.url]
            async with serve(settings_for(config(pool))) as wire:
                await wait_replica_state(wire, "llama-1", "ready")
                task_id = (await submit(wire, max_tokens=4000))["task_id"]
                async with wire.stream(task_id) as (_, frames):
                    before = await take_until(frames, nth_token(2))
                    doomed.kill()
                    after = await rest(frames)
                opened = await pool_health(wire)
                next_frames = await wire.read_all((await submit(wire))["task_id"])
                doomed.start()
                await wait_replica_state(wire, "llama-0", "ready")
                back_frames = await wire.read_all((await submit(wire))["task_id"])
                exposition = (await wire.client.get("/metrics")).text
        finally:
            doomed.stop()

    stream = before + after
    assert events(stream)[0].payload["replica_id"] == "llama-0"
    assert kinds(stream).count("error") == 1
    assert kinds(stream)[-1] == "error"
    error = events(stream)[-1].payload
    assert (error["code"], error["retriable"]) == ("WORKER_RESET", True)
    assert opened["replicas"][0]["state"] == "circuit_open"
    assert events(next_frames)[0].payload["replica_id"] == "llama-1"
    assert kinds(next_frames)[-1] == "end"
    assert events(back_frames)[0].payload["replica_id"] == "llama-0"
    assert kinds(back_frames)[-1] == "end"
    assert 'llorch_replica_breaker_state{pool_id="llama",replica_id="llama-0"} 0.0' in exposition


@pytest.mark.req("ORCH-ENG-0010")
async def test_an_engine_error_before_the_first_token_is_retried_on_another_replica(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    failing = Reply(('{"error": "overloaded"}',), status=503, content_type="application/json")
    with LlamaServer(tiny_model) as llama:
        async with ScriptedEngine([failing]) as broken:
            pool = llama_pool(
                broken.url,
                llama.url,
                retry={"attempts": 3, "backoff_ms": 10},
                placement={"tie_break": "replica_order"},  # the first try goes to the broken one
            )
            async with serve(settings_for(config(pool))) as wire:
                # The scripted engine answers on this test's loop, which the server's start-up
                # blocks: its first probe may have failed.
                await wait_replica_state(wire, "llama-0", "ready")
                await wait_replica_state(wire, "llama-1", "ready")
                task_id = (await submit(wire, max_tokens=5))["task_id"]
                frames = await wire.read_all(task_id)
                task = await wire.task(task_id)

    assert len(broken.posts()) == 1
    assert kinds(frames)[0] == "started"
    assert kinds(frames)[-1] == "end"
    assert "error" not in kinds(frames)
    assert task["replica_id"] == "llama-1"
    assert task["usage"]["tokens_out"] == 5


@pytest.mark.req("ORCH-ENG-0022")
async def test_an_engine_not_running_at_start_up_leaves_the_pool_unready(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    port = free_port()
    settings = settings_for(config(llama_pool(f"http://127.0.0.1:{port}")))
    async with serve(settings) as wire:
        health = await pool_health(wire)
        readyz = await wire.client.get("/readyz")
        refused = await wire.client.post(
            "/v1/tasks", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
        )
        with LlamaServer(tiny_model, port=port):
            await wait_replica_state(wire, "llama-0", "ready")
            frames = await wire.read_all((await submit(wire, max_tokens=4))["task_id"])

    assert health["ready"] is False
    assert health["replicas"][0]["state"] == "unready"
    # /readyz says why: the pool, its replica, and what its probe met.
    assert (readyz.status_code, readyz.json()["code"]) == (503, "NOT_READY")
    assert "pool llama: llama-0 unready" in readyz.json()["message"]
    assert "did not answer its health probe: cannot connect" in readyz.json()["message"]
    assert refused.status_code == 503
    assert refused.json()["code"] == "POOL_UNREADY"
    assert "retry-after" in refused.headers
    assert kinds(frames)[-1] == "end"


def five_line_config() -> str:
    """The fenced YAML block under the docs' "Five lines" heading, as written."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    _, found, section = text.partition("\n## Five lines:")
    assert found, "docs/configuration.md has no '## Five lines:' section"
    section = section.split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return block


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0020", "ORCH-ENG-0030")
async def test_the_five_line_config_of_the_docs_streams_through_a_llama_server(
    tiny_model: Path, tmp_path: Path
) -> None:
    snippet = five_line_config()
    pool_lines = [line for line in snippet.splitlines() if line.strip()]
    doc_url = "http://127.0.0.1:8081"
    assert len(pool_lines) <= 6
    assert doc_url in snippet
    # As the docs start it: llama-server -m model.gguf --port 8081 -np 4 (on a free port here).
    with LlamaServer(tiny_model, n_parallel=4) as llama:
        path = tmp_path / "llorch.yaml"
        path.write_text(snippet.replace(doc_url, llama.url), encoding="utf-8")
        settings = (
            load_config(path)
            .with_overrides({})
            .with_server(data_dir=str(tmp_path / "data"), profile="test")
        )
        (pool,) = settings.pools
        prompt = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        async with httpx.AsyncClient(base_url=llama.url, timeout=30) as engine:
            expected = (await engine.post("/v1/completions", json=prompt)).json()
        async with serve(settings) as wire:
            health = await wait_replica_state(wire, f"{pool.id}-0", "ready", pool.id)
            accepted = await wire.client.post("/v1/tasks", json={"model": pool.model, **prompt})
            assert accepted.status_code == 202, accepted.text
            frames = await wire.read_all(accepted.json()["task_id"])

    assert pool.engine == "llamacpp"
    # The four slots come from the server's /props, not from the configuration.
    assert [r["slots_total"] for r in health["replicas"]] == [4]
    assert events(frames)[0].payload["pool_id"] == pool.id
    assert kinds(frames)[-1] == "end"
    assert text_of(frames) == expected["choices"][0]["text"]
    assert len(tokens(frames)) == expected["usage"]["completion_tokens"] > 0


async def engine_metrics(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    pairs = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in pairs}


@pytest.mark.req("ORCH-ENG-0021", "ORCH-ENG-0040", "ORCH-ENG-0041")
async def test_two_sessions_with_one_long_system_prompt_reuse_one_replicas_cache(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    system = "You answer questions about the shipping policy, briefly and politely. " * 10
    with (
        LlamaServer(tiny_model, n_parallel=1, n_ctx=2048) as one,
        LlamaServer(tiny_model, n_parallel=1, n_ctx=2048) as two,
    ):
        settings = settings_for(config(llama_pool(one.url, two.url)))
        placed, traces = [], []
        async with serve(settings) as wire:
            await wait_replica_state(wire, "llama-1", "ready")
            for question in ("Where is my parcel?", "Can I return shoes?"):
                # A new session each time: only the system prompt links the two tasks.
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]
                task_id = (await submit(wire, messages=messages, max_tokens=2))["task_id"]
                frames = await wire.read_all(task_id)
                assert kinds(frames)[-1] == "end", kinds(frames)
                placed.append(events(frames)[0].payload)
                task = await wire.task(task_id)
                artifact = await wire.client.get(f"/v1/artifacts/{task['trace_artifact_id']}")
                traces.append(orjson.loads(artifact.json()["content"]))
        by_url = {"llama-0": one.url, "llama-1": two.url}
        warm = placed[0]["replica_id"]
        cold = ({"llama-0", "llama-1"} - {warm}).pop()
        warm_metrics = await engine_metrics(by_url[warm])
        cold_metrics = await engine_metrics(by_url[cold])

    assert [(p["replica_id"], p["placement"]) for p in placed] == [
        (warm, "least_loaded"),
        (warm, "prefix"),
    ]
    # The engine's own account: the second prompt came from the cache but for its question and
    # the chat template around it (~25 of ~540 tokens).
    first, second = (t["usage"] for t in traces)
    assert first["tokens_cached"] == 0
    assert first["tokens_in"] > 400
    assert second["tokens_cached"] >= 0.9 * second["tokens_in"], (first, second)
    assert warm_metrics["llamacpp:prompt_tokens_cached_total"] == second["tokens_cached"]
    assert cold_metrics.get("llamacpp:prompt_tokens_total", 0) == 0


@pytest.mark.req("ORCH-ENG-0008", "ORCH-OAI-0014")
async def test_a_response_format_reaches_llama_cpp_through_the_openai_door(
    tiny_model: Path, settings_for: SettingsFactory
) -> None:
    # llama.cpp turns json_object into a grammar: even the random model's text starts an object.
    shape = {"response_format": {"type": "json_object"}}
    body = {"messages": MESSAGES, "max_tokens": 8}
    with LlamaServer(tiny_model) as llama:
        expected = await direct(llama.url, "/v1/chat/completions", body | shape)
        unshaped = await direct(llama.url, "/v1/chat/completions", body)
        async with serve(settings_for(config(llama_pool(llama.url)))) as wire:
            answer = await wire.client.post(
                "/v1/chat/completions", json={"model": "tiny", "temperature": 0, **body, **shape}
            )

    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert content == expected["choices"][0]["message"]["content"]
    assert content.lstrip().startswith("{")
    assert not unshaped["choices"][0]["message"]["content"].lstrip().startswith("{")


@pytest.mark.req("ORCH-ENG-0025")
async def test_the_health_probe_reads_llama_cpps_own_slots(slow_model: Path) -> None:
    # Slots of 4,096 tokens: the other client's stream runs for tens of seconds.
    with LlamaServer(slow_model, n_parallel=2, n_ctx=8192) as llama:
        engine = OpenAIHttpEngine("llama-0", llama.url, kind="llamacpp", model="tiny", slots=2)
        try:
            assert await engine.health() is True
            idle = engine.load
            # Another client of the same server (not llorch) holds one slot.
            body = {"prompt": PROMPT, "max_tokens": 4000, "stream": True, "ignore_eos": True}
            async with (
                httpx.AsyncClient(base_url=llama.url, timeout=30) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                lines = response.aiter_lines()
                while not (await anext(lines)).startswith("data:"):
                    pass  # until it streams (closing the iterator would close the stream)
                before = await engine_get(llama.url, "/slots")
                assert await engine.health() is True
                busy = engine.load
                after = await engine_get(llama.url, "/slots")
                # The engine's own view around the probe: one slot processing throughout.
                assert [s["is_processing"] for s in before] == [s["is_processing"] for s in after]
                assert sum(s["is_processing"] for s in after) == 1
            await wait_slots_idle(llama.url)
            assert await engine.health() is True
            after = engine.load
        finally:
            await engine.close()

    assert idle == after == EngineLoad(busy_slots=0, total_slots=2)
    assert busy == EngineLoad(busy_slots=1, total_slots=2)
    # Not llorch's own task: the other client's slot counts on top of llorch's count.
    assert busy.fraction(2, busy_now=1, busy_then=0) == 1.0
