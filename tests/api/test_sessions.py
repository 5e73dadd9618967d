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


@pytest.mark.req("ORCH-DATA-0081", "ORCH-DATA-0084")
async def test_prompts_of_short_words_cannot_overspend_a_session(
    settings_for: SettingsFactory,
) -> None:
    # The mock counts a token a word: "a a a ..." is a token every two bytes, twice what four
    # bytes a token assumes. Reserved at four bytes a token, nine of these tasks fitted a
    # budget of 1,000 and spent 1,872 (issue 15, F4).
    settings = settings_for(
        {
            "pools": [pool(slots_per_replica=16, mock={"ttft_ms": 50, "tokens_per_s": 0})],
            "budgets": {"default": {"tokens": 1000, "time_ms": 600_000, "cost": 5.0}},
        }
    )
    prompt = " ".join(["a"] * 200)
    async with in_process(settings) as api:
        session_id = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        accepted: list[str] = []
        for _ in range(20):
            answer = await api.submit(session_id=session_id, prompt=prompt, max_tokens=8)
            if answer.status_code != 202:
                assert_envelope(answer, 429, "BUDGET_EXHAUSTED")
                break
            accepted.append(answer.json()["task_id"])
        ends = [(await api.events(task_id))[-1] for task_id in accepted]
        budgets = (await api.client.get(f"/v1/sessions/{session_id}")).json()["budgets"]

    assert accepted, "the first task fits the budget"
    assert all(end.event == "end" for end in ends)
    spent = sum(end.data["tokens_in"] + end.data["tokens_out"] for end in ends)
    assert all(end.data["tokens_in"] == 200 for end in ends)
    assert spent <= 1000
    assert budgets["tokens_remaining"] == 1000 - spent


@pytest.mark.req("ORCH-DATA-0084")
async def test_a_run_longer_than_the_session_has_left_is_charged_what_it_had(
    settings_for: SettingsFactory,
) -> None:
    # The engine sends a token and falls silent: the run lasts the decode timeout (200 ms),
    # while the reservation (the typical run: 1 ms) fitted the session's 20 ms.
    silent = pool(
        decode_timeout_ms=200,
        mock={"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "hang", "after_tokens": 1}},
    )
    async with in_process(settings_for({"pools": [silent]})) as api:
        session = await api.client.post("/v1/sessions", json={"budgets": {"time_ms": 20}})
        session_id = session.json()["session_id"]
        task_id = (await api.submit(session_id=session_id, max_tokens=8)).json()["task_id"]
        error = (await api.events(task_id))[-1]
        budgets = (await api.client.get(f"/v1/sessions/{session_id}")).json()["budgets"]
        task = (await api.client.get(f"/v1/tasks/{task_id}")).json()
        metrics = (await api.client.get("/metrics")).text

    assert error.data["code"] == "DECODE_TIMEOUT"
    assert task["state"] == "failed"
    assert budgets["time_ms_remaining"] == 0
    assert 'llorch_budget_overruns_total{policy_label="time"} 1.0' in metrics
