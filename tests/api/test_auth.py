"""Bearer keys, scopes, rate limits, ownership and the development mode, in process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import pytest

from llorch.api import create_app
from llorch.clock import FakeClock
from llorch.config import ApiKey, Settings
from llorch.contracts import ConfigError, openapi, validate_config
from tests.support import InProcess, assert_envelope, in_process, make_settings, pool, task_body

SECRETS = {
    "alice": "alice-4f1c9e0b7d2a",
    "bob": "bob-93ab11c0e5f7",
    "ops": "ops-0c8d6e2f4a19",
    "prom": "prom-77e0b3a5c1d2",
    "slow": "slow-5a6b7c8d9e0f",
    "capped": "capped-1a2b3c4d5e6f",
}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_config() -> list[dict[str, Any]]:
    return [
        {"name": "alice", "sha256": sha(SECRETS["alice"]), "scopes": ["data"]},
        {"name": "bob", "sha256": sha(SECRETS["bob"]), "scopes": ["data"]},
        {"name": "ops", "sha256": sha(SECRETS["ops"]), "scopes": ["data", "control"]},
        {"name": "prom", "sha256": sha(SECRETS["prom"]), "scopes": ["metrics"]},
        {
            "name": "slow",
            "sha256": sha(SECRETS["slow"]),
            "scopes": ["data"],
            "rate_limit": {"per_s": 1, "burst": 2},
        },
        {
            "name": "capped",
            "sha256": sha(SECRETS["capped"]),
            "scopes": ["data"],
            "budgets": {"tokens": 1000, "time_ms": 60000, "cost": 0.5},
        },
    ]


def auth_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, {"pools": [pool()], "auth": {"keys": keys_config()}})


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


async def wait_done(app: InProcess, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            task: dict[str, Any] = (
                await app.client.get(f"/v1/tasks/{task_id}", headers=headers)
            ).json()
            if task["state"] in ("succeeded", "failed", "canceled"):
                return task
            await asyncio.sleep(0.005)


@pytest.mark.req("ORCH-SEC-0010")
async def test_no_key_and_an_unknown_key_are_401(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        missing = await app.client.get("/v1/tasks")
        wrong_scheme = await app.client.get("/v1/tasks", headers={"Authorization": "Basic eDp5"})
        unknown = await app.client.get("/v1/tasks", headers={"Authorization": "Bearer nope-123"})
        good = await app.client.get("/v1/tasks", headers=as_("alice"))

    for response, code in ((missing, "MISSING_TOKEN"), (wrong_scheme, "MISSING_TOKEN")):
        assert_envelope(response, 401, code)
        assert response.headers["www-authenticate"].startswith("Bearer")
    body = assert_envelope(unknown, 401, "BAD_TOKEN")
    assert "nope-123" not in body["message"]
    assert unknown.headers["www-authenticate"].startswith("Bearer")
    assert good.status_code == 200, good.text


@pytest.mark.req("ORCH-SEC-0014")
async def test_authentication_comes_before_the_body_is_validated(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        broken = await app.client.post(
            "/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        wrong_type = await app.client.post(
            "/v1/tasks", content=b"x", headers={"Content-Type": "text/plain"}
        )

    assert_envelope(broken, 401, "MISSING_TOKEN")
    assert_envelope(wrong_type, 401, "MISSING_TOKEN")


@pytest.mark.req("ORCH-SEC-0011", "ORCH-SEC-0015")
async def test_scopes_decide_which_operations_a_key_may_call(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        c = app.client
        data_on_pools = await c.get("/v1/pools", headers=as_("alice"))
        metrics_on_tasks = await c.get("/v1/tasks", headers=as_("prom"))
        data_on_metrics = await c.get("/metrics", headers=as_("alice"))
        metrics_without_key = await c.get("/metrics")
        metrics = await c.get("/metrics", headers=as_("prom"))
        control_on_pools = await c.get("/v1/pools", headers=as_("ops"))
        livez = await c.get("/livez")
        readyz = await c.get("/readyz")

    body = assert_envelope(data_on_pools, 403, "FORBIDDEN_SCOPE")
    assert SECRETS["alice"] not in body["message"]
    assert_envelope(metrics_on_tasks, 403, "FORBIDDEN_SCOPE")
    assert_envelope(data_on_metrics, 403, "FORBIDDEN_SCOPE")
    assert_envelope(metrics_without_key, 401, "MISSING_TOKEN")
    assert metrics.status_code == 200
    assert "llorch_http_requests_total" in metrics.text
    assert control_on_pools.status_code == 200
    assert livez.status_code == 200
    assert readyz.status_code == 200


@pytest.mark.req("ORCH-SEC-0012")
async def test_a_key_over_its_rate_limit_is_429_until_its_bucket_refills(tmp_path: Path) -> None:
    clock = FakeClock()
    async with in_process(auth_settings(tmp_path), clock=clock) as app:
        burst = [await app.client.get("/v1/tasks", headers=as_("slow")) for _ in range(2)]
        limited = await app.client.get("/v1/tasks", headers=as_("slow"))
        others = await app.client.get("/v1/tasks", headers=as_("alice"))
        clock.advance(1000)
        refilled = await app.client.get("/v1/tasks", headers=as_("slow"))
        again = await app.client.get("/v1/tasks", headers=as_("slow"))

    assert [r.status_code for r in burst] == [200, 200]
    body = assert_envelope(limited, 429, "RATE_LIMITED")
    assert body["retriable"] is True
    assert body["retry_after_ms"] == 1000
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["x-backoff-ms"] == "1000"
    assert others.status_code == 200
    assert refilled.status_code == 200
    assert_envelope(again, 429, "RATE_LIMITED")


@pytest.mark.req("ORCH-SEC-0020", "ORCH-SEC-0021")
async def test_a_key_sees_only_its_own_tasks_sessions_and_artifacts(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        c = app.client
        task = (await c.post("/v1/tasks", json=task_body(), headers=as_("alice"))).json()
        task_id, session_id = task["task_id"], task["session_id"]
        artifact = (
            await c.post(
                "/v1/artifacts", json={"kind": "prompt", "content": "a"}, headers=as_("alice")
            )
        ).json()
        await wait_done(app, task_id, as_("alice"))

        bob = as_("bob")
        hidden = {
            "get task": await c.get(f"/v1/tasks/{task_id}", headers=bob),
            "stream": await c.get(f"/v1/tasks/{task_id}/stream", headers=bob),
            "cancel": await c.post(f"/v1/tasks/{task_id}/cancel", headers=bob),
            "get session": await c.get(f"/v1/sessions/{session_id}", headers=bob),
            "delete session": await c.delete(f"/v1/sessions/{session_id}", headers=bob),
            "use session": await c.post(
                "/v1/tasks", json=task_body(session_id=session_id), headers=bob
            ),
            "get artifact": await c.get(f"/v1/artifacts/{artifact['id']}", headers=bob),
        }
        bob_tasks = (await c.get("/v1/tasks", headers=bob)).json()["items"]
        bob_artifacts = (await c.get("/v1/artifacts", headers=bob)).json()["items"]
        # The same content stored by bob makes him one of its owners.
        await c.post("/v1/artifacts", json={"kind": "prompt", "content": "a"}, headers=bob)
        bob_after = await c.get(f"/v1/artifacts/{artifact['id']}", headers=bob)

        alice_task = await c.get(f"/v1/tasks/{task_id}", headers=as_("alice"))
        alice_tasks = (await c.get("/v1/tasks", headers=as_("alice"))).json()["items"]
        trace_id = alice_task.json()["trace_artifact_id"]
        alice_trace = await c.get(f"/v1/artifacts/{trace_id}", headers=as_("alice"))
        ops = as_("ops")
        ops_views = [
            await c.get(f"/v1/tasks/{task_id}", headers=ops),
            await c.get(f"/v1/sessions/{session_id}", headers=ops),
            await c.get(f"/v1/artifacts/{artifact['id']}", headers=ops),
            await c.get(f"/v1/artifacts/{trace_id}", headers=ops),
        ]
        ops_tasks = (await c.get("/v1/tasks", headers=ops)).json()["items"]

    codes = {name: (r.status_code, r.json()["code"]) for name, r in hidden.items()}
    assert codes == {
        "get task": (404, "TASK_NOT_FOUND"),
        "stream": (404, "TASK_NOT_FOUND"),
        "cancel": (404, "TASK_NOT_FOUND"),
        "get session": (404, "SESSION_NOT_FOUND"),
        "delete session": (404, "SESSION_NOT_FOUND"),
        "use session": (404, "SESSION_NOT_FOUND"),
        "get artifact": (404, "ARTIFACT_NOT_FOUND"),
    }
    assert bob_tasks == []
    assert bob_artifacts == []
    assert bob_after.status_code == 200
    assert alice_task.status_code == 200
    assert [t["task_id"] for t in alice_tasks] == [task_id]
    assert alice_trace.status_code == 200
    assert [r.status_code for r in ops_views] == [200, 200, 200, 200]
    assert task_id in [t["task_id"] for t in ops_tasks]


def view(artifact: dict[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    return artifact["kind"], artifact["tags"], artifact["metadata"]


@pytest.mark.req("ORCH-SEC-0023", "ORCH-CTRL-0020")
async def test_shared_content_keeps_each_keys_own_view(tmp_path: Path) -> None:
    x = {"kind": "prompt", "tags": ["alice-tag"], "metadata": {"who": "alice"}}
    y = {"kind": "document", "tags": ["bob-tag"], "metadata": {"who": "bob"}}
    content = {"content": "shared body"}
    async with in_process(auth_settings(tmp_path)) as app:
        c, alice, bob = app.client, as_("alice"), as_("bob")
        first = await c.post("/v1/artifacts", json=content | x, headers=alice)
        second = await c.post("/v1/artifacts", json=content | y, headers=bob)
        again = await c.post("/v1/artifacts", json=content | {"kind": "other"}, headers=bob)
        artifact_id = first.json()["id"]
        alice_read = (await c.get(f"/v1/artifacts/{artifact_id}", headers=alice)).json()
        bob_read = (await c.get(f"/v1/artifacts/{artifact_id}", headers=bob)).json()
        alice_list = (await c.get("/v1/artifacts", headers=alice)).json()["items"]
        bob_list = (await c.get("/v1/artifacts", headers=bob)).json()["items"]
        bob_by_tag = (await c.get("/v1/artifacts", params={"tag": "alice-tag"}, headers=bob)).json()
        bob_by_kind = (
            await c.get("/v1/artifacts", params={"kind": "document"}, headers=bob)
        ).json()

    assert (first.status_code, second.status_code, again.status_code) == (201, 201, 200)
    assert second.json()["id"] == artifact_id == again.json()["id"]
    expected_x = ("prompt", ["alice-tag"], {"who": "alice"})
    expected_y = ("document", ["bob-tag"], {"who": "bob"})
    assert view(first.json()) == view(alice_read) == expected_x
    assert view(second.json()) == view(again.json()) == view(bob_read) == expected_y
    assert [view(a) for a in alice_list] == [expected_x]
    assert [view(a) for a in bob_list] == [expected_y]
    assert bob_by_tag["items"] == []
    assert [a["id"] for a in bob_by_kind["items"]] == [artifact_id]
    assert bob_read["content"] == alice_read["content"] == "shared body"


@pytest.mark.req("ORCH-SEC-0023", "ORCH-SEC-0021")
async def test_a_control_key_sees_its_own_view_of_content_it_stored(tmp_path: Path) -> None:
    content = {"content": "shared body"}
    async with in_process(auth_settings(tmp_path)) as app:
        c, ops = app.client, as_("ops")
        body = content | {"kind": "prompt", "tags": ["a"], "metadata": {"who": "alice"}}
        artifact_id = (await c.post("/v1/artifacts", json=body, headers=as_("alice"))).json()["id"]
        before = (await c.get(f"/v1/artifacts/{artifact_id}", headers=ops)).json()
        mine = content | {"kind": "other", "tags": ["o"], "metadata": {"who": "ops"}}
        stored = await c.post("/v1/artifacts", json=mine, headers=ops)
        after = (await c.get(f"/v1/artifacts/{artifact_id}", headers=ops)).json()
        listed = (await c.get("/v1/artifacts", headers=ops)).json()["items"]
        by_old_tag = (await c.get("/v1/artifacts", params={"tag": "a"}, headers=ops)).json()
        alice_read = (await c.get(f"/v1/artifacts/{artifact_id}", headers=as_("alice"))).json()

    assert view(before) == ("prompt", ["a"], {"who": "alice"})  # it sees every key's
    assert stored.status_code == 201
    expected = ("other", ["o"], {"who": "ops"})
    assert view(stored.json()) == view(after) == expected
    assert [view(a) for a in listed if a["id"] == artifact_id] == [expected]
    assert by_old_tag["items"] == []
    assert view(alice_read) == ("prompt", ["a"], {"who": "alice"})


@pytest.mark.req("ORCH-SEC-0022")
async def test_sessions_of_a_key_with_budgets_never_exceed_them(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        c = app.client
        asked = await c.post(
            "/v1/sessions",
            json={"budgets": {"tokens": 50000, "time_ms": 999999, "cost": 9}},
            headers=as_("capped"),
        )
        implicit = await c.post("/v1/tasks", json=task_body(), headers=as_("capped"))
        session = await c.get(
            f"/v1/sessions/{implicit.json()['session_id']}", headers=as_("capped")
        )
        uncapped = await c.post(
            "/v1/sessions", json={"budgets": {"tokens": 50000}}, headers=as_("alice")
        )

    assert asked.status_code == 201, asked.text
    assert asked.json()["budgets"] == {
        "tokens_remaining": 1000,
        "time_ms_remaining": 60000,
        "cost_remaining": 0.5,
    }
    assert implicit.status_code == 202, implicit.text
    assert int(implicit.headers["x-budget-tokens-remaining"]) < 1000
    assert session.json()["budgets"]["tokens_remaining"] <= 1000
    assert uncapped.json()["budgets"]["tokens_remaining"] == 50000


@pytest.mark.req("ORCH-SEC-0004")
async def test_the_key_set_is_replaced_at_run_time(tmp_path: Path) -> None:
    async with in_process(auth_settings(tmp_path)) as app:
        before = await app.client.get("/v1/tasks", headers=as_("alice"))
        app.runtime.auth.replace(
            [ApiKey(name="fresh", scopes=("data",), sha256=sha("fresh-secret-1"))]
        )
        old = await app.client.get("/v1/tasks", headers=as_("alice"))
        new = await app.client.get("/v1/tasks", headers={"Authorization": "Bearer fresh-secret-1"})
        app.runtime.auth.replace([])
        off = await app.client.get("/v1/tasks")

    assert before.status_code == 200
    assert_envelope(old, 401, "BAD_TOKEN")
    assert new.status_code == 200
    assert off.status_code == 200


@pytest.mark.req("ORCH-SEC-0003")
async def test_every_key_digest_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    async with in_process(auth_settings(tmp_path)) as app:
        # alice is the first key: a match must not end the comparisons.
        response = await app.client.get("/v1/tasks", headers=as_("alice"))

    assert response.status_code == 200
    assert sorted(compared) == sorted(bytes.fromhex(k["sha256"]) for k in keys_config())


@pytest.mark.req("ORCH-SEC-0030", "ORCH-SEC-0032")
async def test_capabilities_say_whether_authentication_is_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="llorch.auth"):
        async with in_process(make_settings(tmp_path / "off", {"pools": [pool()]})) as app:
            off = await app.client.get("/v1/capabilities")
            anything = await app.client.get("/v1/pools")
    async with in_process(auth_settings(tmp_path / "on")) as app:
        on = await app.client.get("/v1/capabilities", headers=as_("prom"))

    assert off.json()["auth"] == {"schemes": [], "required": False}
    assert anything.status_code == 200
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)
    assert on.json()["auth"] == {"schemes": ["bearer"], "required": True}


@pytest.mark.req("ORCH-SEC-0031")
def test_a_public_bind_without_keys_refuses_to_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"pools": [pool()]})

    with pytest.raises(ValueError, match="without authentication"):
        create_app(settings.with_server(host="0.0.0.0"))
    create_app(auth_settings(tmp_path).with_server(host="0.0.0.0"))  # keys: it starts


@pytest.mark.req("ORCH-SEC-0001", "ORCH-SEC-0002")
def test_keys_come_hashed_or_from_the_environment_or_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("file-secret-9\n", encoding="utf-8")
    raw = {
        "auth": {
            "keys": [
                {"name": "env", "key_env": "LLORCH_TEST_KEY", "scopes": ["data"]},
                {"name": "file", "key_file": str(secret_file), "scopes": ["control"]},
                {"name": "hashed", "sha256": sha("h"), "scopes": ["metrics"]},
            ]
        }
    }
    settings = make_settings(tmp_path, raw).with_overrides({"LLORCH_TEST_KEY": "env-secret-7"})

    by_name = {k.name: k for k in settings.auth.keys}
    assert by_name["env"].sha256 == sha("env-secret-7")
    assert by_name["file"].sha256 == sha("file-secret-9")
    assert by_name["hashed"].sha256 == sha("h")
    assert "env-secret-7" not in repr(settings)
    with pytest.raises(ValueError, match="LLORCH_TEST_KEY is unset"):
        make_settings(tmp_path, raw).with_overrides({})
    for clear in (
        {"name": "k", "key": "in-clear", "scopes": ["data"]},
        {"name": "k", "sha256": "not-a-digest", "scopes": ["data"]},
        {"name": "k", "sha256": sha("x"), "scopes": ["admin"]},
        {"name": "k", "sha256": sha("x"), "key_env": "X", "scopes": ["data"]},
    ):
        with pytest.raises(ConfigError):
            validate_config({"auth": {"keys": [clear]}})


@pytest.mark.req("ORCH-SEC-0013")
@pytest.mark.parametrize("name", ["data", "control"])
def test_every_protected_operation_declares_bearer_scopes_and_auth_answers(name: str) -> None:
    document = openapi(name)
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    assert document["security"] == [{"bearer": []}]
    public = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in ("get", "post", "delete", "put", "patch"):
                continue
            if operation.get("security") == []:
                public.add(path)
                continue
            assert operation["x-llorch-scopes"], (path, method)
            assert set(operation["x-llorch-scopes"]) <= {"data", "control", "metrics"}
            for status in ("401", "403", "429"):
                assert status in operation["responses"], (path, method, status)
    assert public <= {"/livez", "/readyz"}


@pytest.mark.req("ORCH-SEC-0040", "ORCH-SEC-0041")
async def test_keys_and_prompts_stay_out_of_logs_errors_and_traces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompt_marker = "PROMPT-MARKER-5e1d"
    raw = {"pools": [pool(max_context=200_000)], "auth": {"keys": keys_config()}}
    with caplog.at_level(logging.DEBUG):
        async with in_process(make_settings(tmp_path, raw)) as app:
            c = app.client
            answers = [
                await c.get("/v1/tasks", headers={"Authorization": f"Bearer {prompt_marker}"}),
                await c.post(
                    "/v1/tasks",
                    json=task_body(prompt=prompt_marker * 10_000),  # past maxLength
                    headers=as_("alice"),
                ),
                await c.post(
                    "/v1/tasks",
                    json=task_body(
                        prompt=prompt_marker, messages=[{"role": "user", "content": "x"}]
                    ),
                    headers=as_("alice"),
                ),
                await c.post(
                    "/v1/tasks",
                    json=task_body(prompt=prompt_marker, max_tokens="8"),
                    headers=as_("alice"),
                ),
            ]
            ok = await c.post(
                "/v1/tasks", json=task_body(prompt=prompt_marker), headers=as_("alice")
            )
            task = await wait_done(app, ok.json()["task_id"], as_("alice"))
            trace = await c.get(f"/v1/artifacts/{task['trace_artifact_id']}", headers=as_("alice"))

    assert [a.status_code for a in answers] == [401, 400, 400, 400]
    for answer in answers:
        assert prompt_marker not in answer.text
    logged = "\n".join(r.getMessage() + repr(vars(r)) for r in caplog.records)
    assert prompt_marker not in logged
    for secret in SECRETS.values():
        assert secret not in logged
        assert secret not in trace.json()["content"]


@pytest.mark.req("ORCH-SEC-0070")
@pytest.mark.parametrize(
    ("auth", "served"),
    [
        ({}, True),  # authentication off (loopback dev mode): the docs are served
        ({"keys": keys_config()}, False),  # keys configured: not unless asked for
        ({"keys": keys_config(), "public_docs": True}, True),
        ({"public_docs": False}, False),
    ],
)
async def test_the_api_documents_are_public_only_where_configured(
    tmp_path: Path, auth: dict[str, Any], served: bool
) -> None:
    settings = make_settings(tmp_path, {"pools": [pool()], "auth": auth})
    async with in_process(settings) as app:
        for path in ("/openapi.json", "/ui/"):
            response = await app.client.get(path)
            assert (response.status_code == 200) == served, (path, response.status_code)
            if not served:
                assert_envelope(response, 404, "NOT_FOUND")
        if served:
            document = (await app.client.get("/openapi.json")).json()
            assert document["openapi"].startswith("3.0")
