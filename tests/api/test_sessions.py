"""Sessions and budgets, in process."""

from __future__ import annotations

import pytest

from tests.conftest import SettingsFactory
from tests.support import assert_envelope, in_process, pool


@pytest.mark.req("ORCH-DATA-0070")
async def test_create_session_caps_requests_at_the_policy(settings_for: SettingsFactory) -> None:
    settings = settings_for(
        {
            "pools": [pool()],
            "budgets": {
                "default": {"tokens": 1000, "time_ms": 60_000, "cost": 1.0},
                "max": {"tokens": 5000, "time_ms": 120_000, "cost": 2.0},
            },
            "sessions": {"ttl_ms": 60_000, "max_ttl_ms": 120_000},
        }
    )
    async with in_process(settings) as api:
        default = await api.client.post("/v1/sessions")
        assert default.status_code == 201, default.text
        assert default.headers["location"] == f"/v1/sessions/{default.json()['session_id']}"
        assert default.json()["budgets"] == {
            "tokens_remaining": 1000,
            "time_ms_remaining": 60_000,
            "cost_remaining": 1.0,
        }
        asked = await api.client.post(
            "/v1/sessions",
            json={"ttl_ms": 999_000, "budgets": {"tokens": 99_999, "time_ms": 10, "cost": 50}},
        )
        body = asked.json()
        assert body["ttl_ms"] == 120_000
        assert body["budgets"] == {
            "tokens_remaining": 5000,
            "time_ms_remaining": 10,
            "cost_remaining": 2.0,
        }
        assert_envelope(
            await api.client.post("/v1/sessions", json={"budgets": {"tokens": -1}}),
            400,
            "INVALID_PARAMS",
        )


@pytest.mark.req("ORCH-DATA-0071")
async def test_session_view_and_delete(settings_for: SettingsFactory) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        session_id = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        fresh = (await api.client.get(f"/v1/sessions/{session_id}")).json()
        assert fresh["turns"] == 0 and fresh["kv_warmth"] is False
        assert fresh["last_pool_id"] is None and fresh["ttl_ms_remaining"] > 0

        task_id = (await api.submit(session_id=session_id)).json()["task_id"]
        await api.events(task_id)
        used = (await api.client.get(f"/v1/sessions/{session_id}")).json()
        assert used["turns"] == 1 and used["kv_warmth"] is True
        assert (used["last_pool_id"], used["last_replica_id"]) == ("default", "default-0")

        assert (await api.client.delete(f"/v1/sessions/{session_id}")).status_code == 204
        for response in (
            await api.client.get(f"/v1/sessions/{session_id}"),
            await api.client.delete(f"/v1/sessions/{session_id}"),
            await api.submit(session_id=session_id),
        ):
            assert_envelope(response, 404, "SESSION_NOT_FOUND")


@pytest.mark.req("ORCH-DATA-0082", "ORCH-DATA-0081")
async def test_usage_is_committed_and_the_reservation_released_when_a_task_ends(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 0, "eos": False})],
            "budgets": {"default": {"tokens": 1000, "time_ms": 600_000, "cost": 5.0}},
        }
    )
    async with in_process(settings) as api:
        session_id = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        accepted = await api.submit(session_id=session_id, prompt="a b c", max_tokens=50)
        # While it runs, the worst case is reserved (prompt estimate + max_tokens).
        assert int(accepted.headers["x-budget-tokens-remaining"]) <= 1000 - 50
        end = (await api.events(accepted.json()["task_id"]))[-1].data
        budgets = (await api.client.get(f"/v1/sessions/{session_id}")).json()["budgets"]
        assert budgets["tokens_remaining"] == 1000 - end["tokens_in"] - end["tokens_out"]
        assert budgets["cost_remaining"] == pytest.approx(5.0 - end["cost"])
        assert budgets["time_ms_remaining"] <= 600_000


@pytest.mark.req("ORCH-DATA-0082")
async def test_a_canceled_task_commits_what_it_used(settings_for: SettingsFactory) -> None:
    settings = settings_for(
        {
            "pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 200, "eos": False})],
            "budgets": {"default": {"tokens": 10_000}},
        }
    )
    async with in_process(settings) as api:
        session_id = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        task_id = (await api.submit(session_id=session_id, max_tokens=4000)).json()["task_id"]
        await api.wait_state(task_id, "running")
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel")).status_code == 204
        end = (await api.events(task_id))[-1]
        assert end.event == "end" and end.data["finish_reason"] == "canceled"
        budgets = (await api.client.get(f"/v1/sessions/{session_id}")).json()["budgets"]
        used = end.data["tokens_in"] + end.data["tokens_out"]
        assert budgets["tokens_remaining"] == 10_000 - used
        assert end.data["tokens_out"] < 4000
