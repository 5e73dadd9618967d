"""Input limits at their boundary: the limit is accepted, one past it is a 400 envelope."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llorch.contracts import openapi
from tests.support import in_process, make_settings, pool, task_body

# A pool and budgets roomy enough that only the contract's limits decide.
ROOMY = {
    "pools": [pool(max_context=2_000_000, max_tokens_out=1_000_000)],
    "budgets": {
        "default": {"tokens": 5_000_000, "time_ms": 86_400_000, "cost": 1000},
        "max": {"tokens": 5_000_000, "time_ms": 86_400_000, "cost": 1000},
    },
    "server": {"max_body_bytes": 4_194_304},
    "artifacts": {"max_bytes": 4096},  # test_an_artifact_at_max_bytes_is_... uses it
}

Body = dict[str, Any]


def schema(document: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = openapi(document)["components"]["schemas"][name]
    return found


def task_limit(field: str) -> int:
    value: int = schema("data", "TaskRequest")["properties"][field]["maxLength"]
    return value


TASK_CASES: list[tuple[str, Callable[[int], Body], int]] = [
    ("prompt length", lambda n: task_body(prompt="p" * n), task_limit("prompt")),
    (
        "message content length",
        lambda n: task_body(prompt=None, messages=[{"role": "user", "content": "m" * n}]),
        schema("data", "ChatMessage")["properties"]["content"]["maxLength"],
    ),
    (
        "messages count",
        lambda n: task_body(prompt=None, messages=[{"role": "user", "content": "hi"}] * n),
        schema("data", "TaskRequest")["properties"]["messages"]["maxItems"],
    ),
    (
        "max_tokens",
        lambda n: task_body(max_tokens=n),
        schema("data", "TaskRequest")["properties"]["max_tokens"]["maximum"],
    ),
    (
        "stop count",
        lambda n: task_body(stop=[f"s{i}" for i in range(n)]),
        schema("data", "TaskRequest")["properties"]["stop"]["maxItems"],
    ),
    (
        "stop string length",
        lambda n: task_body(stop=["s" * n]),
        schema("data", "TaskRequest")["properties"]["stop"]["items"]["maxLength"],
    ),
    ("model name length", lambda n: task_body(model="m" * n), task_limit("model")),
    ("task id length", lambda n: task_body(task_id="t" * n), 64),
]


def without_none(body: Body) -> Body:
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.req("ORCH-SEC-0050")
@pytest.mark.parametrize(("name", "make", "limit"), TASK_CASES, ids=[c[0] for c in TASK_CASES])
async def test_task_inputs_at_and_past_their_limit(
    tmp_path: Path, name: str, make: Callable[[int], Body], limit: int
) -> None:
    async with in_process(make_settings(tmp_path, ROOMY)) as app:
        at = await app.client.post("/v1/tasks", json=without_none(make(limit)))
        past = await app.client.post("/v1/tasks", json=without_none(make(limit + 1)))
        if at.status_code == 202:
            await app.client.post(f"/v1/tasks/{at.json()['task_id']}/cancel")

    if name == "model name length":
        # A model name at the limit is well-formed but unknown: past the schema, into routing.
        assert at.status_code == 400, at.text
        assert "unknown model" in at.json()["message"]
    else:
        assert at.status_code == 202, at.text
    assert past.status_code == 400, past.text
    assert past.json()["code"] == "INVALID_PARAMS"
    assert "unknown model" not in past.json()["message"]


def artifact_limits() -> dict[str, Any]:
    found: dict[str, Any] = schema("control", "ArtifactCreate")["properties"]
    return found


ARTIFACT_CASES: list[tuple[str, Callable[[int], Body], int]] = [
    (
        "tags count",
        lambda n: {"kind": "other", "content": "c", "tags": [f"t{i}" for i in range(n)]},
        artifact_limits()["tags"]["maxItems"],
    ),
    (
        "tag length",
        lambda n: {"kind": "other", "content": "c", "tags": ["t" * n]},
        schema("control", "Tag")["maxLength"],
    ),
    (
        "metadata entries",
        lambda n: {"kind": "other", "content": "c", "metadata": {f"k{i}": "v" for i in range(n)}},
        artifact_limits()["metadata"]["maxProperties"],
    ),
    (
        "metadata value length",
        lambda n: {"kind": "other", "content": "c", "metadata": {"k": "v" * n}},
        artifact_limits()["metadata"]["additionalProperties"]["maxLength"],
    ),
]


@pytest.mark.req("ORCH-SEC-0050")
@pytest.mark.parametrize(
    ("name", "make", "limit"), ARTIFACT_CASES, ids=[c[0] for c in ARTIFACT_CASES]
)
async def test_artifact_inputs_at_and_past_their_limit(
    tmp_path: Path, name: str, make: Callable[[int], Body], limit: int
) -> None:
    async with in_process(make_settings(tmp_path, ROOMY)) as app:
        at = await app.client.post("/v1/artifacts", json=make(limit))
        past = await app.client.post("/v1/artifacts", json=make(limit + 1))

    assert at.status_code == 201, at.text
    assert past.status_code == 400, past.text
    assert past.json()["code"] == "INVALID_PARAMS"


@pytest.mark.req("ORCH-SEC-0051")
async def test_an_artifact_at_max_bytes_is_stored_and_one_byte_more_is_413(tmp_path: Path) -> None:
    limit = 4096  # ROOMY's artifacts.max_bytes
    async with in_process(make_settings(tmp_path, ROOMY)) as app:
        at = await app.client.post("/v1/artifacts", json={"kind": "other", "content": "a" * limit})
        past = await app.client.post(
            "/v1/artifacts", json={"kind": "other", "content": "b" * (limit + 1)}
        )

    assert at.status_code == 201, at.text
    assert at.json()["size_bytes"] == limit
    assert past.status_code == 413, past.text
    assert past.json()["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.req("ORCH-ERR-0009")
async def test_a_parameter_error_names_the_parameter_not_its_value(tmp_path: Path) -> None:
    # A 500 KB Last-Event-ID came back as a 1 MB 400: connexion's message quotes it twice.
    huge = "9" * 500_000
    async with in_process(make_settings(tmp_path, {"pools": [pool()]})) as api:
        accepted = await api.submit()
        task_id = accepted.json()["task_id"]
        refused = await api.client.get(
            f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": huge}
        )
        listed = await api.client.get("/v1/tasks", params={"limit": huge[:60_000]})
    for response, name in ((refused, "Last-Event-ID"), (listed, "limit")):
        assert response.status_code == 400, response.text[:200]
        body = response.json()
        assert body["code"] == "INVALID_PARAMS"
        assert name in body["message"] and "999999" not in body["message"]
        assert len(response.content) < 1024


@pytest.mark.req("ORCH-ERR-0010", "ORCH-CTRL-0021")
async def test_a_nul_character_in_a_parameter_or_a_tag_is_a_400(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path, {"pools": [pool()]})) as api:
        listed = await api.client.get("/v1/artifacts", params={"tag": "a\x00b", "kind": "other"})
        tasks = await api.client.get("/v1/tasks", params={"session_id": "s\x00"})
        path = await api.client.get("/v1/sessions/s%00x")
        stored = await api.client.post(
            "/v1/artifacts", json={"kind": "document", "content": "c", "tags": ["x\x00y"]}
        )
        clean = await api.client.get("/v1/artifacts", params={"tag": "a b"})
    for response in (listed, tasks, path, stored):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "INVALID_PARAMS"
    assert "NUL" in listed.json()["message"] and "tag" in listed.json()["message"]
    assert clean.status_code == 200
