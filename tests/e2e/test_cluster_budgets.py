"""Budgets on a cluster: three ``llorch serve`` processes on one PostgreSQL database admit
concurrent tasks of one session; together they never reserve more than the session has, and
every task's usage is committed once (ORCH-STATE-0050, ORCH-STATE-0051)."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.e2e.cluster import instances
from tests.e2e.test_instances import TTL_MS, heartbeat_expired
from tests.support import MODEL, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

ATTEMPTS = 300
THREADS_PER_INSTANCE = 3
# "p" reserves its bound (1 byte + 8 markers) plus max_tokens.
MAX_TOKENS = 4
RESERVED = 1 + 8 + MAX_TOKENS


def race(clients: list[httpx.Client], session_id: str) -> list[httpx.Response]:
    """ATTEMPTS submissions to the session, spread over the instances, from
    THREADS_PER_INSTANCE threads each, all at once."""
    body = {"model": MODEL, "prompt": "p", "max_tokens": MAX_TOKENS, "session_id": session_id}
    targets = itertools.islice(itertools.cycle(clients), ATTEMPTS)
    workers = THREADS_PER_INSTANCE * len(clients)
    with ThreadPoolExecutor(max_workers=workers) as executor:
        return list(executor.map(lambda c: c.post("/v1/tasks", json=body), targets))


def split(answers: list[httpx.Response]) -> list[httpx.Response]:
    """The 202s; every other answer must be the session's budget refusal."""
    refused = [a for a in answers if a.status_code != 202]
    for answer in refused:
        assert answer.status_code == 429, answer.text
        assert answer.json()["code"] == "BUDGET_EXHAUSTED", answer.text
        assert answer.json()["policy_label"] == "tokens", answer.text
    return [a for a in answers if a.status_code == 202]


def budgets_seen(clients: list[httpx.Client], session_id: str) -> list[dict[str, Any]]:
    return [c.get(f"/v1/sessions/{session_id}").json()["budgets"] for c in clients]


def stored(database_url: str, sql: str, *params: Any) -> tuple[Any, ...]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(sql, params).fetchone()
    assert found is not None
    return tuple(found)


