"""Fair queues through the real app: two API keys share a pool; one floods it with batch tasks.

The pool has one replica with one slot, held by a task that would take a minute; each time the
running task is canceled through the API, the queue's next task starts. So the order in which
tasks reach ``running`` is the pool's real dispatch order.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.support import BUSY, InProcess, in_process, pool, task_body

SECRETS = {"alice": "alice-0b7d2a4f1c9e", "bob": "bob-c0e5f793ab11"}


def keys() -> list[dict[str, Any]]:
    return [
        {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), "scopes": ["data"]}
        for name, secret in SECRETS.items()
    ]


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def one_slot_pool(**queue: Any) -> dict[str, Any]:
    return pool(slots_per_replica=1, mock=BUSY, queue={"capacity": 1100, **queue})


async def submit(api: InProcess, who: str, **body: Any) -> dict[str, Any]:
    response = await api.client.post("/v1/tasks", json=task_body(**body), headers=as_(who))
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def running_task(api: InProcess, who: str) -> str:
    listed = await api.client.get("/v1/tasks", params={"state": "running"}, headers=as_(who))
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    return str(items[0]["task_id"]) if items else ""


async def next_started(api: InProcess, running: str, owner_of: dict[str, str]) -> str:
    """Cancel the running task; answer the one the dispatcher starts in its place."""
    cancel = await api.client.post(f"/v1/tasks/{running}/cancel", headers=as_(owner_of[running]))
    assert cancel.status_code == 204, cancel.text
    await wait_state_as(api, running, owner_of[running], "canceled")
    async with asyncio.timeout(10):
        while True:
            for who in SECRETS:
                if started := await running_task(api, who):
                    return started
            await asyncio.sleep(0.002)


async def wait_state_as(api: InProcess, task_id: str, who: str, state: str) -> None:
    async with asyncio.timeout(10):
        while True:
            task = (await api.client.get(f"/v1/tasks/{task_id}", headers=as_(who))).json()
            if task["state"] == state:
                return
            await asyncio.sleep(0.002)


@pytest.mark.req("ORCH-DATA-0026", "ORCH-DATA-0029")
async def test_a_thousand_batch_tasks_of_one_key_do_not_hold_back_another_keys_twenty(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({"pools": [one_slot_pool()], "auth": {"keys": keys()}})
    async with in_process(settings) as api:
        gate = await submit(api, "alice")
        await wait_state_as(api, gate["task_id"], "alice", "running")
        owner_of = {gate["task_id"]: "alice"}
        flood = [await submit(api, "alice", priority="batch") for _ in range(1000)]
        owner_of |= {t["task_id"]: "alice" for t in flood}
        assert [t["queue_position"] for t in flood] == list(range(1000))
        bobs = [await submit(api, "bob", priority="batch") for _ in range(20)]
        owner_of |= {t["task_id"]: "bob" for t in bobs}

        # The round-robin's bound: bob's k-th task is promised a place within 2k + 2 dispatches.
        promised = [t["queue_position"] for t in bobs]
        assert all(p <= 2 * k + 1 for k, p in enumerate(promised)), promised
        starts = [t["predicted_start_ms"] for t in bobs]
        assert starts == sorted(starts) and starts[-1] < flood[-1]["predicted_start_ms"]
        read = await api.client.get(f"/v1/tasks/{bobs[5]['task_id']}", headers=as_("bob"))
        assert read.json()["queue_position"] == promised[5]

        # The real dispatch order: 40 dispatches start all of bob's 20 tasks, each where promised.
        order, running = [], gate["task_id"]
        for _ in range(40):
            running = await next_started(api, running, owner_of)
            order.append(running)
        for k, task in enumerate(bobs):
            assert order.index(task["task_id"]) == promised[k]


@pytest.mark.req("ORCH-DATA-0027")
async def test_weights_3_to_1_give_the_weighted_key_three_dispatches_in_four(
    settings_for: SettingsFactory,
) -> None:
    fairness = {"weights": {"alice": 3}}
    settings = settings_for({"pools": [one_slot_pool(fairness=fairness)], "auth": {"keys": keys()}})
    async with in_process(settings) as api:
        gate = await submit(api, "bob")
        await wait_state_as(api, gate["task_id"], "bob", "running")
        owner_of = {gate["task_id"]: "bob"}
        for _ in range(30):
            for who in ("bob", "alice"):
                owner_of[(await submit(api, who, priority="batch"))["task_id"]] = who
        order, running = [], gate["task_id"]
        for _ in range(24):
            running = await next_started(api, running, owner_of)
            order.append(owner_of[running])
        # Exact to within one round (4 dispatches): 18 of 24, and 3 of every 4.
        assert order.count("alice") == 18, order
        assert all(order[i : i + 4].count("alice") == 3 for i in range(0, 24, 4)), order


@pytest.mark.req("ORCH-DATA-0026")
async def test_flows_can_be_named_by_a_declared_header(settings_for: SettingsFactory) -> None:
    fairness = {"flow": "header", "header": "X-Tenant"}
    settings = settings_for({"pools": [one_slot_pool(fairness=fairness)]})
    async with in_process(settings) as api:

        async def tenant(name: str) -> httpx.Response:
            return await api.client.post(
                "/v1/tasks", json=task_body(priority="batch"), headers={"X-Tenant": name}
            )

        gate = (await api.submit()).json()
        await api.wait_state(gate["task_id"], "running")
        flooded = [(await tenant("acme")).json()["queue_position"] for _ in range(10)]
        other = [(await tenant("umbrella")).json()["queue_position"] for _ in range(3)]
        assert flooded == list(range(10))
        assert other == [1, 3, 5]


@pytest.mark.req("ORCH-DATA-0028")
async def test_a_steady_interactive_stream_leaves_batch_its_minimum_share(
    settings_for: SettingsFactory,
) -> None:
    share = 0.25
    settings = settings_for(
        {"pools": [one_slot_pool(batch_min_share=share)], "auth": {"keys": keys()}}
    )
    async with in_process(settings) as api:
        gate = await submit(api, "alice")
        await wait_state_as(api, gate["task_id"], "alice", "running")
        owner_of = {gate["task_id"]: "alice"}
        priority_of = {}
        for priority in ["batch"] * 10 + ["interactive"] * 4:
            accepted = await submit(api, "alice", priority=priority)
            owner_of[accepted["task_id"]] = "alice"
            priority_of[accepted["task_id"]] = priority
        dispatched, running = [], gate["task_id"]
        for _ in range(24):
            # Interactive work keeps arriving: one more for every task that starts.
            accepted = await submit(api, "alice", priority="interactive")
            owner_of[accepted["task_id"]] = "alice"
            priority_of[accepted["task_id"]] = "interactive"
            running = await next_started(api, running, owner_of)
            dispatched.append(priority_of[running])

    # One dispatch in every four goes to batch while interactive waits: 6 of 24, evenly.
    assert dispatched.count("batch") >= share * len(dispatched), dispatched
    assert all(dispatched[i : i + 4].count("batch") == 1 for i in range(0, 24, 4)), dispatched
