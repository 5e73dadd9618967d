"""The event stream's fast path below connexion (llorch.api.stream_route), in process: it serves
what it can prove valid and answers as the validated path does; the rest goes to connexion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llorch.api import stream_route
from tests.api.test_auth import as_, keys_config
from tests.support import assert_envelope, in_process, make_settings, parse_sse, pool

INSTANT = {"ttft_ms": 0, "tokens_per_s": 0, "eos": False}


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids the fast path answered for."""
    seen: list[str] = []
    inner = stream_route.event_stream_response

    def counting(runtime: Any, task_id: str, who: Any, last: str | None) -> Any:
        seen.append(task_id)
        return inner(runtime, task_id, who, last)

    monkeypatch.setattr(stream_route, "event_stream_response", counting)
    return seen


@pytest.mark.req("ORCH-DATA-0073", "ORCH-DATA-0053", "ORCH-DATA-0058")
async def test_the_fast_path_serves_streams_and_resumes_with_the_same_headers(
    tmp_path: Path, served: list[str]
) -> None:
    settings = make_settings(tmp_path, {"pools": [pool(mock=INSTANT)]})
    async with in_process(settings) as api:
        task_id = (await api.submit(max_tokens=3, task_id="t-fast")).json()["task_id"]
        whole = await api.client.get(
            f"/v1/tasks/{task_id}/stream", headers={"X-Correlation-Id": "c-fast-1"}
        )
        assert whole.status_code == 200
        assert [name for name, _ in whole.headers.multi_items()] == [
            "x-budget-tokens-remaining",
            "x-budget-time-remaining-ms",
            "x-budget-cost-remaining",
            "cache-control",
            "x-accel-buffering",
            "content-type",
            "x-correlation-id",
        ]
        assert whole.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert whole.headers["x-correlation-id"] == "c-fast-1"
        frames = parse_sse(whole.text)
        assert [f.event for f in frames] == ["started", "token", "token", "token", "end"]
        assert [f.id for f in frames] == [0, 1, 2, 3, 4]
        resumed = parse_sse(
            (
                await api.client.get(f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": "2"})
            ).text
        )
        assert [f.id for f in resumed] == [3, 4]
        assert resumed == frames[3:]
        past = parse_sse(
            (
                await api.client.get(f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": "99"})
            ).text
        )
        assert past == frames[-1:]
        metrics = (await api.client.get("/metrics")).text
        line = 'llorch_http_requests_total{operation_id="streamTask",status="200"} 3.0'
        assert line in metrics
    assert served == [task_id] * 3


@pytest.mark.req("ORCH-DATA-0073", "ORCH-ERR-0001")
async def test_what_the_fast_path_cannot_prove_valid_goes_to_connexion(
    tmp_path: Path, served: list[str]
) -> None:
    settings = make_settings(tmp_path, {"pools": [pool(mock=INSTANT)]})
    async with in_process(settings) as api:
        task_id = (await api.submit(max_tokens=1)).json()["task_id"]
        stream = f"/v1/tasks/{task_id}/stream"
        for headers in (
            {"Last-Event-ID": "x"},
            {"Last-Event-ID": "-1"},
            {"Last-Event-ID": "1" * 10},
        ):
            refused = assert_envelope(
                await api.client.get(stream, headers=headers), 400, "INVALID_PARAMS"
            )
            assert "Last-Event-ID" in refused["message"]
        query = assert_envelope(await api.client.get(f"{stream}?x=1"), 400, "INVALID_PARAMS")
        assert "x" in query["message"]
        assert_envelope(await api.client.get("/v1/tasks/bad%20id/stream"), 400, "INVALID_PARAMS")
        moved = await api.client.post(stream)
        assert_envelope(moved, 405, "METHOD_NOT_ALLOWED")
        assert moved.headers["allow"] == "GET"
        assert_envelope(await api.client.get("/v1/tasks/t-missing/stream"), 404, "TASK_NOT_FOUND")
    assert served == ["t-missing"]  # only the well-formed request was the fast path's


@pytest.mark.req("ORCH-DATA-0073", "ORCH-SEC-0010", "ORCH-SEC-0011", "ORCH-SEC-0012")
async def test_the_fast_path_authenticates_as_connexion_does(
    tmp_path: Path, served: list[str]
) -> None:
    raw = {"pools": [pool(mock=INSTANT)], "auth": {"keys": keys_config()}}
    async with in_process(make_settings(tmp_path, raw)) as api:
        body = {"model": "mock-small", "prompt": "hi", "max_tokens": 1, "task_id": "t-alice"}
        assert (await api.client.post("/v1/tasks", json=body, headers=as_("alice"))).is_success
        stream = "/v1/tasks/t-alice/stream"
        assert (await api.client.get(stream, headers=as_("alice"))).status_code == 200
        assert (await api.client.get(stream, headers=as_("ops"))).status_code == 200
        assert_envelope(await api.client.get(stream, headers=as_("bob")), 404, "TASK_NOT_FOUND")
        missing = await api.client.get(stream)
        assert_envelope(missing, 401, "MISSING_TOKEN")
        assert missing.headers["www-authenticate"] == 'Bearer realm="llorch"'
        bad = await api.client.get(stream, headers={"Authorization": "Bearer nope"})
        assert_envelope(bad, 401, "BAD_TOKEN")
        assert_envelope(await api.client.get(stream, headers=as_("prom")), 403, "FORBIDDEN_SCOPE")
        # Security before validation, as connexion orders them: a stranger learns nothing else.
        unchecked = await api.client.get(stream, headers={"Last-Event-ID": "x"})
        assert_envelope(unchecked, 401, "MISSING_TOKEN")
        # Burst 2: each request is counted once, whichever path answers it.
        answers = [
            (await api.client.get("/v1/tasks/t-none/stream", headers=as_("slow"))).status_code
            for _ in range(3)
        ]
        assert answers == [404, 404, 429]
