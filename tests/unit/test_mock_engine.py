"""MockEngine: deterministic text, exactly one Finish, pacing, and injected failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from llorch.config import FailureMode, FailureSettings, MockSettings, PoolSettings
from llorch.engines import build_engines
from llorch.engines.base import Accepted, ChatMessage, Chunk, CompletionRequest, Finish, Token
from llorch.engines.mock import MockEngine, count_tokens
from llorch.errors import EngineError, WorkerReset
from tests.unit.helpers import completion, stream_all

FAST = MockSettings(ttft_ms=0, tokens_per_s=0)


def engine(
    *, settings: MockSettings = FAST, mode: FailureMode = "none", after_tokens: int = 0
) -> MockEngine:
    failure = FailureSettings(mode=mode, after_tokens=after_tokens)
    return MockEngine("default-0", settings=settings, slots=2, failure=failure)


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks if isinstance(c, Token)]


def finishes(chunks: list[Chunk]) -> list[Finish]:
    return [c for c in chunks if isinstance(c, Finish)]


@pytest.mark.req("ORCH-DATA-0090")
async def test_the_same_seed_and_prompt_stream_the_same_tokens() -> None:
    request = completion(prompt="once upon a time", seed=42, max_tokens=32)

    first = await stream_all(engine(), request)
    second = await stream_all(MockEngine("other-7", settings=FAST, slots=1), request)

    assert first == second
    assert len(texts(first)) > 0


@pytest.mark.req("ORCH-DATA-0090")
async def test_another_seed_or_prompt_streams_other_tokens() -> None:
    base = await stream_all(engine(), completion(prompt="once upon a time", seed=42))
    other_seed = await stream_all(engine(), completion(prompt="once upon a time", seed=43))
    other_prompt = await stream_all(engine(), completion(prompt="once upon a tide", seed=42))

    assert texts(base) != texts(other_seed)
    assert texts(base) != texts(other_prompt)


@pytest.mark.req("ORCH-DATA-0090")
async def test_chat_messages_are_a_prompt_too() -> None:
    request = CompletionRequest(
        task_id="t-1",
        model="mock-small",
        prompt=None,
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hello there")),
        max_tokens=6,
        seed=1,
    )

    chunks = await stream_all(engine(), request)

    assert chunks == await stream_all(engine(), request)
    # "system: be brief" and "user: hello there", one token per word.
    assert finishes(chunks) == [Finish("length", tokens_in=6, tokens_out=6)]


@pytest.mark.req("ORCH-DATA-0050")
async def test_a_stream_ends_with_exactly_one_finish_at_max_tokens() -> None:
    request = completion(prompt="tell me a story", max_tokens=5)

    chunks = await stream_all(engine(), request)

    assert [type(c) for c in chunks] == [Accepted] + [Token] * 5 + [Finish]
    assert chunks[-1] == Finish("length", tokens_in=count_tokens("tell me a story"), tokens_out=5)
    pieces = texts(chunks)
    assert not pieces[0].startswith(" ")
    assert all(p.startswith(" ") for p in pieces[1:])


async def test_a_stream_shorter_than_max_tokens_ends_with_stop() -> None:
    chunks = await stream_all(engine(), completion(max_tokens=4096))

    finish = chunks[-1]
    assert isinstance(finish, Finish)
    assert finish.finish_reason == "stop"
    assert finish.tokens_out == len(chunks) - 2 < 4096  # Accepted, the tokens, Finish
    assert len(finishes(chunks)) == 1


async def test_a_stop_sequence_ends_the_stream_before_it_with_reason_stop() -> None:
    free = texts(await stream_all(engine(), completion(max_tokens=64, seed=3)))
    assert len(free) >= 8
    stop = (free[5] + free[6]).strip()  # a phrase the text reaches by its seventh token

    chunks = await stream_all(engine(), completion(max_tokens=64, seed=3, stop=(stop,)))

    pieces = texts(chunks)
    emitted = "".join(pieces)
    assert chunks[-1] == Finish("stop", tokens_in=4, tokens_out=len(pieces))
    assert len(finishes(chunks)) == 1
    assert pieces == free[: len(pieces)]
    assert stop not in emitted
    # It stopped at the first token that completes the stop sequence, not earlier.
    assert stop in emitted + free[len(pieces)]
    assert len(pieces) <= 6


async def test_without_eos_a_completion_always_runs_to_max_tokens() -> None:
    no_eos = engine(settings=MockSettings(ttft_ms=0, tokens_per_s=0, eos=False))

    chunks = await stream_all(no_eos, completion(max_tokens=600))

    assert chunks[-1] == Finish("length", tokens_in=4, tokens_out=600)
    assert len(texts(chunks)) == 600


@pytest.mark.req("ORCH-DATA-0091")
async def test_failure_before_the_first_token_is_an_engine_error() -> None:
    chunks: list[Chunk] = []

    with pytest.raises(EngineError) as caught:
        async for chunk in engine(mode="before_first_token").stream(completion()):
            chunks.append(chunk)

    assert chunks == [Accepted()]  # it took the request, then failed
    assert type(caught.value) is EngineError
    assert (caught.value.code, caught.value.retriable) == ("ENGINE_ERROR", True)
    assert caught.value.engine == "mock"


@pytest.mark.req("ORCH-DATA-0091", "ORCH-DATA-0033")
async def test_failure_mid_stream_is_a_worker_reset_after_n_tokens() -> None:
    chunks: list[Chunk] = []

    with pytest.raises(WorkerReset) as caught:
        async for chunk in engine(mode="mid_stream", after_tokens=3).stream(
            completion(max_tokens=10)
        ):
            chunks.append(chunk)

    assert [type(c) for c in chunks] == [Accepted] + [Token] * 3
    assert (caught.value.code, caught.value.retriable) == ("WORKER_RESET", True)


@pytest.mark.req("ORCH-DATA-0091", "ORCH-DATA-0032")
async def test_a_hanging_replica_goes_silent_after_n_tokens() -> None:
    chunks = engine(mode="hang", after_tokens=2).stream(completion(max_tokens=10))
    received: list[Chunk] = []
    try:
        async with asyncio.timeout(1):
            received.append(await anext(chunks))
            received.append(await anext(chunks))
            received.append(await anext(chunks))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await anext(chunks)
    finally:
        await chunks.aclose()

    assert [type(c) for c in received] == [Accepted, Token, Token]


@pytest.mark.req("ORCH-DATA-0091")
async def test_a_down_replica_is_unhealthy_and_refuses_work() -> None:
    down = engine(mode="down")

    assert await down.health() is False
    assert await engine().health() is True
    with pytest.raises(EngineError):
        await stream_all(down, completion())


@pytest.mark.req("ORCH-DATA-0091")
async def test_failures_apply_only_to_the_configured_replicas() -> None:
    pool = PoolSettings(
        id="p",
        replicas=3,
        slots_per_replica=4,
        mock=MockSettings(failure=FailureSettings(mode="down", replicas=(1,))),
    )

    engines = build_engines(pool)

    assert [e.replica_id for e in engines] == ["p-0", "p-1", "p-2"]
    assert [e.slots for e in engines] == [4, 4, 4]
    assert [await e.health() for e in engines] == [True, False, True]


@pytest.mark.req("ORCH-DATA-0091")
async def test_tokens_are_paced_by_tokens_per_s() -> None:
    paced = engine(settings=MockSettings(ttft_ms=0, tokens_per_s=200))
    request = completion(max_tokens=20, seed=11)

    started = time.monotonic()
    chunks = await stream_all(paced, request)
    elapsed = time.monotonic() - started

    assert chunks[-1] == Finish("length", tokens_in=4, tokens_out=20)
    # Twenty tokens at 200/s: the last one is due 19 intervals (95 ms) after the first.
    assert elapsed >= 0.09


@pytest.mark.req("ORCH-DATA-0091")
async def test_the_first_token_waits_for_ttft() -> None:
    slow_start = engine(settings=MockSettings(ttft_ms=60, tokens_per_s=0))
    chunks = slow_start.stream(completion(max_tokens=3))

    started = time.monotonic()
    try:
        assert isinstance(await anext(chunks), Accepted)  # at once: the wait is the first token's
        first = await anext(chunks)
    finally:
        await chunks.aclose()
    waited = time.monotonic() - started

    assert isinstance(first, Token)
    assert waited >= 0.055
