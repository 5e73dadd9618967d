"""The Python client against a real server (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llorch.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    Options,
    Overloaded,
    Unavailable,
)
from llorch.client.sse import parse
from tests.support import MODEL, live_server, make_settings, pool

pytestmark = pytest.mark.wire

SLOW = {"ttft_ms": 0, "tokens_per_s": 20, "eos": False}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    settings = make_settings(tmp_path, {"pools": [pool(models=["mock-large"])]})
    with live_server(settings) as url:
        yield url


@pytest.mark.req("ORCH-CLI-0001")
def test_every_operation_returns_typed_results(server: str) -> None:
    with Client.from_url(server) as client:
        session = client.create_session(tokens=1000)
        accepted = client.create_task(
            model=MODEL,
            prompt="hello there",
            max_tokens=5,
            session_id=session.session_id,
            seed=3,
            top_p=0.9,
        )
        assert accepted.session_id == session.session_id
        assert accepted.budgets is not None and accepted.budgets.tokens <= 1000
        events = list(client.events(accepted.task_id))
        assert events[0].event == "started" and events[-1].event == "end"
        task = client.get_task(accepted.task_id)
        assert task.state == "succeeded" and task.tokens_out == events[-1].data["tokens_out"]
        page = client.list_tasks(session_id=session.session_id)
        assert [t.task_id for t in page.items] == [accepted.task_id]
        client.cancel_task(accepted.task_id)  # idempotent on an ended task
        assert client.get_session(session.session_id).turns == 1
        client.delete_session(session.session_id)
        artifact = client.create_artifact(kind="document", content="text", tags=["t"])
        assert client.get_artifact(artifact.id).content == "text"
        assert artifact.id in [a.id for a in client.list_artifacts(tag="t").items]
        assert client.create_artifact(kind="document", content="text").id == artifact.id
        assert [p.pool_id for p in client.list_pools()] == ["default"]
        assert client.drain_pool("default", deadline_ms=1000).draining is True
        assert client.resume_pool("default").draining is False
        assert client.reload_pool("default", model="mock-large").pool_id == "default"
        assert client.get_pool_health("default").live is True
        assert client.get_capabilities()["pools"][0]["pool_id"] == "default"
        assert client.livez() == {"status": "ok"}
        assert "llorch_http_requests_total" in client.get_metrics()


@pytest.mark.req("ORCH-CLI-0001")
def test_errors_are_typed_exceptions_with_the_envelope(server: str) -> None:
    with Client.from_url(server) as client:
        with pytest.raises(NotFound) as missing:
            client.get_task("no-such-task")
        assert missing.value.status == 404 and missing.value.code == "TASK_NOT_FOUND"
        assert missing.value.retriable is False and missing.value.correlation_id
        with pytest.raises(InvalidRequest) as invalid:
            client.create_task(model="no-such-model", prompt="x", max_tokens=1)
        assert invalid.value.code == "INVALID_PARAMS"
        client.create_task(model=MODEL, prompt="x", max_tokens=1, task_id="same")
        with pytest.raises(Conflict) as conflict:
            client.create_task(model=MODEL, prompt="y", max_tokens=1, task_id="same")
        assert conflict.value.code == "TASK_EXISTS"
        client.drain_pool("default", deadline_ms=0)
        with pytest.raises(Unavailable) as draining:
            client.create_task(model=MODEL, prompt="x", max_tokens=1)
        assert draining.value.code == "POOL_UNAVAILABLE" and draining.value.retriable
        assert draining.value.retry_after_s is not None and draining.value.retry_after_s >= 1


@pytest.mark.req("ORCH-CLI-0002")
def test_waiting_on_a_full_queue_honours_retry_after(tmp_path: Path) -> None:
    """One slot, a queue of one, policy reject: the third task is refused until the client,
    while it waits as advised, cancels the blocking tasks."""
    busy = pool(slots_per_replica=1, queue={"capacity": 1, "policy": "reject"}, mock=SLOW)
    settings = make_settings(tmp_path, {"pools": [busy]})
    with live_server(settings) as url, Client.from_url(url) as admin:
        blockers = [
            admin.create_task(model=MODEL, prompt="x", max_tokens=1000).task_id for _ in range(2)
        ]
        with pytest.raises(Overloaded) as refused:
            admin.create_task(model=MODEL, prompt="x", max_tokens=1)
        advised = refused.value.retry_after_s
        assert refused.value.code == "ADMISSION_REJECT" and advised is not None

        slept: list[float] = []
        waited: list[str] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            for task_id in blockers:
                admin.cancel_task(task_id)

        options = Options(
            base_url=url, wait_s=600, on_wait=lambda error, _s: waited.append(error.code)
        )
        with Client(options, sleep=sleep) as client:
            accepted = client.create_task(model=MODEL, prompt="x", max_tokens=1)
        assert accepted.state == "queued"
        assert slept == [advised] and waited == ["ADMISSION_REJECT"]


@pytest.mark.req("ORCH-CLI-0002")
def test_no_wait_on_an_answer_a_retry_cannot_cure(server: str) -> None:
    slept: list[float] = []
    with Client(Options(base_url=server, wait_s=600), sleep=slept.append) as client:
        session = client.create_session(tokens=10)
        with pytest.raises(Overloaded) as exhausted:
            client.create_task(
                model=MODEL, prompt="x", max_tokens=100, session_id=session.session_id
            )
    assert exhausted.value.code == "BUDGET_EXHAUSTED" and exhausted.value.retriable is False
    assert slept == []


class CutOnce(httpx.BaseTransport):
    """The real network, but the first stream breaks after `after` frames (a dropped proxy)."""

    def __init__(self, after: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.after = after
        self.cut = False
        self.last_event_ids: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/stream"):
            return response
        self.last_event_ids.append(request.headers.get("last-event-id"))
        if self.cut:
            return response
        self.cut = True
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Cut(response, self.after)
        )

    def close(self) -> None:
        self.inner.close()


class _Cut(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response, frames: int) -> None:
        self.response = response
        self.frames = frames

    def __iter__(self) -> Iterator[bytes]:
        seen = b""
        for chunk in self.response.iter_raw():
            seen += chunk
            if seen.count(b"\n\n") >= self.frames:
                yield seen[: _nth(seen, b"\n\n", self.frames) + 2]
                raise httpx.ReadError("connection reset by peer")
        yield seen

    def close(self) -> None:
        self.response.close()


def _nth(data: bytes, needle: bytes, n: int) -> int:
    index = -1
    for _ in range(n):
        index = data.index(needle, index + 1)
    return index


@pytest.mark.req("ORCH-CLI-0003")
def test_a_broken_stream_resumes_with_last_event_id(server: str) -> None:
    transport = CutOnce(after=3)
    with (
        Client(Options(base_url=server), transport=transport) as client,
        Client.from_url(server) as plain,
    ):
        accepted = client.create_task(model=MODEL, prompt="a story", max_tokens=12, seed=1)
        resumed = list(client.events(accepted.task_id))
        whole = list(plain.events(accepted.task_id))
    assert transport.last_event_ids == [None, "2"]
    assert [e.id for e in resumed] == list(range(len(resumed)))
    assert resumed == whole and [e.terminal for e in resumed].count(True) == 1


@pytest.mark.req("ORCH-CLI-0001", "ORCH-CLI-0003")
async def test_the_async_client_speaks_the_same_contract(server: str) -> None:
    async with AsyncClient.from_url(server) as client:
        accepted = await client.create_task(model=MODEL, prompt="hi", max_tokens=4, seed=2)
        events = [e async for e in client.events(accepted.task_id)]
        assert events[0].event == "started" and events[-1].event == "end"
        tail = [e async for e in client.events(accepted.task_id, last_event_id=events[1].id)]
        assert tail == events[2:]
        with pytest.raises(NotFound) as missing:
            await client.get_session("gone")
        assert missing.value.code == "SESSION_NOT_FOUND"


@pytest.mark.req("ORCH-CLI-0003")
def test_sse_parser_skips_comments_and_reads_crlf() -> None:
    body = ': heartbeat\r\n\r\nid: 0\r\nevent: token\r\ndata: {"t":"a","i":0}\r\n\r\nid: 1\n'
    body += 'event: end\ndata: {"finish_reason":"stop"}\n'
    events = parse(body)
    assert [(e.id, e.event, e.terminal) for e in events] == [(0, "token", False), (1, "end", True)]
    assert events[0].data == {"t": "a", "i": 0}


@pytest.mark.req("ORCH-CLI-0004")
def test_client_and_cli_load_no_server_module() -> None:
    code = (
        "import sys, llorch.cli, llorch.client; "
        "print(sorted(m for m in sys.modules if m.startswith('llorch.') "
        "and not m.startswith(('llorch.cli', 'llorch.client'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded: Any = out.strip()
    assert loaded == "[]"
