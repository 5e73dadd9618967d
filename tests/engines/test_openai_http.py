"""The OpenAI-compatible adapter against a scripted engine on a real socket: the shapes and
failures a llama.cpp server cannot be made to show."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from tests.conftest import SettingsFactory
from tests.engines.scripted import Reply, ScriptedEngine, chunk, completion_chunks
from tests.integration.wire import config, events, kinds, serve
from tests.support import free_port

from llorch.engines.base import (
    Accepted,
    ChatMessage,
    Chunk,
    CompletionRequest,
    EngineLoad,
    Finish,
    Token,
    ToolCallDelta,
    bound_tokens_in,
)
from llorch.engines.openai_http import OpenAIHttpEngine
from llorch.errors import (
    DecodeTimeout,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineStatusError,
    EngineUnavailable,
    WorkerReset,
)

DONE = "data: [DONE]\n\n"


def request(**overrides: object) -> CompletionRequest:
    fields: dict[str, object] = {
        "task_id": "t-1",
        "model": "m",
        "prompt": "hello there",
        "messages": None,
        "max_tokens": 3,
        "correlation_id": "corr-1",
    }
    fields.update(overrides)
    return CompletionRequest(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def adapter(url: str, **kwargs: object) -> AsyncIterator[OpenAIHttpEngine]:
    options: dict[str, object] = {"kind": "vllm", "model": "served", "slots": 2}
    options.update(kwargs)
    engine = OpenAIHttpEngine("r-0", url, **options)  # type: ignore[arg-type]
    try:
        yield engine
    finally:
        await engine.close()


async def flat(stream: AsyncIterator[Chunk], into: list[Chunk]) -> None:
    """The chunks of ``stream`` into ``into``, the outputs of one read (a list) one by one."""
    async for c in stream:
        if isinstance(c, list):
            assert c, "a list of outputs is never empty"
            into += c
        else:
            into.append(c)


async def collect(engine: OpenAIHttpEngine, req: CompletionRequest) -> list[Chunk]:
    """The chunks of a stream after the ``Accepted`` that opens every stream the engine took."""
    chunks: list[Chunk] = []
    await flat(engine.stream(req), chunks)
    assert chunks[:1] == [Accepted()], chunks
    return chunks[1:]


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002", "ORCH-ENG-0007")
async def test_a_completion_streams_with_the_engine_usage_and_the_request_fields() -> None:
    script = [Reply((*completion_chunks(["a", "b", "c"], usage=(7, 3)), DONE))]
    async with ScriptedEngine(script) as fake, adapter(fake.url, api_key="s3cret") as engine:
        chunks = await collect(engine, request(seed=5, temperature=0.0, top_p=0.9, stop=("x",)))

    assert chunks == [Token("a"), Token("b"), Token("c"), Finish("length", 7, 3)]
    (post,) = fake.posts()
    assert post.path == "/v1/completions"
    assert post.body["model"] == "served"
    assert post.body["prompt"] == "hello there"
    assert post.body["stream"] is True
    assert post.body["stream_options"] == {"include_usage": True}
    assert (post.body["max_tokens"], post.body["seed"], post.body["temperature"]) == (3, 5, 0.0)
    assert post.body["top_p"] == 0.9
    assert post.body["stop"] == ["x"]
    assert "response_format" not in post.body
    assert post.headers["x-correlation-id"] == "corr-1"
    assert post.headers["authorization"] == "Bearer s3cret"


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002")
async def test_chat_deltas_with_usage_in_a_last_chunk_without_choices() -> None:
    # vLLM / llama.cpp chat: a role-only first delta, content deltas, then usage on its own.
    parts = [
        chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}),
        chunk({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
        chunk({"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]}),
        chunk({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}),
        DONE,
    ]
    messages = (ChatMessage("user", "hello"),)
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        chunks = await collect(engine, request(prompt=None, messages=messages))

    assert chunks == [Token("Hi"), Token("!"), Finish("stop", 9, 2)]
    (post,) = fake.posts()
    assert post.path == "/v1/chat/completions"
    assert post.body["messages"] == [{"role": "user", "content": "hello"}]
    assert "top_p" not in post.body


SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True},
}


@pytest.mark.req("ORCH-ENG-0008", "ORCH-ENG-0009")
@pytest.mark.parametrize(("kind", "serves"), [("vllm", True), ("llamacpp", True), ("tgi", False)])
async def test_a_response_format_is_sent_unchanged_and_engines_say_whether_they_serve_it(
    kind: str, serves: bool
) -> None:
    parts = [
        chunk({"choices": [{"index": 0, "delta": {"content": "{}"}, "finish_reason": "stop"}]}),
        DONE,
    ]
    messages = (ChatMessage("user", "a city as JSON"),)
    async with (
        ScriptedEngine([Reply(tuple(parts))]) as fake,
        adapter(fake.url, kind=kind) as engine,
    ):
        assert ("response_format" in engine.features) == serves
        chunks = await collect(
            engine, request(prompt=None, messages=messages, response_format=SCHEMA)
        )

    assert chunks[0] == Token("{}")
    (post,) = fake.posts()
    assert post.body["response_format"] == SCHEMA


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def tool_delta(call: dict[str, Any], finish: str | None = None) -> str:
    delta = {"tool_calls": [call]}
    return chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@pytest.mark.req("ORCH-ENG-0014", "ORCH-ENG-0009")
@pytest.mark.parametrize(("kind", "serves"), [("vllm", True), ("llamacpp", True), ("tgi", False)])
async def test_tool_calls_are_sent_and_their_streamed_pieces_relayed_in_order(
    kind: str, serves: bool
) -> None:
    # vLLM's shape: a call's first piece has its id and name, the next ones more arguments.
    parts = [
        chunk({"choices": [{"index": 0, "delta": {"content": "Let me see."}}]}),
        tool_delta(
            {"index": 0, "id": "call-1", "type": "function", "function": {"name": "get_weather"}}
        ),
        tool_delta({"index": 0, "function": {"arguments": '{"city": '}}),
        tool_delta({"index": 0, "function": {"arguments": '"Paris"}'}}),
        # llama.cpp's: a whole call at once, without index.
        tool_delta({"id": "call-2", "function": {"name": "get_time", "arguments": "{}"}}),
        chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        chunk({"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12}}),
        DONE,
    ]
    call = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = (
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="c0"),
    )
    asked = request(
        prompt=None,
        messages=messages,
        tools=(WEATHER,),
        tool_choice="auto",
        parallel_tool_calls=False,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100.0},
    )
    async with (
        ScriptedEngine([Reply(tuple(parts))]) as fake,
        adapter(fake.url, kind=kind) as engine,
    ):
        features = {"tools", "presence_penalty", "frequency_penalty", "logit_bias"}
        assert features & engine.features == (features if serves else set())
        chunks = await collect(engine, asked)

    assert asked.features == features
    assert chunks == [
        Token("Let me see."),
        ToolCallDelta(0, "", "call-1", "get_weather"),
        ToolCallDelta(0, '{"city": '),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallDelta(0, "{}", "call-2", "get_time"),
        Finish("tool_calls", 30, 12),
    ]
    (post,) = fake.posts()
    assert post.body["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c0"},
    ]
    assert (post.body["tools"], post.body["tool_choice"]) == ([WEATHER], "auto")
    assert post.body["parallel_tool_calls"] is False
    assert (post.body["presence_penalty"], post.body["frequency_penalty"]) == (0.5, -0.5)
    assert post.body["logit_bias"] == {"42": -100.0}


@pytest.mark.req("ORCH-ENG-0014", "ORCH-ENG-0003")
@pytest.mark.parametrize(
    "calls",
    [
        {"index": 0, "function": {"arguments": 7}},
        {"index": "0", "function": {"arguments": "{}"}},
        {"index": 0, "function": "get_weather"},
        "get_weather",
        {"index": 0, "id": "c", "function": {"arguments": "{}"}},  # a call that names nothing
    ],
)
async def test_a_malformed_tool_call_piece_is_a_protocol_error(calls: Any) -> None:
    parts = [chunk({"choices": [{"index": 0, "delta": {"tool_calls": [calls]}}]}), DONE]
    messages = (ChatMessage("user", "weather?"),)
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        with pytest.raises(EngineProtocolError, match="malformed chunk"):
            await collect(engine, request(prompt=None, messages=messages, tools=(WEATHER,)))


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    # llama.cpp's entry: OpenAI's, with the token id beside it.
    return {"id": 7, "token": token, "bytes": list(token.encode()), "logprob": logprob}


@pytest.mark.req("ORCH-ENG-0014", "ORCH-DATA-0035")
async def test_logprobs_are_asked_for_and_relayed_with_each_chunks_text() -> None:
    first = _logprob("Hi", -0.5) | {"top_logprobs": [_logprob("Hi", -0.5), _logprob("Yo", -1.5)]}
    parts = [
        chunk(
            {
                "choices": [
                    {"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [first]}}
                ]
            }
        ),
        chunk({"choices": [{"index": 0, "delta": {"content": "!"}, "logprobs": None}]}),
        chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        DONE,
    ]
    asked = request(
        prompt=None, messages=(ChatMessage("user", "x"),), logprobs=True, top_logprobs=2
    )
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        assert "logprobs" in engine.features
        chunks = await collect(engine, asked)

    assert asked.features == {"logprobs"}
    assert chunks[:2] == [Token("Hi", (first,)), Token("!")]
    (post,) = fake.posts()
    assert (post.body["logprobs"], post.body["top_logprobs"]) == (True, 2)


@pytest.mark.req("ORCH-ENG-0014", "ORCH-ENG-0003")
@pytest.mark.parametrize(
    "logprobs",
    [
        {"content": [{"token": "Hi"}]},
        {"content": [{"token": 1, "logprob": -1}]},
        {"content": "Hi"},
        [],
    ],
)
async def test_malformed_logprobs_are_a_protocol_error(logprobs: Any) -> None:
    delta = {"index": 0, "delta": {"content": "Hi"}, "logprobs": logprobs}
    parts = [chunk({"choices": [delta]}), DONE]
    asked = request(prompt=None, messages=(ChatMessage("user", "x"),), logprobs=True)
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        with pytest.raises(EngineProtocolError, match="malformed chunk"):
            await collect(engine, asked)


@pytest.mark.req("ORCH-ENG-0014")
async def test_a_tool_schema_with_an_integer_beyond_64_bits_is_sent_as_it_is() -> None:
    huge = {"type": "function", "function": {"name": "f", "parameters": {"maximum": 2**70}}}
    parts = [_content_chunk("ok", "stop"), DONE]
    messages = (ChatMessage("user", "x"),)
    asked = request(prompt=None, messages=messages, tools=(huge,))
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        chunks = await collect(engine, asked)

    assert chunks[0] == Token("ok")
    assert fake.posts()[0].body["tools"] == [huge]
    assert bound_tokens_in(asked) > len(str(2**70))  # the tool counts toward the prompt


def _content_chunk(text: str, finish: str | None = None) -> str:
    return chunk({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


@pytest.mark.req("ORCH-ENG-0014", "ORCH-ENG-0004")
async def test_a_failure_after_a_tool_call_piece_is_a_worker_reset() -> None:
    parts = [tool_delta({"index": 0, "id": "c", "function": {"name": "get_weather"}})]
    messages = (ChatMessage("user", "weather?"),)
    async with (
        ScriptedEngine([Reply(tuple(parts), end="reset")]) as fake,
        adapter(fake.url) as engine,
    ):
        with pytest.raises(WorkerReset, match="after 1 tokens"):
            await collect(engine, request(prompt=None, messages=messages, tools=(WEATHER,)))


@pytest.mark.req("ORCH-ENG-0014")
async def test_a_task_without_tools_sends_no_tool_fields_and_neutral_penalties_need_nothing() -> (
    None
):
    parts = [*completion_chunks(["a"], finish="stop"), DONE]
    quiet = request(tool_choice="none", parallel_tool_calls=True, presence_penalty=0.0)
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url) as engine:
        await collect(engine, quiet)

    assert quiet.features == frozenset()
    (post,) = fake.posts()
    assert not {"tools", "tool_choice", "parallel_tool_calls", "logit_bias"} & set(post.body)


@pytest.mark.req("ORCH-ENG-0002", "ORCH-ENG-0003")
async def test_keep_alive_comments_are_ignored_and_missing_usage_is_counted() -> None:
    # TGI-like: keep-alive comments, event/id lines, no usage anywhere.
    parts = [
        ": keep-alive\n\n",
        chunk({"choices": [{"index": 0, "delta": {"content": "one"}, "finish_reason": None}]}),
        ":\n",
        "event: message\nid: 7\n",
        chunk({"choices": [{"index": 0, "delta": {"content": " two"}, "finish_reason": None}]}),
        ": ping\n\n",
        chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "eos_token"}]}),
        DONE,
    ]
    messages = (ChatMessage("user", "x" * 40),)
    async with ScriptedEngine([Reply(tuple(parts))]) as fake, adapter(fake.url, kind="tgi") as eng:
        chunks = await collect(eng, request(prompt=None, messages=messages, max_tokens=10))

    assert chunks[:2] == [Token("one"), Token(" two")]
    finish = chunks[2]
    assert isinstance(finish, Finish)
    assert (finish.finish_reason, finish.tokens_out, finish.usage_reported) == ("stop", 2, False)
    assert finish.tokens_in >= 1


@pytest.mark.req("ORCH-ENG-0003")
async def test_a_stream_without_done_is_an_error_even_when_it_finished() -> None:
    script = [Reply(tuple(completion_chunks(["a"], usage=(1, 1))))]
    async with ScriptedEngine(script) as fake, adapter(fake.url) as engine:
        with pytest.raises(WorkerReset) as caught:
            await collect(engine, request())

    assert isinstance(caught.value.__cause__, EngineProtocolError)
    assert "[DONE]" in caught.value.message


@pytest.mark.req("ORCH-ENG-0003", "ORCH-ENG-0004")
@pytest.mark.parametrize(
    "reply",
    [
        Reply(()),  # a 200 with an empty body
        Reply(("data: {not json\n\n", DONE)),
        Reply(('data: {"choices": [{"text": 5}]}\n\n', DONE)),
        Reply(('{"choices": []}',), content_type="application/json"),
    ],
    ids=["empty-body", "not-json", "wrong-type", "not-a-stream"],
)
async def test_protocol_errors_before_the_first_token(reply: Reply) -> None:
    async with ScriptedEngine([reply]) as fake, adapter(fake.url) as engine:
        with pytest.raises(EngineProtocolError) as caught:
            await collect(engine, request())

    assert caught.value.retriable is True
    assert caught.value.engine == "vllm"


@pytest.mark.req("ORCH-ENG-0004")
@pytest.mark.parametrize(
    ("status", "error", "retriable"),
    [(429, EngineStatusError, True), (503, EngineStatusError, True), (400, EngineRejected, False)],
)
async def test_error_statuses(status: int, error: type[Exception], retriable: bool) -> None:
    reply = Reply(('{"error": "nope"}',), status=status, content_type="application/json")
    async with ScriptedEngine([reply]) as fake, adapter(fake.url) as engine:
        with pytest.raises(EngineStatusError) as caught:
            await collect(engine, request())

    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.retriable is retriable
    assert "nope" in caught.value.message


@pytest.mark.req("ORCH-ENG-0004")
async def test_an_unreachable_engine_is_unavailable_with_the_cause_kept() -> None:
    async with adapter(f"http://127.0.0.1:{free_port()}") as engine:
        with pytest.raises(EngineUnavailable) as caught:
            await collect(engine, request())
        with pytest.raises(EngineUnavailable) as probed:
            await engine.health()

    assert caught.value.__cause__ is not None
    assert "did not answer its health probe: cannot connect" in probed.value.message


@pytest.mark.req("ORCH-ENG-0004")
async def test_a_connection_dropped_mid_stream_is_a_worker_reset() -> None:
    parts = completion_chunks(["a", "b"])[:2]
    async with ScriptedEngine([Reply(tuple(parts), end="reset")]) as fake, adapter(fake.url) as e:
        seen: list[Chunk] = []
        with pytest.raises(WorkerReset) as caught:
            await flat(e.stream(request()), seen)

    assert seen == [Accepted(), Token("a"), Token("b")]
    assert caught.value.retriable is True
    assert caught.value.__cause__ is not None


@pytest.mark.req("ORCH-ENG-0004")
async def test_an_error_object_mid_stream_ends_as_a_worker_reset() -> None:
    parts = (*completion_chunks(["a"])[:1], chunk({"error": {"message": "out of memory"}}), DONE)
    async with ScriptedEngine([Reply(parts)]) as fake, adapter(fake.url) as engine:
        with pytest.raises(WorkerReset) as caught:
            await collect(engine, request())

    assert "out of memory" in caught.value.message


async def wait_ready(wire: Any, pool_id: str) -> None:
    """Until the pool's scripted engine passed a health probe."""
    async with asyncio.timeout(20):
        # The scripted engine runs on this loop, which the server's start-up blocks.
        while not (await wire.client.get(f"/v1/pools/{pool_id}/health")).json()["ready"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def wait_replicas_ready(wire: Any, pool_id: str, count: int) -> None:
    """Until ``count`` replicas of the pool passed a health probe."""
    async with asyncio.timeout(20):
        while True:
            health = (await wire.client.get(f"/v1/pools/{pool_id}/health")).json()
            if sum(r["state"] == "ready" for r in health["replicas"]) >= count:
                return
            await asyncio.sleep(0.02)


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0006")
@pytest.mark.parametrize(
    ("parts", "code", "said"),
    [
        ((": still loading\n\n",), "DECODE_TIMEOUT", "no first token"),
        (tuple(completion_chunks(["a"])[:1]), "DECODE_TIMEOUT", "no output"),
    ],
    ids=["no-first-token", "silent-after-a-token"],
)
async def test_the_schedulers_first_token_and_idle_limits_hold_for_an_http_engine(
    settings_for: SettingsFactory, parts: tuple[str, ...], code: str, said: str
) -> None:
    async with ScriptedEngine([Reply(parts, end="hang")]) as fake:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [fake.url],
            "health_interval_ms": 50,
            "decode_timeout_ms": 200,
            "timeouts": {"connect_ms": 300, "first_token_ms": 200},
            "retry": {"attempts": 1},
        }
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            accepted = await wire.client.post(
                "/v1/tasks", json={"model": "small", "prompt": "hello", "max_tokens": 4}
            )
            assert accepted.status_code == 202, accepted.text
            frames = await wire.read_all(accepted.json()["task_id"])

    error = events(frames)[-1]
    assert error.event == "error" and error.payload["code"] == code, error
    assert said in error.payload["message"]


