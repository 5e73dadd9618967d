"""Clients that stop reading, and clients that leave with cancel_on_disconnect, over the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from llorch.api import create_app
from llorch.config import Settings
from tests.conftest import SettingsFactory
from tests.integration.wire import (
    LONG_SEED,
    Wire,
    config,
    events,
    kinds,
    nth_token,
    serve,
    sse_frames,
    take_until,
)
from tests.support import pool

pytestmark = [pytest.mark.wire]

MAX_LAG = 64
TOKENS = 6000


@asynccontextmanager
async def serve_small_buffers(settings: Settings) -> AsyncIterator[Wire]:
    """A real uvicorn whose connections have a small, fixed kernel send buffer (accepted
    sockets inherit SO_SNDBUF from the listener, and a set size turns autotuning off): what a
    stalled reader can absorb is then small and the same on every machine."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    app = create_app(settings.with_server(host="127.0.0.1", port=port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(30):
            while not server.started:
                assert thread.is_alive(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield Wire(client)
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)
        listener.close()


def stalled_reader(base_url: str, task_id: str) -> socket.socket:
    """A raw connection that asks for the stream and then reads nothing: a tiny receive window,
    so the server's writes block as soon as the kernel buffers are full."""
    return stalled(base_url, f"GET /v1/tasks/{task_id}/stream", {"Accept": "text/event-stream"})


def stalled(
    base_url: str, request_line: str, headers: dict[str, str], body: bytes = b""
) -> socket.socket:
    """A raw connection that sends one request and then reads nothing (see stalled_reader)."""
    url = urlsplit(base_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((url.hostname or "127.0.0.1", url.port or 80))
    lines = [f"{request_line} HTTP/1.1", f"Host: {url.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sent, until it closed the connection (blocking; run in a thread)."""
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.req("ORCH-REL-0001")
async def test_a_client_that_stops_reading_is_dropped_and_the_task_completes(
    settings_for: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fast = pool(
        max_tokens_out=TOKENS,
        max_context=TOKENS + 1000,
        mock={"ttft_ms": 1, "tokens_per_s": 3000, "eos": False},
    )
    settings = settings_for(config(fast, stream_max_lag_events=MAX_LAG, stream_write_timeout_s=60))
    with caplog.at_level(logging.WARNING, logger="llorch.streams"):
        async with serve_small_buffers(settings) as wire:
            task_id = await wire.submit(max_tokens=TOKENS, seed=LONG_SEED)
            sock = stalled_reader(str(wire.client.base_url), task_id)
            try:
                task = await wire.wait_state(task_id, "succeeded", "failed", timeout_s=30)
                # The server gave up on the stalled reader: what it had written, then EOF.
                received = await asyncio.to_thread(read_to_eof, sock)
            finally:
                sock.close()
            trace = await wire.client.get(f"/v1/artifacts/{task['trace_artifact_id']}")
            metrics = (await wire.client.get("/metrics")).text
            replay = await wire.read_all(task_id, timeout_s=30)

    assert task["state"] == "succeeded"
    assert task["usage"]["tokens_out"] == TOKENS
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    # Cut off long before the end: no terminal frame reached the stalled reader.
    assert b"event: end" not in body
    assert body.count(b"event: token") < TOKENS
    assert any(
        r.getMessage().startswith("slow SSE client disconnected")
        and getattr(r, "task_id", None) == task_id
        for r in caplog.records
    )
    assert "llorch_sse_clients_dropped_total 1.0" in metrics
    # The trace holds every event, and a well-behaved reader still gets the whole stream.
    transcript = json.loads(trace.json()["content"])["transcript"]
    assert [e["event"] for e in transcript].count("token") == TOKENS
    assert transcript[-1]["event"] == "end"
    assert kinds(replay).count("token") == TOKENS
    assert kinds(replay)[-1] == "end"


@pytest.mark.req("ORCH-OAI-0023", "ORCH-REL-0001")
@pytest.mark.parametrize(
    ("max_lag", "write_timeout_s"), [(MAX_LAG, 60), (10_000_000, 0.5)], ids=["lag", "write-timeout"]
)
async def test_an_openai_client_that_stops_reading_is_dropped_and_its_task_completes(
    settings_for: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    max_lag: int,
    write_timeout_s: float,
) -> None:
    fast = pool(
        max_tokens_out=TOKENS,
        max_context=TOKENS + 1000,
        mock={"ttft_ms": 1, "tokens_per_s": 3000, "eos": False},
    )
    server = {"stream_max_lag_events": max_lag, "stream_write_timeout_s": write_timeout_s}
    settings = settings_for(config(fast, **server))
    chat = {"model": fast["model"], "messages": [{"role": "user", "content": "Hello"}]}
    body = json.dumps(chat | {"max_tokens": TOKENS, "stream": True}).encode()
    head = {"Content-Type": "application/json", "X-Task-Id": "t-oai-stalled"}
    with caplog.at_level(logging.WARNING, logger="llorch.streams"):
        async with serve_small_buffers(settings) as wire:
            sock = stalled(str(wire.client.base_url), "POST /v1/chat/completions", head, body)
            try:
                # Dropped for falling behind is not hanging up: the task is not canceled.
                task = await wire.wait_state(
                    "t-oai-stalled", "succeeded", "failed", "canceled", timeout_s=30
                )
                received = await asyncio.to_thread(read_to_eof, sock)
            finally:
                sock.close()
            metrics = (await wire.client.get("/metrics")).text

    assert task["state"] == "succeeded"
    assert task["usage"]["tokens_out"] == TOKENS
    head_bytes, _, chunks = received.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in chunks and b'"finish_reason":"length"' not in chunks
    assert chunks.count(b"data: {") < TOKENS
    assert any(
        r.getMessage().startswith("slow SSE client disconnected")
        and getattr(r, "task_id", None) == "t-oai-stalled"
        and getattr(r, "framing", None) == "openai"
        for r in caplog.records
    )
    assert "llorch_sse_clients_dropped_total 1.0" in metrics


SLOW = {"ttft_ms": 1, "tokens_per_s": 20}


@pytest.mark.req("ORCH-REL-0002")
async def test_cancel_on_disconnect_cancels_the_task_when_its_client_leaves(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config(pool(mock=SLOW), cancel_on_disconnect=True))
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=200, seed=LONG_SEED)
        async with (
            httpx.AsyncClient(base_url=wire.client.base_url, timeout=10) as reader,
            reader.stream("GET", f"/v1/tasks/{task_id}/stream") as response,
        ):
            await take_until(sse_frames(response), nth_token(2))
        task = await wire.wait_state(task_id, "succeeded", "failed", "canceled")
        frames = await wire.read_all(task_id)

    assert task["state"] == "canceled"
    assert task["usage"]["tokens_out"] < 200
    assert events(frames)[-1].event == "end"
    assert events(frames)[-1].payload["finish_reason"] == "canceled"


@pytest.mark.req("ORCH-REL-0002")
async def test_by_default_a_client_leaving_lets_the_task_complete(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for(config(pool(mock=SLOW)))) as wire:
        task_id = await wire.submit(max_tokens=20, seed=LONG_SEED)
        async with (
            httpx.AsyncClient(base_url=wire.client.base_url, timeout=10) as reader,
            reader.stream("GET", f"/v1/tasks/{task_id}/stream") as response,
        ):
            await take_until(sse_frames(response), nth_token(1))
        task = await wire.wait_state(task_id, "succeeded", "failed", "canceled")
        frames = await wire.read_all(task_id)

    assert task["state"] == "succeeded"
    assert kinds(frames).count("token") == 20
    assert events(frames)[-1].payload["finish_reason"] == "length"