def all_ended(clients: list[httpx.Client], task_ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        states = [task_of(clients[0], t)["state"] for t in task_ids]
        return all(s in ("succeeded", "failed", "canceled") for s in states)

    return check


@pytest.mark.req("ORCH-STATE-0050", "ORCH-STATE-0051")
def test_three_instances_never_reserve_more_than_the_session_has(
    tmp_path: Path, postgres_url: str
) -> None:
    # The tasks wait for their first token all through the race: they hold their reservations.
    pools = [{"id": "default", "model": MODEL, "slots_per_replica": 4,
              "mock": {"ttft_ms": 600_000}}]  # fmt: skip
    budget = 200
    with instances(tmp_path, postgres_url, pools, 3) as clients:
        # Time enough for every task's wait: tokens are what runs out.
        created = clients[0].post(
            "/v1/sessions", json={"budgets": {"tokens": budget, "time_ms": 86_400_000}}
        )
        session_id = created.json()["session_id"]
        admitted = split(race(clients, session_id))

        # Every refusal came once the budget was reserved: exactly as many fit as it holds.
        assert len(admitted) == budget // RESERVED, [a.json() for a in admitted]
        left = budget - len(admitted) * RESERVED
        seen = budgets_seen(clients, session_id)
        assert [s["tokens_remaining"] for s in seen] == [left] * 3, seen
        assert all(int(a.headers["X-Budget-Tokens-Remaining"]) >= left for a in admitted)
        assert stored(
            postgres_url, "SELECT tokens_reserved FROM sessions WHERE session_id = %s", session_id
        ) == (len(admitted) * RESERVED,)

        # Ended (on the instance that runs each), every reservation is released.
        by_task = {a.json()["task_id"]: a.url.host + str(a.url.port) for a in admitted}
        origin = {c.base_url.host + str(c.base_url.port): c for c in clients}
        for task_id, where in by_task.items():
            assert origin[where].post(f"/v1/tasks/{task_id}/cancel").status_code == 204
        wait_until(all_ended(clients, list(by_task)), "every admitted task ended")
        assert_committed_once(postgres_url, clients, session_id, budget)


@pytest.mark.req("ORCH-STATE-0050", "ORCH-STATE-0051")
def test_tasks_ending_on_three_instances_commit_their_usage_exactly_once(
    tmp_path: Path, postgres_url: str
) -> None:
    pools = [{"id": "default", "model": MODEL, "slots_per_replica": 4,
              "mock": {"ttft_ms": 1, "tokens_per_s": 0, "eos": False}}]  # fmt: skip
    budget = 600
    with instances(tmp_path, postgres_url, pools, 3) as clients:
        session_id = clients[0].post("/v1/sessions", json={"budgets": {"tokens": budget}})
        session_id = session_id.json()["session_id"]
        admitted = split(race(clients, session_id))
        task_ids = [a.json()["task_id"] for a in admitted]
        wait_until(all_ended(clients, task_ids), "every admitted task ended", timeout_s=60)
        # Tasks end as others are admitted: more are admitted than fit at once, never too many.
        assert len(admitted) >= budget // RESERVED
        assert_committed_once(postgres_url, clients, session_id, budget)


def assert_committed_once(
    database_url: str, clients: list[httpx.Client], session_id: str, budget: int
) -> None:
    """The session's committed usage is the sum of its tasks' usage, each counted once, and
    no reservation is left open: every instance tells the same remainder."""
    used, still_held = stored(
        database_url,
        "SELECT COALESCE(SUM(tokens_in + tokens_out), 0), "
        "COUNT(*) FILTER (WHERE reserved_tokens IS NOT NULL) FROM tasks WHERE session_id = %s",
        session_id,
    )
    remaining, reserved = stored(
        database_url,
        "SELECT tokens_remaining, tokens_reserved FROM sessions WHERE session_id = %s",
        session_id,
    )
    assert (still_held, reserved) == (0, 0)
    assert 0 <= used <= budget
    assert remaining == budget - used
    seen = budgets_seen(clients, session_id)
    assert [s["tokens_remaining"] for s in seen] == [budget - used] * len(clients), seen


@pytest.mark.req("ORCH-STATE-0051")
def test_the_reservation_of_a_dead_instances_task_is_released_by_the_survivor(
    tmp_path: Path, postgres_url: str
) -> None:
    pools = [{"id": "default", "model": MODEL, "mock": {"ttft_ms": 600_000}}]
    database = {"url": postgres_url, "retry_ms": 100, "instance_ttl_ms": TTL_MS}

    def config(name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        own = {**database, "instance_id": name}
        body = {"server": {"shutdown_grace_s": 0}, "pools": pools, "database": own}
        path.write_text(yaml.safe_dump(body))
        return str(path)

    with (
        serve_process("--config", config("a"), data_dir=tmp_path / "a") as (url, proc, _),
        httpx.Client(base_url=url, timeout=30) as a,
    ):
        budgets = {"tokens": 100, "time_ms": 86_400_000}
        session_id = a.post("/v1/sessions", json={"budgets": budgets}).json()["session_id"]
        task_id = submit_to(a, max_tokens=MAX_TOKENS, session_id=session_id)["task_id"]
        wait_until(lambda: task_of(a, task_id)["state"] == "running", "the task runs on A")
        assert budgets_seen([a], session_id)[0]["tokens_remaining"] == 100 - RESERVED
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    wait_until(lambda: heartbeat_expired(postgres_url, "a"), "A's heartbeat expired")
    with (
        serve_process("--config", config("b"), data_dir=tmp_path / "b") as (url, _, _),
        httpx.Client(base_url=url, timeout=30) as b,
    ):
        ended = task_of(b, task_id)  # B's start reconciled it
        assert ended["state"] == "failed" and ended["error"]["code"] == "WORKER_RESET", ended
        assert_committed_once(postgres_url, [b], session_id, 100)