@pytest.mark.req("ORCH-ENG-0006")
async def test_the_total_time_limit_holds_while_tokens_keep_coming() -> None:
    parts = tuple(completion_chunks(["a"] * 400)[:-1])  # ~1 ms apart, never finishing
    async with (
        ScriptedEngine([Reply(parts, end="hang")]) as fake,
        adapter(fake.url, total_timeout_s=0.1) as engine,
    ):
        with pytest.raises(DecodeTimeout) as caught:
            await collect(engine, request(max_tokens=1000))

    assert "total time limit" in caught.value.message


@pytest.mark.req("ORCH-ENG-0005")
async def test_closing_the_stream_closes_the_connection_to_the_engine() -> None:
    parts = tuple(completion_chunks(["a", "b"])[:2])
    async with ScriptedEngine([Reply(parts, end="hang")]) as fake, adapter(fake.url) as engine:
        stream = engine.stream(request())
        assert await anext(stream) == Accepted()
        first = await anext(stream)
        assert isinstance(first, list) and first[0] == Token("a")
        await stream.aclose()
        async with asyncio.timeout(5):
            await fake.disconnected.wait()

    assert fake.disconnected.is_set()


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0007")
async def test_llorch_sends_the_correlation_id_and_the_key_from_the_environment(
    settings_for: SettingsFactory,
) -> None:
    script = [Reply((*completion_chunks(["Hi", "!"], usage=(4, 2)), DONE))]
    async with ScriptedEngine(script) as fake:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "served_model": "org/Small-Instruct",
            "endpoints": [fake.url],
            "api_key_env": "TEST_VLLM_KEY",
            "health_interval_ms": 50,
            # A probe sent while start-up blocks this loop waits this long for its answer.
            "timeouts": {"connect_ms": 300},
        }
        settings = settings_for(config(pool)).with_overrides({"TEST_VLLM_KEY": "k-from-env"})
        async with serve(settings) as wire:
            await wait_ready(wire, "vllm")
            accepted = await wire.client.post(
                "/v1/tasks",
                json={"model": "small", "prompt": "hello", "max_tokens": 2},
                headers={"X-Correlation-Id": "corr-engine-7"},
            )
            assert accepted.status_code == 202, accepted.text
            frames = await wire.read_all(accepted.json()["task_id"])

    assert kinds(frames)[-1] == "end"
    assert events(frames)[0].payload["correlation_id"] == "corr-engine-7"
    (post,) = fake.posts()
    assert post.headers["x-correlation-id"] == "corr-engine-7"
    assert post.body["model"] == "org/Small-Instruct"
    # Every request to the engine, health probes included, carries the key as a bearer token.
    assert {s.headers.get("authorization") for s in fake.seen} == {"Bearer k-from-env"}


