"""Structured logs: a JSON line per request and per task state change."""

from __future__ import annotations

import json
import logging

import pytest

from llorch.api.logs import JsonFormatter
from tests.conftest import SettingsFactory
from tests.support import in_process, pool


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    found = []
    for record in caplog.records:
        if getattr(record, "event", None) == event:
            found.append(json.loads(formatter.format(record)))
    return found


@pytest.mark.req("ORCH-MET-0010", "ORCH-MET-0011")
async def test_requests_and_task_state_changes_are_json_lines_with_the_correlation_id(
    settings_for: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with in_process(settings_for({"pools": [pool()]})) as api:
        accepted = await api.client.post(
            "/v1/tasks",
            json={"model": "mock-small", "prompt": "secret plans", "max_tokens": 3},
            headers={"X-Correlation-Id": "corr-log-1"},
        )
        task_id = accepted.json()["task_id"]
        await api.events(task_id)

    [create] = [r for r in lines(caplog, "request") if r["operation_id"] == "createTask"]
    assert create["correlation_id"] == "corr-log-1"
    assert (create["method"], create["path"], create["status"]) == ("POST", "/v1/tasks", 202)
    assert isinstance(create["duration_ms"], float)

    task_lines = [r for r in lines(caplog, "task") if r["task_id"] == task_id]
    assert [r["state"] for r in task_lines] == ["queued", "running", "succeeded"]
    assert {r["correlation_id"] for r in task_lines} == {"corr-log-1"}
    assert task_lines[1]["replica_id"] == "default-0"
    assert task_lines[-1]["outcome"] == "length"
    # Prompts are data, not log material.
    assert all("secret plans" not in record.getMessage() for record in caplog.records)
    assert "secret plans" not in caplog.text


def test_formatter_emits_one_json_object_with_the_extras() -> None:
    record = logging.LogRecord("llorch.x", logging.WARNING, "f.py", 1, "hello %s", ("you",), None)
    record.task_id = "t-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["level"] == "warning"
    assert line["task_id"] == "t-1" and line["logger"] == "llorch.x"


@pytest.mark.req("ORCH-MET-0012")
async def test_a_503_is_logged_at_info_without_a_traceback(
    settings_for: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with in_process(settings_for({"pools": [pool()]})) as api:
        drained = await api.client.post("/v1/pools/default/drain", json={"deadline_ms": 10})
        assert drained.status_code == 202
        refused = await api.submit()
        assert refused.status_code == 503, refused.text

    [line] = [r for r in caplog.records if r.name == "llorch.api" and "503" in r.getMessage()]
    assert line.levelno == logging.INFO and line.exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
