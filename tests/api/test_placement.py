"""Cache-aware placement through the real app: two sessions sharing a long system prompt land on
the same replica, and the reason shows in the started event, the trace and the metrics."""

from __future__ import annotations

import pytest

from tests.api.test_artifacts import trace_of
from tests.conftest import SettingsFactory
from tests.support import in_process, pool

SYSTEM = "You answer questions about the shipping policy, briefly and politely. " * 12


def chat(user: str, **body: object) -> dict[str, object]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return {"model": "mock-small", "messages": messages, "max_tokens": 4, **body}


@pytest.mark.req("ORCH-ENG-0021", "ORCH-ENG-0024")
async def test_sessions_sharing_a_system_prompt_share_a_replica(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({"pools": [pool(replicas=4, max_context=4096)]})
    async with in_process(settings) as api:
        placed = []
        for n in range(6):
            # A new session each time: no affinity, only the prompt links them.
            accepted = await api.client.post("/v1/tasks", json=chat(f"question {n}"))
            assert accepted.status_code == 202, accepted.text
            task_id = accepted.json()["task_id"]
            started = (await api.events(task_id))[0]
            assert started.event == "started"
            placed.append((started.data["replica_id"], started.data["placement"]))
            trace = await trace_of(api, task_id)
            assert (trace["replica_id"], trace["placement"]) == placed[-1]
        session = accepted.json()["session_id"]
        again = await api.client.post("/v1/tasks", json=chat("more", session_id=session))
        follow = (await api.events(again.json()["task_id"]))[0].data
        exposition = (await api.client.get("/metrics")).text

    warm = placed[0][0]
    assert placed == [(warm, "least_loaded")] + [(warm, "prefix")] * 5
    assert (follow["replica_id"], follow["placement"], follow["kv_warmth"]) == (
        warm,
        "session",
        True,
    )
    assert 'llorch_placements_total{pool_id="default",reason="prefix"} 5.0' in exposition
    assert 'llorch_prefix_map_bytes{pool_id="default"}' in exposition