def _vllm_completion() -> list[str]:
    # vLLM /v1/completions with include_usage: "usage": null until a last chunk with no choices.
    base = {"id": "cmpl-7f", "object": "text_completion", "created": 1, "model": "served"}
    return [
        *(
            chunk(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                        }
                    ],
                    "usage": None,
                }
            )
            for text, finish in ((" Par", None), ("is", None), (".", "length"))
        ),
        chunk(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 6, "total_tokens": 9, "completion_tokens": 3},
            }
        ),
        DONE,
    ]


def _tgi_chat() -> list[str]:
    # TGI (3.x) chat: every delta carries the role, "usage": null, then a usage-only chunk.
    base = {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 1,
        "model": "served",
        "system_fingerprint": "3.0.1-native",
    }
    deltas = [(" Par", None), ("is", None), (".", "length")]
    return [
        *(
            chunk(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": None,
                }
            )
            for text, finish in deltas
        ),
        chunk(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9},
            }
        ),
        DONE,
    ]


@pytest.mark.req("ORCH-ENG-0001", "ORCH-ENG-0002")
@pytest.mark.parametrize(
    ("kind", "parts", "chat"),
    [("vllm", _vllm_completion(), False), ("tgi", _tgi_chat(), True)],
    ids=["vllm-completion", "tgi-chat"],
)
async def test_vllm_and_tgi_chunks_as_they_send_them(
    kind: str, parts: list[str], chat: bool
) -> None:
    req = request(prompt=None, messages=(ChatMessage("user", "capital?"),)) if chat else request()
    async with (
        ScriptedEngine([Reply(tuple(parts))]) as fake,
        adapter(fake.url, kind=kind) as engine,
    ):
        chunks = await collect(engine, req)

    assert chunks == [Token(" Par"), Token("is"), Token("."), Finish("length", 6, 3)]
    (post,) = fake.posts()
    assert post.path == ("/v1/chat/completions" if chat else "/v1/completions")


