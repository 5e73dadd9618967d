"""The control plane on a cluster: two ``llorch serve`` processes on one PostgreSQL database.
A drain, resume or reload issued on one instance holds on both (ORCH-STATE-0052); an artifact
stored through one, a task's trace included, is read through the other (ORCH-STATE-0054)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import instances
from tests.support import MODEL, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

POOLS = [
    {
        "id": "default",
        "model": MODEL,
        "models": ["mock-large"],
        "health_interval_ms": 100,
        "mock": {"ttft_ms": 1, "tokens_per_s": 0},
    }
]


def health(client: httpx.Client) -> dict[str, Any]:
    found: dict[str, Any] = client.get("/v1/pools/default/health").json()
    return found


def capabilities_draining(client: httpx.Client) -> bool:
    pools = client.get("/v1/capabilities").json()["pools"]
    return bool(pools[0]["draining"])


@pytest.mark.req("ORCH-STATE-0052")
def test_drain_resume_and_reload_on_one_instance_hold_on_the_other(
    tmp_path: Path, postgres_url: str
) -> None:
    with instances(tmp_path, postgres_url, POOLS, 2) as (a, b):
        assert a.post("/v1/pools/default/drain", json={"deadline_ms": 5000}).status_code == 202
        wait_until(lambda: health(b)["draining"], "B drains the pool too", timeout_s=10)
        refused = b.post("/v1/tasks", json={"model": MODEL, "prompt": "p", "max_tokens": 3})
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "POOL_UNAVAILABLE"
        assert capabilities_draining(a) and capabilities_draining(b)
        # Drained already, on B as on A.
        assert b.post("/v1/pools/default/drain", json={"deadline_ms": 5000}).status_code == 409

        assert b.post("/v1/pools/default/resume").status_code == 202
        wait_until(lambda: not health(a)["draining"], "A serves the pool again", timeout_s=10)
        task_id = submit_to(a, max_tokens=3)["task_id"]
        wait_until(lambda: task_of(a, task_id)["state"] == "succeeded", "A runs a task")
        assert not capabilities_draining(a) and not capabilities_draining(b)

        assert b.post("/v1/pools/default/reload", json={"model": "mock-large"}).status_code == 202
        for client in (a, b):
            wait_until(
                lambda c=client: (h := health(c))["model"] == "mock-large" and not h["reloading"],
                "both serve the reloaded model",
                timeout_s=10,
            )
        task_id = submit_to(a, model="mock-large", max_tokens=3)["task_id"]
        wait_until(lambda: task_of(a, task_id)["state"] == "succeeded", "A runs the new model")


@pytest.mark.req("ORCH-STATE-0052")
def test_an_instance_that_starts_later_takes_the_clusters_drain(
    tmp_path: Path, postgres_url: str
) -> None:
    with instances(tmp_path, postgres_url, POOLS, 1) as (a,):
        assert a.post("/v1/pools/default/drain", json={"deadline_ms": 5000}).status_code == 202
        with instances(tmp_path, postgres_url, POOLS, 1, prefix="late") as (late,):
            assert health(late)["draining"]


@pytest.mark.req("ORCH-STATE-0054")
def test_an_artifact_and_a_trace_stored_through_one_instance_are_read_through_the_other(
    tmp_path: Path, postgres_url: str
) -> None:
    with instances(tmp_path, postgres_url, POOLS, 2) as (a, b):
        body = {"kind": "prompt", "content": "You are terse. \u00e9\u4e2d", "tags": ["system"]}
        created = a.post("/v1/artifacts", json=body)
        assert created.status_code == 201, created.text
        artifact_id = created.json()["id"]
        read = b.get(f"/v1/artifacts/{artifact_id}")
        assert read.status_code == 200, read.text
        assert (read.json()["id"], read.json()["content"]) == (artifact_id, body["content"])

        task_id = submit_to(a, max_tokens=3)["task_id"]
        wait_until(lambda: task_of(a, task_id)["state"] == "succeeded", "the task ends on A")
        trace_id = task_of(b, task_id)["trace_artifact_id"]
        on_a, on_b = a.get(f"/v1/artifacts/{trace_id}"), b.get(f"/v1/artifacts/{trace_id}")
        assert on_b.status_code == 200, on_b.text
        assert on_b.json() == on_a.json() and on_b.json()["kind"] == "trace"
    # No body is a file of an instance: they are in the database.
    assert not any(p.is_file() for p in tmp_path.glob("*/artifacts-*/**/*"))


def live_instances(client: httpx.Client) -> float:
    for line in client.get("/metrics", headers=PROM).text.splitlines():
        if line.startswith("llorch_instances_live "):
            return float(line.split()[1])
    return 0.0


SECRET = "cluster-key-secret"
KEY = {"Authorization": f"Bearer {SECRET}"}
PROM_SECRET = "cluster-prom-secret"
PROM = {"Authorization": f"Bearer {PROM_SECRET}"}
BURST = 4


@pytest.mark.req("ORCH-STATE-0053")
def test_a_keys_rate_limit_is_shared_by_the_live_instances(
    tmp_path: Path, postgres_url: str
) -> None:
    # Almost no refill during the test: what each instance allows is its share of the burst.
    key = {
        "name": "shared",
        "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
        "scopes": ["data"],
        "rate_limit": {"per_s": 0.001, "burst": BURST},
    }
    prom = {
        "name": "prom",
        "sha256": hashlib.sha256(PROM_SECRET.encode()).hexdigest(),
        "scopes": ["metrics"],
    }
    with instances(tmp_path, postgres_url, POOLS, 2, auth={"keys": [key, prom]}) as clients:
        for client in clients:
            wait_until(lambda c=client: live_instances(c) == 2, "each counts two instances")
        answers = [c.post("/v1/sessions", json={}, headers=KEY) for c in clients for _ in range(4)]
    statuses = [a.status_code for a in answers]
    assert sorted(statuses) == [201] * BURST + [429] * (len(answers) - BURST), statuses
    assert statuses[:4].count(201) == statuses[4:].count(201) == BURST // 2
