"""A mock OpenAI-compatible engine, as its own process, for the benchmarks.

It serves what llama.cpp's server, vLLM and TGI share: ``POST /v1/completions`` and
``POST /v1/chat/completions`` with ``"stream": true`` (SSE chunks, a last chunk with ``usage``,
then ``data: [DONE]``), ``GET /health`` and ``GET /v1/models``. Tokens come from llorch's own
mock engine (:class:`llorch.engines.mock.MockEngine`): deterministic text, the configured time
to first token and tokens/s, and exactly ``max_tokens`` tokens (no early end of text), so a
direct run and a run through llorch ask the engine for the same work.

    python bench/mock_openai.py --port 9001 --ttft-ms 50 --tokens-per-s 200
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llorch.config import MockSettings
from llorch.engines.base import ChatMessage, CompletionRequest, Finish, Token
from llorch.engines.mock import MockEngine

MODEL = "bench-model"


def build_app(*, ttft_ms: float, tokens_per_s: float, slots: int) -> Starlette:
    engine = MockEngine(
        "bench-0",
        settings=MockSettings(ttft_ms=int(ttft_ms), tokens_per_s=tokens_per_s, eos=False),
        slots=slots,
    )
    ids = itertools.count(1)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def complete(request: Request) -> Response:
        body = orjson.loads(await request.body())
        chat = request.url.path.endswith("/chat/completions")
        messages = (
            tuple(ChatMessage(m["role"], m["content"]) for m in body["messages"]) if chat else None
        )
        completion = CompletionRequest(
            task_id=f"cmpl-{next(ids)}",
            model=str(body.get("model", MODEL)),
            prompt=None if chat else str(body["prompt"]),
            messages=messages,
            max_tokens=int(body.get("max_tokens", 16)),
            seed=body.get("seed"),
        )
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(text: str | None, finish: str | None, usage: dict[str, int] | None) -> bytes:
            if chat:
                choice: dict[str, object] = {
                    "index": 0,
                    "delta": {} if text is None else {"content": text},
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            payload: dict[str, object] = {
                "id": completion.task_id,
                "object": kind,
                "created": created,
                "model": completion.model,
                "choices": [choice],
            }
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async def frames() -> AsyncIterator[bytes]:
            async for item in engine.stream(completion):
                if isinstance(item, Token):
                    yield chunk(item.text, None, None)
                elif isinstance(item, Finish):
                    usage = {
                        "prompt_tokens": item.tokens_in,
                        "completion_tokens": item.tokens_out,
                        "total_tokens": item.tokens_in + item.tokens_out,
                    }
                    yield chunk(None, item.finish_reason, usage)
            yield b"data: [DONE]\n\n"

        if not body.get("stream"):
            return JSONResponse({"error": {"message": "only streaming is mocked"}}, 400)
        return StreamingResponse(frames(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/completions", complete, methods=["POST"]),
            Route("/v1/chat/completions", complete, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=1024)
    args = parser.parse_args()
    app = build_app(ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, slots=args.slots)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
