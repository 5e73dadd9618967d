"""The artifact disk refuses a write: a real server process under a file-size limit.

``RLIMIT_FSIZE`` makes the kernel refuse (EFBIG, "File too large") any write past the limit in a
file of the server process, as a full disk refuses one with ENOSPC; Python ignores SIGXFSZ, so the
write fails with an OSError. The limit sits well above what the database needs for a few tasks and
well below one large trace artifact.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import free_port, parse_sse
from tools import server

pytestmark = pytest.mark.wire

FILE_SIZE_LIMIT = 512 * 1024
BIG = 20_000  # tokens: a trace of about 1 MB
LAUNCH = (
    "import resource, runpy, sys; "
    "limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv = ['llorch', *sys.argv[2:]]; "
    "runpy.run_module('llorch', run_name='__main__')"
)


@contextmanager
def limited_server(
    data_dir: Path, config: dict[str, Any], limit: int = FILE_SIZE_LIMIT
) -> Iterator[tuple[str, Path]]:
    """The server in a process limited to ``limit`` bytes a file; yields its URL and its log (a
    few lines: far below the limit, which applies to it too)."""
    config_path = data_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    argv = [
        *(sys.executable, "-c", LAUNCH, str(limit)),
        *("serve", "--config", str(config_path), "--port", str(port)),
        *("--data-dir", str(data_dir / "var"), "--profile", "test"),
    ]
    url = f"http://127.0.0.1:{port}"
    log = data_dir / "server.log"
    with server.running(argv, log=log, ready_url=f"{url}/readyz", env=env):
        yield url, log


def wait_ended(client: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        task: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
        if task["state"] in ("succeeded", "failed", "canceled"):
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.02)


@pytest.mark.req("ORCH-REL-0003")
def test_a_refused_artifact_write_loses_nothing(tmp_path: Path) -> None:
    config = {
        "server": {"shutdown_grace_s": 0},
        "pools": [
            {
                "id": "default",
                "model": "mock-small",
                "replicas": 1,
                "max_tokens_out": BIG,
                "max_context": BIG + 1000,
                "mock": {"ttft_ms": 1, "tokens_per_s": 0, "eos": False},
            }
        ],
    }
    with limited_server(tmp_path, config) as (url, log), httpx.Client(base_url=url) as client:
        body = {"model": "mock-small", "prompt": "tell me a story", "max_tokens": BIG}
        big_id = client.post("/v1/tasks", json=body).json()["task_id"]
        big = wait_ended(client, big_id)
        replay = parse_sse(client.get(f"/v1/tasks/{big_id}/stream", timeout=30).text)
        small_id = client.post("/v1/tasks", json={**body, "max_tokens": 5}).json()["task_id"]
        small = wait_ended(client, small_id)
        metrics = client.get("/metrics").text

    # The big task ended normally, without its trace; nothing of it was lost.
    assert big["state"] == "succeeded"
    assert big["usage"]["tokens_out"] == BIG
    assert big["trace_artifact_id"] is None
    assert [e.event for e in replay].count("token") == BIG
    assert replay[-1].event == "end"
    assert replay[-1].data["tokens_out"] == BIG
    # The failed write was logged and counted; the store still takes what fits.
    assert "llorch_artifact_write_failures_total 1.0" in metrics
    lines = log.read_text(encoding="utf-8").splitlines()
    assert any("cannot write artifact" in line and "File too large" in line for line in lines)
    assert any("could not store the trace of task " + big_id in line for line in lines)
    assert small["state"] == "succeeded"
    assert small["trace_artifact_id"] is not None
    leftovers = [p.name for p in (tmp_path / "var").rglob("*.tmp")]
    assert leftovers == []


# Above the database's write-ahead log after its migrations (about 120 kB), below it after a
# few tasks with large prompts: the log cannot grow, and the database's writes fail.
DATABASE_LIMIT = 256 * 1024
PROMPT = "word " * 12_000  # 60 kB: about 15 pages of the log a task


def until_refused(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()`` until it is not a 2xx (a bounded number of times): the first refusal."""
    for _ in range(40):
        response = send()
        if response.status_code >= 300:
            return response
    raise AssertionError("the database took every write")


@pytest.mark.req("ORCH-ERR-0008")
def test_a_full_database_disk_is_a_500_that_names_no_file(tmp_path: Path) -> None:
    """Unlike a held lock or an unreachable server (503), a disk that refuses the database's
    writes is a fault of the server: 500 INTERNAL, with a generic message, on every write."""
    config = {
        "server": {"shutdown_grace_s": 0},
        "pools": [
            {
                "id": "default",
                "model": "mock-small",
                "replicas": 1,
                "max_context": 100_000,
                "mock": {"ttft_ms": 600_000},  # the tasks stay running: no trace is written
            }
        ],
    }
    task = {"model": "mock-small", "prompt": PROMPT, "max_tokens": 1}
    chat = {"model": "mock-small", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    serving = limited_server(tmp_path, config, limit=DATABASE_LIMIT)
    with serving as (url, log), httpx.Client(base_url=url, timeout=30) as client:
        sids = [client.post("/v1/sessions", json={}).json()["session_id"] for _ in range(3)]

        def create_session() -> httpx.Response:
            response = client.post("/v1/sessions", json={})
            if response.status_code == 201:
                sids.append(response.json()["session_id"])
            return response

        # Fill the log: large writes, then smaller ones, then one-page ones, each until refused.
        refused = [
            until_refused(lambda: client.post("/v1/tasks", json=task)),
            until_refused(create_session),
            until_refused(lambda: client.delete(f"/v1/sessions/{sids.pop()}")),
            client.post("/v1/tasks", json=task | {"prompt": "p"}),
            client.post("/v1/artifacts", json={"kind": "document", "content": "Refused."}),
        ]
        doors = [
            client.post("/v1/chat/completions", json=chat),
            client.post(
                "/v1/completions", json={"model": "mock-small", "max_tokens": 1, "prompt": "p"}
            ),
        ]
        # Out of rotation while the disk refuses the log a page: the probe's write is refused too.
        ready = [client.get("/readyz") for _ in range(2)]
        live = client.get("/livez")

    for response in refused:
        assert response.status_code == 500, response.text
        body = response.json()
        assert (body["code"], body["message"], body["retriable"]) == (
            "INTERNAL",
            "internal error",
            True,
        )
    for response in doors:
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "internal"
    assert [r.status_code for r in ready] == [503, 503], ready[-1].text
    assert "storage failing" in ready[-1].json()["message"]
    assert live.status_code == 200
    assert "full" in log.read_text(encoding="utf-8")
