"""The `llorch` command against a real server: typer's CliRunner in process, and the installed
console script in a subprocess where signals or exec matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llorch.cli import app
from llorch.client import Client
from tests.support import MODEL, free_port, live_server, make_settings, pool
from tools.server import running

pytestmark = pytest.mark.wire

LLORCH = Path(sys.executable).with_name("llorch")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    broken = pool(
        id="broken", model="broken", mock={"failure": {"mode": "mid_stream", "after_tokens": 2}}
    )
    settings = make_settings(tmp_path, {"pools": [pool(models=["mock-large"]), broken]})
    with live_server(settings) as url:
        yield url


def llorch(url: str, *args: str) -> Any:
    """Run the command in process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(app, ["--url", url, *args], catch_exceptions=False)


def as_json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.req("ORCH-CLI-0010", "ORCH-CLI-0012")
def test_submit_streams_the_tasks_tokens(server: str) -> None:
    result = llorch(server, "submit", "tell me a story", "--max-tokens", "6", "--seed", "4")
    assert result.exit_code == 0, result.output
    with Client.from_url(server) as client:
        task = client.list_tasks(limit=1).items[0]
        tokens = [e.data["t"] for e in client.events(task.task_id) if e.event == "token"]
    assert result.stdout == "".join(tokens) + "\n"
    assert f"{task.task_id} · done (length) · 6 tokens" in result.stderr


@pytest.mark.req("ORCH-CLI-0010")
def test_json_output_for_scripts(server: str) -> None:
    lines = llorch(server, "submit", "hi", "--max-tokens", "2", "--json").stdout.splitlines()
    frames = [json.loads(line) for line in lines]
    assert [f["event"] for f in frames] == ["accepted", "started", "token", "token", "end"]
    task_id = frames[0]["data"]["task_id"]
    assert as_json(llorch(server, "tasks", "show", task_id, "--json"))["state"] == "succeeded"
    listed = as_json(llorch(server, "tasks", "ls", "--json"))
    assert [t["task_id"] for t in listed["items"]] == [task_id]
    tail = [
        json.loads(x)
        for x in llorch(server, "tasks", "tail", task_id, "--json").stdout.split("\n")
        if x
    ]
    assert tail == frames[1:]
    after = llorch(server, "tasks", "tail", task_id, "--last-event-id", "2", "--json").stdout
    assert [json.loads(x)["id"] for x in after.splitlines()] == [3]
    assert as_json(llorch(server, "tasks", "cancel", task_id, "--json")) == {
        "task_id": task_id,
        "canceled": True,
    }
    queued = as_json(llorch(server, "submit", "later", "--no-stream", "--json"))
    assert queued["task_id"] != task_id and queued["state"] == "queued"


@pytest.mark.req("ORCH-CLI-0010")
def test_sessions_artifacts_pools_and_caps(server: str, tmp_path: Path) -> None:
    created = as_json(llorch(server, "sessions", "new", "--tokens", "500", "--json"))
    sid = created["session_id"]
    assert created["budgets"]["tokens_remaining"] == 500
    shown = llorch(server, "sessions", "show", sid)
    assert shown.exit_code == 0 and "tokens left" in shown.stdout and "500" in shown.stdout
    assert llorch(server, "sessions", "rm", sid).stdout == f"deleted {sid}\n"

    note = tmp_path / "note.txt"
    note.write_text("remember the milk", encoding="utf-8")
    stored = as_json(llorch(server, "artifacts", "put", str(note), "--tag", "todo", "--json"))
    got = llorch(server, "artifacts", "get", stored["id"])
    assert got.exit_code == 0 and got.stdout.endswith("remember the milk\n")
    listed = as_json(llorch(server, "artifacts", "ls", "--tag", "todo", "--json"))
    assert [a["id"] for a in listed["items"]] == [stored["id"]]

    pools = as_json(llorch(server, "pools", "ls", "--json"))
    assert sorted(p["pool_id"] for p in pools["items"]) == ["broken", "default"]
    assert as_json(llorch(server, "pools", "drain", "default", "--json"))["draining"] is True
    assert as_json(llorch(server, "pools", "resume", "default", "--json"))["draining"] is False
    reload = llorch(server, "pools", "reload", "default", "--model", "mock-large", "--json")
    assert as_json(reload)["pool_id"] == "default"
    health = llorch(server, "pools", "health", "broken")
    assert health.exit_code == 0 and "model" in health.stdout and "broken" in health.stdout
    caps = llorch(server, "caps")
    assert caps.exit_code == 0 and "default" in caps.stdout and "broken" in caps.stdout
    assert "api_version" in as_json(llorch(server, "caps", "--json"))


