"""PostgreSQL stops under a running server and comes back: a real cluster, a real server process.

The cluster is a private one of this test (tools/postgres.py), since the test stops it:
``pg_ctl stop -m immediate`` is a crash (no shutdown checkpoint, every connection cut), and
``pg_ctl start`` the recovery from the WAL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import database_fault_config
from tests.support import parse_sse, serve_process, submit_to, task_of, wait_until
from tools.postgres import Cluster, private_cluster

pytestmark = pytest.mark.wire

DOCUMENT = {"kind": "document", "content": "Stored before the outage."}
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with private_cluster() as pg:
        yield pg


def write_config(path: Path, database_url: str) -> Path:
    # Two tasks run through the outage; the others wait in the queue.
    database = {"url": database_url, "timeout_ms": 2000, "retry_ms": 200}
    return database_fault_config(path, database)


def assert_unavailable(response: httpx.Response) -> dict[str, Any]:
    """503 STORAGE_UNAVAILABLE, retriable, with Retry-After and the envelope."""
    assert response.status_code == 503, response.text
    body: dict[str, Any] = response.json()
    assert (body["code"], body["retriable"]) == ("STORAGE_UNAVAILABLE", True), body
    assert int(response.headers["retry-after"]) >= 1
    assert body["retry_after_ms"] > 0 and body["correlation_id"]
    return body


def refused_while_down(client: httpx.Client, sid: str, task_id: str, artifact: str) -> None:
    """Every door that needs the database answers 503 STORAGE_UNAVAILABLE, at once."""
    body = assert_unavailable(
        client.post("/v1/tasks", json={"model": "mock-small", "prompt": "p", "max_tokens": 3})
    )
    assert "unreachable" in body["message"] and "postgresql://" not in body["message"]
    assert_unavailable(client.post("/v1/sessions", json={"budgets": {"tokens": 10}}))
    assert_unavailable(client.get(f"/v1/sessions/{sid}"))
    assert_unavailable(client.delete(f"/v1/sessions/{sid}"))
    assert_unavailable(client.get("/v1/tasks"))
    assert_unavailable(client.get(f"/v1/tasks/{task_id}"))
    assert_unavailable(client.post("/v1/artifacts", json=DOCUMENT))
    assert_unavailable(client.get("/v1/artifacts"))
    assert_unavailable(client.get(f"/v1/artifacts/{artifact}"))
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "mock-small",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert chat.status_code == 503, chat.text
    assert chat.json()["error"]["code"] == "storage_unavailable"
    assert chat.headers["x-should-retry"] == "true" and int(chat.headers["retry-after"]) >= 1


@pytest.mark.req("ORCH-STATE-0010", "ORCH-STATE-0004", "ORCH-ERR-0004")
def test_postgresql_stopped_and_restarted_under_a_running_server(
    tmp_path: Path, cluster: Cluster
) -> None:
    config = write_config(tmp_path / "llorch.yaml", cluster.create_database("outage"))
    serving = serve_process("--config", str(config), data_dir=tmp_path / "data")
    with serving as (url, _, log), httpx.Client(base_url=url, timeout=30) as client:
        sid = client.post("/v1/sessions", json={"budgets": {"tokens": 100_000}}).json()[
            "session_id"
        ]
        artifact = client.post("/v1/artifacts", json=DOCUMENT).json()["id"]
        # Two run through the outage and end while it lasts; two wait in the queue.
        running = [submit_to(client, max_tokens=80, session_id=sid) for _ in range(2)]
        queued = [submit_to(client, max_tokens=3, session_id=sid) for _ in range(2)]
        accepted = [t["task_id"] for t in running + queued]
        wait_until(lambda: task_of(client, accepted[0])["state"] == "running", "a start")

        cluster.stop(mode="immediate")
        refused_while_down(client, sid, accepted[0], artifact)
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and "storage" in not_ready.json()["message"]
        assert int(not_ready.headers["retry-after"]) >= 1
        assert client.get("/livez").status_code == 200
        # The running tasks end while it lasts: their ends wait, retried, for the database.
        for task in running:
            deferred = f"could not record the end of task {task['task_id']}"
            wait_until(lambda d=deferred: d in log.read_text(encoding="utf-8"), deferred)

        cluster.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready again")
        after = submit_to(client, max_tokens=3, session_id=sid)["task_id"]
        ended = {
            task_id: wait_until(
                lambda t=task_id: (task := task_of(client, t))["state"] in TERMINAL and task,
                f"task {task_id} ended",
                timeout_s=60,
            )
            for task_id in [*accepted, after]
        }
        replay = parse_sse(client.get(f"/v1/tasks/{accepted[0]}/stream").text)
        stored = client.get(f"/v1/artifacts/{artifact}")
        session = client.get(f"/v1/sessions/{sid}").json()
        listed = client.get("/v1/tasks", params={"session_id": sid, "limit": 50}).json()

    # Nothing accepted was lost: each task once, in one terminal state, with its usage charged.
    assert sorted(t["task_id"] for t in listed["items"]) == sorted([*accepted, after])
    for task in ended.values():
        assert task["state"] == "succeeded", (task, log.read_text(encoding="utf-8")[-6000:])
    # The stream of a task that ended during the outage: every token, one terminal frame.
    kinds = [e.event for e in replay]
    assert kinds.count("token") == 80 and [k for k in kinds if k in ("end", "error")] == ["end"]
    assert stored.status_code == 200 and stored.json()["content"] == DOCUMENT["content"]
    charged = sum(t["usage"]["tokens_in"] + t["usage"]["tokens_out"] for t in ended.values())
    assert session["budgets"]["tokens_remaining"] == 100_000 - charged
    lines = log.read_text(encoding="utf-8")
    assert "unreachable" in lines and "reachable again" in lines
