"""State that survives the process: a SIGKILL mid-run, and the graceful path of SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import parse_sse, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire


def write_config(path: Path, database_url: str | None = None, **server: Any) -> Path:
    config: dict[str, Any] = {
        "server": {"heartbeat_s": 0.5, **server},
        "pools": [
            {
                "id": "default",
                "model": "mock-small",
                "replicas": 1,
                "slots_per_replica": 2,
                "mock": {"ttft_ms": 0, "tokens_per_s": 10, "eos": False},
            }
        ],
    }
    if database_url is not None:
        # One instance restarted: the same instance on whatever port it gets (ORCH-STATE-0012).
        config["database"] = {"url": database_url, "instance_id": "the-one"}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: SQLite under the data dir; else a new PostgreSQL database of its own."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.mark.req("ORCH-STATE-0001", "ORCH-STATE-0005", "ORCH-STATE-0007", "ORCH-STATE-0044")
def test_after_sigkill_queued_tasks_run_again_and_running_ones_end_worker_reset(
    tmp_path: Path, database_url: str | None
) -> None:
    config = write_config(tmp_path / "llorch.yaml", database_url, shutdown_grace_s=0)
    data_dir = tmp_path / "data"
    with serve_process("--config", str(config), data_dir=data_dir) as (url, proc, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            session = client.post("/v1/sessions", json={"budgets": {"tokens": 10_000}}).json()
            sid = session["session_id"]
            running = [
                submit_to(client, max_tokens=600, session_id=sid)["task_id"] for _ in range(2)
            ]
            queued = submit_to(client, max_tokens=3, session_id=sid)["task_id"]
            artifact = client.post(
                "/v1/artifacts", json={"kind": "document", "content": "kept across a crash"}
            ).json()
            # Each running task has produced tokens, and a progress checkpoint recorded them.
            for task_id in running:
                wait_until(lambda t=task_id: task_of(client, t)["usage"]["tokens_out"] > 0)
            assert task_of(client, queued)["state"] == "queued"
            produced = {t: task_of(client, t)["usage"]["tokens_out"] for t in running}
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL

    with (
        serve_process("--config", str(config), data_dir=data_dir) as (url, _, _),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        charged = 0
        for task_id in running:
            task = task_of(client, task_id)
            assert task["state"] == "failed"
            assert task["error"]["code"] == "WORKER_RESET" and task["error"]["retriable"]
            # Charged for what it produced by its last checkpoint, and its prompt.
            assert task["usage"]["tokens_out"] >= produced[task_id]
            assert task["usage"]["tokens_in"] > 0
            charged += task["usage"]["tokens_in"] + task["usage"]["tokens_out"]
            # The stream ends with the same error, also for a client resuming mid-stream. On
            # PostgreSQL the frames the killed process had written to the durable transcript
            # come first (ORCH-STATE-0044); on SQLite they died with it.
            for after in (None, 5):
                headers = {} if after is None else {"Last-Event-ID": str(after)}
                stream = client.get(f"/v1/tasks/{task_id}/stream", headers=headers)
                events = parse_sse(stream.text)
                if database_url is None:
                    assert [e.event for e in events] == ["error"]
                assert [e.event for e in events if e.event in ("end", "error")] == ["error"]
                assert events[-1].data["code"] == "WORKER_RESET" and events[-1].id > 5
                seen = [e.id for e in events]
                assert seen == sorted(set(seen)) and all(i > (after or -1) for i in seen)
        # The task accepted but not started runs after the restart.
        done = wait_until(
            lambda: task_of(client, queued)["state"] == "succeeded" and task_of(client, queued)
        )
        assert done["usage"]["tokens_out"] == 3
        after = client.get(f"/v1/sessions/{sid}").json()
        assert after["turns"] == 3
        used = done["usage"]["tokens_in"] + done["usage"]["tokens_out"]
        assert after["budgets"]["tokens_remaining"] == 10_000 - used - charged
        kept = client.get(f"/v1/artifacts/{artifact['id']}").json()
        assert kept["content"] == "kept across a crash"


@pytest.mark.req("ORCH-STATE-0002")
def test_sigterm_stops_admitting_lets_running_tasks_finish_then_cancels_the_rest(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "llorch.yaml", shutdown_grace_s=3)
    data_dir = tmp_path / "data"
    with serve_process("--config", str(config), data_dir=data_dir) as (url, proc, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            short = submit_to(client, max_tokens=10)["task_id"]  # ~1 s: ends within the grace
            long = submit_to(client, max_tokens=600)["task_id"]  # ~60 s: does not
            for task_id in (short, long):
                wait_until(lambda t=task_id: task_of(client, t)["state"] == "running")
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: client.get("/readyz").status_code == 503)
            refused = client.post(
                "/v1/tasks", json={"model": "mock-small", "prompt": "p", "max_tokens": 1}
            )
            assert refused.status_code == 503
            assert refused.json()["code"] == "SHUTTING_DOWN"
            assert int(refused.headers["retry-after"]) >= 1
        output_code = proc.wait(timeout=30)
        assert output_code in (0, -signal.SIGTERM)

    with (
        serve_process("--config", str(config), data_dir=data_dir) as (url, _, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        assert task_of(client, short)["state"] == "succeeded"
        ended = task_of(client, long)
        assert ended["state"] == "canceled" and ended["finish_reason"] == "canceled"