@pytest.mark.req("ORCH-CLI-0011")
@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["tasks", "show", "nope"], "404 TASK_NOT_FOUND", 6),
        (["submit", "x", "--model", "unknown-model"], "400 INVALID_PARAMS", 4),
        (["pools", "resume", "default"], "409 NOT_DRAINING", 7),
        (["artifacts", "get", "sha256:abc"], "400 INVALID_PARAMS", 4),
    ],
)
def test_errors_print_the_code_and_exit_by_class(
    server: str, args: list[str], code: str, exit_code: int
) -> None:
    result = llorch(server, *args)
    assert result.exit_code == exit_code
    assert result.stderr.startswith(f"error: {code}: ") and "Traceback" not in result.output


@pytest.mark.req("ORCH-CLI-0011")
def test_busy_and_failed_tasks_have_their_own_exit_codes(server: str) -> None:
    assert llorch(server, "pools", "drain", "default").exit_code == 0
    drained = llorch(server, "submit", "x")
    assert drained.exit_code == 8 and "503 POOL_UNAVAILABLE" in drained.stderr
    assert "retry after" in drained.stderr
    failed = llorch(server, "submit", "x", "--model", "broken", "--max-tokens", "10", "--json")
    assert failed.exit_code == 10
    frames = [json.loads(line) for line in failed.stdout.splitlines()]
    assert frames[-2]["event"] == "error" and frames[-1]["error"]["code"] == "WORKER_RESET"
    unreachable = llorch(f"http://127.0.0.1:{free_port()}", "caps")
    assert unreachable.exit_code == 3 and "cannot reach" in unreachable.stderr


@pytest.mark.req("ORCH-CLI-0011")
def test_help_lists_the_exit_codes() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for line in ("3 server unreachable", "6 not found (404)", "130 interrupted"):
        assert line in result.stdout


@pytest.mark.req("ORCH-CLI-0010")
def test_url_and_key_from_the_environment(server: str) -> None:
    seen: list[str | None] = []
    # The server records nothing about keys yet, so look at what the client sends.
    from llorch.cli.context import Target

    env = {"LLORCH_URL": server, "LLORCH_API_KEY": "k-123"}
    result = CliRunner().invoke(app, ["caps", "--json"], env=env)
    assert result.exit_code == 0, result.output
    target = Target(url=server, api_key="k-123")
    with target.client() as client:
        seen.append(client._http.headers.get("authorization"))
    assert seen == ["Bearer k-123"]


@pytest.mark.req("ORCH-CLI-0012")
def test_ctrl_c_cancels_the_task_on_the_server(tmp_path: Path) -> None:
    slow = pool(mock={"ttft_ms": 0, "tokens_per_s": 20, "eos": False})
    with live_server(make_settings(tmp_path, {"pools": [slow]})) as url:
        proc = subprocess.Popen(
            [str(LLORCH), "--url", url, "submit", "a long story", "--max-tokens", "4000", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        frames = []
        for line in proc.stdout:
            frames.append(json.loads(line))
            assert "event" in frames[-1], frames[-1]
            if frames[-1]["event"] == "token":
                break
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        task_id = frames[0]["data"]["task_id"]
        assert f"canceled task {task_id}" in err
        with Client.from_url(url) as client:
            events = list(client.events(task_id))
            assert client.get_task(task_id).state == "canceled"
        assert events[-1].event == "end" and events[-1].data["finish_reason"] == "canceled"


@pytest.mark.req("ORCH-CLI-0013")
def test_serve_runs_the_server(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "llorch.yaml"
    config.write_text(f"server: {{port: {port}}}\npools: [{{id: only, model: {MODEL}}}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    argv = [str(LLORCH), "serve", "--config", str(config), "--data-dir", str(tmp_path)]
    ready = f"http://127.0.0.1:{port}/readyz"
    with running(argv, log=tmp_path / "server.log", ready_url=ready, env=env) as proc:
        result = CliRunner().invoke(
            app, ["--url", f"http://127.0.0.1:{port}", "pools", "ls", "--json"]
        )
        assert [p["pool_id"] for p in as_json(result)["items"]] == ["only"]
    # uvicorn re-raises the signal it handled once it has shut down.
    assert proc.returncode in (0, -signal.SIGTERM)
