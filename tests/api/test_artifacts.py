"""The artifact store over HTTP, and the trace artifact every task leaves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import SettingsFactory
from tests.support import BUSY, InProcess, assert_envelope, fill_slots, in_process, pool


async def trace_of(api: InProcess, task_id: str) -> dict[str, Any]:
    task = (await api.client.get(f"/v1/tasks/{task_id}")).json()
    assert task["trace_artifact_id"], task
    response = await api.client.get(f"/v1/artifacts/{task['trace_artifact_id']}")
    assert response.status_code == 200, response.text
    artifact = response.json()
    assert artifact["kind"] == "trace" and artifact["task_id"] == task_id
    trace: dict[str, Any] = json.loads(artifact["content"])
    return trace


@pytest.mark.req("ORCH-CTRL-0020", "ORCH-CTRL-0022", "ORCH-CTRL-0023")
async def test_store_read_and_list_over_http(settings_for: SettingsFactory) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        body = {"kind": "prompt", "content": "You are terse.", "tags": ["system"]}
        created = await api.client.post("/v1/artifacts", json=body)
        assert created.status_code == 201, created.text
        artifact = created.json()
        assert artifact["id"] == "sha256:" + artifact["digest"]
        assert created.headers["location"] == f"/v1/artifacts/{artifact['id']}"
        again = await api.client.post("/v1/artifacts", json=body)
        assert again.status_code == 200 and again.json()["id"] == artifact["id"]

        read = (await api.client.get(f"/v1/artifacts/{artifact['id']}")).json()
        assert read["content"] == "You are terse." and read["tags"] == ["system"]
        await api.client.post("/v1/artifacts", json={"kind": "document", "content": "other"})
        page = (await api.client.get("/v1/artifacts", params={"tag": "system"})).json()
        assert [a["id"] for a in page["items"]] == [artifact["id"]]

        missing = "sha256:" + "0" * 64
        assert_envelope(await api.client.get(f"/v1/artifacts/{missing}"), 404, "ARTIFACT_NOT_FOUND")
        for bad in ("sha256:ABC", "sha256:" + "g" * 64, "sha256:" + "A" * 64):
            assert_envelope(await api.client.get(f"/v1/artifacts/{bad}"), 400, "INVALID_PARAMS")
        # An id with a slash is not even a route: it can never name a file.
        traversal = await api.client.get("/v1/artifacts/..%2F..%2Fetc%2Fpasswd")
        assert_envelope(traversal, 404, "NOT_FOUND")


@pytest.mark.req("ORCH-CTRL-0021")
async def test_artifact_limits_answer_413_and_400(settings_for: SettingsFactory) -> None:
    settings = settings_for({"artifacts": {"max_bytes": 1024}, "pools": [pool()]})
    async with in_process(settings) as api:
        too_big = await api.client.post(
            "/v1/artifacts", json={"kind": "other", "content": "x" * 1025}
        )
        assert_envelope(too_big, 413, "PAYLOAD_TOO_LARGE")
        fits = await api.client.post("/v1/artifacts", json={"kind": "other", "content": "x" * 1024})
        assert fits.status_code == 201
        unknown = await api.client.post("/v1/artifacts", json={"kind": "movie", "content": "x"})
        assert_envelope(unknown, 400, "INVALID_PARAMS")


@pytest.mark.req("ORCH-CTRL-0025", "ORCH-CTRL-0024")
async def test_a_corrupted_body_is_reported_never_served(
    settings_for: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for({"pools": [pool()]})
    async with in_process(settings) as api:
        artifact = (
            await api.client.post("/v1/artifacts", json={"kind": "document", "content": "truth"})
        ).json()
        digest = artifact["digest"]
        path = settings.artifacts_dir / digest[:2] / digest
        assert path.read_text() == "truth"
        path.write_text("tampered")  # the disk changed under the server
        response = await api.client.get(f"/v1/artifacts/{artifact['id']}")
        body = assert_envelope(response, 500, "ARTIFACT_CORRUPT")
        assert "tampered" not in response.text and str(path) not in body["message"]
        assert any(artifact["id"] in r.getMessage() for r in caplog.records)


@pytest.mark.req("ORCH-CTRL-0026")
async def test_every_task_leaves_a_trace_however_it_ends(settings_for: SettingsFactory) -> None:
    settings = settings_for(
        {
            "pools": [
                pool(mock={"ttft_ms": 0, "tokens_per_s": 0, "eos": False}),
                pool(
                    id="busy",
                    model="slow",
                    slots_per_replica=1,
                    mock=BUSY,
                    queue={"capacity": 1, "policy": "drop-lru"},
                ),
                pool(id="broken", model="broken", mock={"failure": {"mode": "before_first_token"}}),
            ],
            "server": {"shutdown_grace_s": 0},
        }
    )
    async with in_process(settings) as api:
        done = (await api.submit(max_tokens=4, seed=11)).json()["task_id"]
        await api.events(done)
        trace = await trace_of(api, done)
        assert trace["state"] == "succeeded" and trace["seed"] == 11
        assert trace["request"]["max_tokens"] == 4
        assert (trace["pool_id"], trace["replica_id"], trace["engine"]) == (
            "default",
            "default-0",
            "mock",
        )
        assert trace["engine_version"] and trace["usage"]["tokens_out"] == 4
        kinds = [e["event"] for e in trace["transcript"]]
        assert kinds == ["started", "token", "token", "token", "token", "end"]
        assert [e["id"] for e in trace["transcript"]] == [e.id for e in await api.events(done)]

        failed = (await api.submit(model="broken")).json()["task_id"]
        await api.events(failed)
        assert (await trace_of(api, failed))["error"]["code"] == "ENGINE_ERROR"

        [running] = await fill_slots(api, 1, model="slow")
        dropped = (await api.submit(model="slow", priority="batch")).json()["task_id"]
        assert (await api.submit(model="slow", priority="interactive")).status_code == 202
        assert (await trace_of(api, dropped))["error"]["code"] == "QUEUE_FULL_DROP_LRU"
        assert (await api.client.post(f"/v1/tasks/{running}/cancel")).status_code == 204
        await api.wait_state(running, "canceled")
        canceled = await trace_of(api, running)
        assert canceled["finish_reason"] == "canceled"
        assert canceled["transcript"][-1]["data"]["finish_reason"] == "canceled"
        listed = (await api.client.get("/v1/artifacts", params={"task_id": running})).json()
        assert [a["kind"] for a in listed["items"]] == ["trace"]