@pytest.mark.req("ORCH-ENG-0004")
async def test_a_connection_dropped_before_the_first_token_is_retriable_not_a_reset() -> None:
    # The engine answers 200 then drops the connection: nothing was relayed, so the task may
    # be retried (a WORKER_RESET would end it).
    async with ScriptedEngine([Reply((), end="reset")]) as fake, adapter(fake.url) as engine:
        with pytest.raises(EngineError) as caught:
            await collect(engine, request())

    assert isinstance(caught.value, EngineProtocolError | EngineUnavailable)
    assert caught.value.retriable is True


@pytest.mark.req("ORCH-ENG-0001")
async def test_streams_one_after_another_reuse_one_connection() -> None:
    # An HTTP/1.1 engine that keeps connections alive and ends each response with the chunked
    # encoding's last chunk, as uvicorn, llama.cpp and vLLM do; it counts connections.
    connections = 0
    parts = [*completion_chunks(["a", "b"], usage=(2, 2)), DONE]
    body = "".join(f"{len(p.encode()):x}\r\n{p}\r\n" for p in parts) + "0\r\n\r\n"
    response = (
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        "transfer-encoding: chunked\r\n\r\n" + body
    ).encode()

    closed: list[asyncio.Event] = []

    async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        done = asyncio.Event()
        closed.append(done)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed its connection
        finally:
            writer.close()
            await writer.wait_closed()
            done.set()

    server = await asyncio.start_server(serve_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with adapter(f"http://127.0.0.1:{port}") as engine:
            first = await collect(engine, request())
            second = await collect(engine, request())
        async with asyncio.timeout(5):  # the adapter closed: every connection ends
            await asyncio.gather(*(c.wait() for c in closed))

    assert first == second == [Token("a"), Token("b"), Finish("length", 2, 2)]
    assert connections == 1


@pytest.mark.req("ORCH-ENG-0040")
async def test_a_llamacpp_engine_is_asked_to_keep_its_prompt_cache() -> None:
    script = [Reply((*completion_chunks(["a"], usage=(2, 1)), DONE))] * 3
    async with ScriptedEngine(script) as fake:
        async with adapter(fake.url, kind="llamacpp") as engine:
            await collect(engine, request())
        async with adapter(fake.url, kind="llamacpp", extra_body={"cache_prompt": False}) as off:
            await collect(off, request())
        async with adapter(fake.url, kind="vllm") as other:
            await collect(other, request())

    asked = [post.body.get("cache_prompt") for post in fake.posts()]
    # The pool's extra_body may turn it off; other engines do not know the field.
    assert asked == [True, False, None]


@pytest.mark.req("ORCH-ENG-0041")
async def test_the_engines_cached_prompt_tokens_are_kept_when_it_reports_them() -> None:
    def usage(details: object) -> str:
        last = {
            "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "prompt_tokens_details": details},
        }
        return chunk(last)

    script = [
        Reply((*completion_chunks(["a"]), usage({"cached_tokens": 7}), DONE)),
        Reply((*completion_chunks(["a"]), usage({"cached_tokens": "many"}), DONE)),
        Reply((*completion_chunks(["a"], usage=(9, 1)), DONE)),
    ]
    async with ScriptedEngine(script) as fake, adapter(fake.url, kind="llamacpp") as engine:
        finishes = [(await collect(engine, request()))[-1] for _ in script]

    assert [f.tokens_cached for f in finishes if isinstance(f, Finish)] == [7, None, None]


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0013", "ORCH-ENG-0015")
@pytest.mark.parametrize("status", [429, 503])
async def test_an_engine_that_says_it_is_busy_keeps_its_circuit_closed(
    settings_for: SettingsFactory, status: int
) -> None:
    busy = Reply(
        ('{"error": "too many requests"}',), status=status, content_type="application/json"
    )
    async with ScriptedEngine([busy]) as fake:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [fake.url],
            "health_interval_ms": 50,
            "timeouts": {"connect_ms": 300},
            "retry": {"attempts": 1, "requeues": 1, "backoff_ms": 10},
            "breaker": {"failure_threshold": 1},
        }
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            for _ in range(2):  # the second one reaches the engine too: no circuit opened
                accepted = await wire.client.post(
                    "/v1/tasks", json={"model": "small", "prompt": "hello", "max_tokens": 4}
                )
                assert accepted.status_code == 202, accepted.text
                frames = await wire.read_all(accepted.json()["task_id"])
                # Never accepted by an engine: no started frame, only its end.
                assert kinds(frames) == ["error"], kinds(frames)
                error = events(frames)[-1]
                assert error.payload["code"] == "ENGINE_ERROR"
                assert error.payload["retriable"] is True
                task = await wire.task(accepted.json()["task_id"])
                assert (task["state"], task["timings"]["started_ms"]) == ("failed", None)
            health = (await wire.client.get("/v1/pools/vllm/health")).json()

    assert [r["state"] for r in health["replicas"]] == ["ready"]
    # Each task: its first try, then once more after it went back to the queue (requeues: 1).
    assert len(fake.posts()) == 4


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0015", "ORCH-ENG-0024", "ORCH-DATA-0056")
@pytest.mark.parametrize("status", [429, 503])
async def test_a_task_its_engine_refuses_as_busy_runs_on_the_other_replica(
    settings_for: SettingsFactory, status: int
) -> None:
    busy = Reply(('{"error": "queue full"}',), status=status, content_type="application/json")
    good = Reply((*completion_chunks(["a", "b"], usage=(2, 2)), DONE))
    async with ScriptedEngine([busy]) as refusing, ScriptedEngine([good]) as serving:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [refusing.url, serving.url],
            "health_interval_ms": 50,
            # In-run retries are off: only the way back through the queue can save the task.
            "retry": {"attempts": 1, "requeues": 1, "backoff_ms": 60_000},
            "placement": {"tie_break": "replica_order"},  # the first try goes to the busy one
        }
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            await wait_replicas_ready(wire, "vllm", 2)
            accepted = await wire.client.post(
                "/v1/tasks", json={"model": "small", "prompt": "hello", "max_tokens": 2}
            )
            assert accepted.status_code == 202, accepted.text
            task_id = accepted.json()["task_id"]
            frames = await wire.read_all(task_id)
            task = await wire.task(task_id)
            health = (await wire.client.get("/v1/pools/vllm/health")).json()

    assert len(refusing.posts()) == 1 and len(serving.posts()) == 1
    assert kinds(frames) == ["started", "token", "token", "end"], kinds(frames)
    started = events(frames)[0].payload
    assert (started["replica_id"], started["placement"]) == ("vllm-1", "least_loaded")
    assert started["queue_position"] == 0
    assert (task["state"], task["replica_id"]) == ("succeeded", "vllm-1")
    assert task["usage"]["tokens_out"] == 2
    # The busy replica kept its circuit and readiness; it only rests for its backoff.
    assert [r["state"] for r in health["replicas"]] == ["ready", "ready"]


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="org/Small"} 2.0
vllm:num_requests_running{engine="1",model_name="org/Small"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
vllm:num_requests_waiting{engine="0",model_name="org/Small"} 1.0
vllm:num_requests_waiting{engine="1",model_name="org/Small"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="org/Small"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="org/Small"} 0.5
vllm:num_preemptions_total{engine="0",model_name="org/Small"} 7.0
"""


@pytest.mark.req("ORCH-ENG-0025")
@pytest.mark.parametrize(
    ("kind", "pages", "load"),
    [
        ("vllm", {"/metrics": (200, VLLM_METRICS)}, EngineLoad(3, None, 2, 0.5)),
        (
            "vllm",
            {"/metrics": (200, 'vllm:gpu_cache_usage_perc{model_name="m"} 0.75 1700000000\n')},
            EngineLoad(kv_cache_usage=0.75),
        ),
        (
            "llamacpp",
            {
                "/slots": (
                    200,
                    '[{"id": 0, "is_processing": true}, {"id": 1, "is_processing": false},'
                    ' {"id": 2, "is_processing": true}]',
                )
            },
            EngineLoad(busy_slots=2, total_slots=3),
        ),
        ("vllm", {"/metrics": (404, "not found")}, None),
        ("vllm", {"/metrics": (200, "process_cpu_seconds_total 3.5\n")}, None),
        ("llamacpp", {"/slots": (501, '{"error": "slots endpoint disabled"}')}, None),
        ("llamacpp", {"/slots": (200, '[{"id": 0}]')}, None),
        ("tgi", {}, None),
    ],
    ids=[
        "vllm",
        "vllm-old-name",
        "llamacpp",
        "no-metrics",
        "other-metrics",
        "no-slots",
        "odd-slots",
        "tgi",
    ],
)
async def test_the_health_probe_reads_the_engines_own_load_where_it_reports_one(
    kind: str, pages: dict[str, tuple[int, str]], load: EngineLoad | None
) -> None:
    async with ScriptedEngine([Reply()]) as fake, adapter(fake.url, kind=kind) as engine:
        fake.pages.update(pages)
        # A missing or odd load endpoint never fails the probe.
        assert await engine.health() is True

    assert engine.load == load
    assert {s.method for s in fake.seen} == {"GET"}


def vllm_metrics(*, running: int, waiting: int) -> str:
    return (
        f'vllm:num_requests_running{{model_name="small"}} {running}.0\n'
        f'vllm:num_requests_waiting{{model_name="small"}} {waiting}.0\n'
    )


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0025", "ORCH-ENG-0021")
async def test_placement_goes_by_the_engines_own_load_and_by_its_own_count_without_it(
    settings_for: SettingsFactory,
) -> None:
    done = Reply((*completion_chunks(["a"], usage=(2, 1)), DONE))
    async with ScriptedEngine([done]) as first, ScriptedEngine([done]) as second:
        # The first replica is busy with other clients' work: its own metrics say so.
        first.pages["/metrics"] = (200, vllm_metrics(running=2, waiting=3))
        second.pages["/metrics"] = (200, vllm_metrics(running=0, waiting=0))
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [first.url, second.url],
            "slots_per_replica": 2,
            "health_interval_ms": 20,
            # Without the engines' account a tie: the first replica would get every task.
            "placement": {"tie_break": "replica_order"},
        }
        placed = []
        async with serve(settings_for(config(pool))) as wire:
            await wait_replicas_ready(wire, "vllm", 2)
            await first.read_again("/metrics")
            for prompt in ("one", "two"):
                task_id = await wire.submit(model="small", prompt=prompt, max_tokens=1)
                frames = await wire.read_all(task_id)
                started = events(frames)[0].payload
                placed.append((started["replica_id"], started["placement"]))
            # The endpoint goes away: llorch's own count (both idle) decides again.
            first.pages["/metrics"] = (404, "gone")
            await first.read_again("/metrics")
            task_id = await wire.submit(model="small", prompt="three", max_tokens=1)
            frames = await wire.read_all(task_id)
            started = events(frames)[0].payload
            placed.append((started["replica_id"], started["placement"]))

    assert placed == [
        ("vllm-1", "least_loaded"),
        ("vllm-1", "least_loaded"),
        ("vllm-0", "least_loaded"),
    ]
    assert len(first.posts()) == 1 and len(second.posts()) == 2


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0015", "ORCH-DATA-0029", "ORCH-DATA-0060")
async def test_a_task_sent_back_waits_in_the_queue_with_its_position_and_can_be_canceled(
    settings_for: SettingsFactory,
) -> None:
    busy = Reply(('{"error": "queue full"}',), status=429, content_type="application/json")
    async with ScriptedEngine([busy]) as refusing:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [refusing.url],
            "health_interval_ms": 50,
            # The replica rests a minute after its refusal: the task waits in the queue.
            "retry": {"attempts": 1, "requeues": 2, "backoff_ms": 60_000},
        }
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            task_id = await wire.submit(model="small", prompt="hello", max_tokens=2)
            async with asyncio.timeout(20):
                while not refusing.posts():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            async with asyncio.timeout(20):
                # Back in the queue once its run has let it go.
                while (waiting := await wire.task(task_id)).get("queue_position") != 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            health = (await wire.client.get("/v1/pools/vllm/health")).json()
            assert (await wire.cancel(task_id)).status_code == 204
            frames = await wire.read_all(task_id)

    assert (waiting["state"], waiting["queue_position"]) == ("queued", 0)
    assert [r["state"] for r in health["replicas"]] == ["ready"]  # resting, still serving
    assert kinds(frames) == ["end"]
    assert events(frames)[0].payload["finish_reason"] == "canceled"
    assert len(refusing.posts()) == 1


@pytest.mark.wire
@pytest.mark.req("ORCH-ENG-0015", "ORCH-ENG-0005", "ORCH-DATA-0060")
async def test_a_cancel_while_the_engine_has_not_answered_ends_the_task_at_once(
    settings_for: SettingsFactory,
) -> None:
    async with ScriptedEngine([Reply(end="mute")]) as mute:
        pool = {
            "id": "vllm",
            "engine": "vllm",
            "model": "small",
            "endpoints": [mute.url],
            "health_interval_ms": 50,
            "timeouts": {"first_token_ms": 600_000},
        }
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            task_id = await wire.submit(model="small", prompt="hello", max_tokens=2)
            async with asyncio.timeout(20):
                while not mute.posts():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            waiting = await wire.task(task_id)
            assert (await wire.cancel(task_id)).status_code == 204
            frames = await wire.read_all(task_id)
            async with asyncio.timeout(5):
                await mute.disconnected.wait()  # the request to the engine was closed
            task = await wire.task(task_id)

    # Not accepted yet: queued, no started frame; the cancel ends it without waiting for a limit.
    assert waiting["state"] == "queued"
    assert kinds(frames) == ["end"]
    assert events(frames)[0].payload["finish_reason"] == "canceled"
    assert (task["state"], task["timings"]["started_ms"]) == ("canceled", None)


@pytest.mark.wire
@pytest.mark.req("ORCH-DATA-0051", "ORCH-DATA-0053")
async def test_tokens_that_arrive_together_are_one_step_and_each_its_own_frame(
    settings_for: SettingsFactory,
) -> None:
    texts = [f"t{i}" for i in range(6)]
    together = "".join(completion_chunks(texts, usage=(2, 6))) + DONE  # written at once
    async with ScriptedEngine([Reply((together,))]) as fake:
        async with adapter(fake.url) as engine:
            steps = [c async for c in engine.stream(request())]
        pool = {"id": "vllm", "engine": "vllm", "model": "small", "endpoints": [fake.url]}
        async with serve(settings_for(config(pool))) as wire:
            await wait_ready(wire, "vllm")
            task_id = await wire.submit(model="small", prompt="hello", max_tokens=6)
            frames = events(await wire.read_all(task_id))
            resumed = events(await wire.read_all(task_id, {"Last-Event-ID": "3"}))

    # One read, one step of the adapter for its six tokens.
    assert steps[1] == [Token(t) for t in texts], steps
    tokens = [f for f in frames if f.event == "token"]
    assert [(f.payload["i"], f.payload["t"]) for f in tokens] == list(enumerate(texts))
    assert [f.id for f in frames] == list(range(len(frames)))
    assert [(f.id, f.event, f.data) for f in resumed] == [
        (f.id, f.event, f.data) for f in frames[4:]
    ]
