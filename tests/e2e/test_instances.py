"""Two llorch processes on one PostgreSQL database: a start-up reconciles only the tasks of
instances whose heartbeat expired, never those a live instance is running."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.support import parse_sse, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

TTL_MS = 1000


def write_config(path: Path, database_url: str, instance_id: str) -> Path:
    config: dict[str, Any] = {
        "server": {"shutdown_grace_s": 0},
        "database": {
            "url": database_url,
            "instance_id": instance_id,
            "retry_ms": 100,
            "instance_ttl_ms": TTL_MS,
        },
        "pools": [
            {
                "id": "default",
                "model": "mock-small",
                "replicas": 1,
                "mock": {"ttft_ms": 0, "tokens_per_s": 20, "eos": False},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def heartbeat_expired(database_url: str, instance_id: str) -> bool:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT heartbeat_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - %s "
            "FROM instances WHERE instance_id = %s",
            (TTL_MS, instance_id),
        ).fetchone()
    return bool(found and found[0])


@pytest.mark.req("ORCH-STATE-0012")
def test_a_second_instance_leaves_the_first_ones_running_tasks_alone(
    tmp_path: Path, postgres_url: str
) -> None:
    config_a = write_config(tmp_path / "a.yaml", postgres_url, "a")
    config_b = write_config(tmp_path / "b.yaml", postgres_url, "b")
    with (
        serve_process("--config", str(config_a), data_dir=tmp_path / "a") as (url_a, _, _),
        httpx.Client(base_url=url_a, timeout=30) as a,
    ):
        # Ten seconds of tokens: longer than B's start-up takes even on a loaded machine.
        task_id = submit_to(a, max_tokens=200)["task_id"]
        wait_until(lambda: task_of(a, task_id)["state"] == "running", "the task runs on A")
        with (
            serve_process("--config", str(config_b), data_dir=tmp_path / "b") as (url_b, _, _),
            httpx.Client(base_url=url_b, timeout=30) as b,
        ):
            seen_from_b = task_of(b, task_id)  # B started, its reconcile done
            events = parse_sse(a.get(f"/v1/tasks/{task_id}/stream").text)
            ended = task_of(b, task_id)

    assert seen_from_b["state"] == "running", seen_from_b
    assert [e.event for e in events].count("token") == 200
    assert [e.event for e in events if e.event in ("end", "error")] == ["end"]
    assert ended["state"] == "succeeded" and ended["usage"]["tokens_out"] == 200


@pytest.mark.req("ORCH-STATE-0012", "ORCH-STATE-0001")
def test_the_tasks_of_an_instance_whose_heartbeat_expired_are_reconciled(
    tmp_path: Path, postgres_url: str
) -> None:
    config_a = write_config(tmp_path / "a.yaml", postgres_url, "a")
    config_b = write_config(tmp_path / "b.yaml", postgres_url, "b")
    with (
        serve_process("--config", str(config_a), data_dir=tmp_path / "a") as (url_a, proc, _),
        httpx.Client(base_url=url_a, timeout=30) as a,
    ):
        running = submit_to(a, max_tokens=4000)["task_id"]
        wait_until(lambda: task_of(a, running)["state"] == "running", "the task runs on A")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    wait_until(lambda: heartbeat_expired(postgres_url, "a"), "A's heartbeat expired")
    with (
        serve_process("--config", str(config_b), data_dir=tmp_path / "b") as (url_b, _, _),
        httpx.Client(base_url=url_b, timeout=30) as b,
    ):
        ended = task_of(b, running)

    assert ended["state"] == "failed" and ended["error"]["code"] == "WORKER_RESET", ended
