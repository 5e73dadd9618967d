"""PostgreSQL stops answering on live connections under a running server (ORCH-STATE-0060).

A proxy the test controls (tests/e2e/stall_proxy.py) sits between a real server process and
PostgreSQL. Stalled, it forwards nothing and closes nothing: an admission and a read sent then
wait on the database. While they wait, ``/livez`` answers and a running task's stream goes on
(the assertions are about order: these complete while the stuck requests are outstanding);
resumed, the stuck requests complete and every task ends once, nothing lost.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.cluster import database_fault_config
from tests.e2e.stall_proxy import StallProxy, url_through
from tests.support import parse_sse, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

TERMINAL = ("succeeded", "failed", "canceled")
# How long the test waits for a step before it fails (a bound on a hang, not a measurement).
_STEP_S = 20


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[StallProxy]:
    target = urlsplit(postgres_url)
    with StallProxy((target.hostname or "127.0.0.1", target.port or 5432)) as stall:
        yield stall


def write_config(path: Path, database_url: str, timeout_ms: int = 60_000) -> Path:
    # By default longer than the test: a stalled call is not given up while it watches it.
    database = {"url": database_url, "timeout_ms": timeout_ms, "retry_ms": 200}
    return database_fault_config(path, database, {"storage_busy_timeout_ms": 1000})


class Frames:
    """A task's SSE stream read in a thread: the frames so far, and a way to wait for more."""

    def __init__(self, client: httpx.Client, task_id: str) -> None:
        self.lines: list[str] = []
        self.error: httpx.HTTPError | None = None
        self._grew = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(client, task_id), daemon=True)
        self._reader.start()

    def _read(self, client: httpx.Client, task_id: str) -> None:
        try:
            with client.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
                for line in response.iter_lines():
                    with self._grew:
                        self.lines.append(line)
                        self._grew.notify_all()
        except httpx.HTTPError as exc:  # a failing test closes the stream under it
            self.error = exc

    def count(self, kind: str) -> int:
        with self._grew:
            return sum(1 for line in self.lines if line == f"event: {kind}")

    def wait_for(self, kind: str, count: int) -> None:
        with self._grew:
            reached = self._grew.wait_for(
                lambda: sum(1 for line in self.lines if line == f"event: {kind}") >= count,
                timeout=_STEP_S,
            )
        assert reached, f"{count} {kind} frames not received"

    def join(self) -> str:
        self._reader.join(timeout=60)
        assert not self._reader.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        return "\n".join(self.lines) + "\n"


@pytest.mark.req("ORCH-STATE-0060")
def test_a_stalled_database_does_not_stall_the_event_loop(
    tmp_path: Path, postgres_url: str, proxy: StallProxy
) -> None:
    config = write_config(tmp_path / "llorch.yaml", url_through(postgres_url, proxy.port))
    serving = serve_process("--config", str(config), data_dir=tmp_path / "data")
    with (
        serving as (url, _, log),
        httpx.Client(base_url=url, timeout=60) as client,
        httpx.Client(base_url=url, timeout=60) as streaming,
        ThreadPoolExecutor(2) as stuck_pool,
    ):
        running = submit_to(client, max_tokens=120)["task_id"]  # 3 s of tokens
        wait_until(lambda: task_of(client, running)["state"] == "running", "its start")
        frames = Frames(streaming, running)
        frames.wait_for("token", 5)

        proxy.stall()
        body = {"model": "mock-small", "prompt": "p", "max_tokens": 3}
        stuck: list[Future[httpx.Response]] = [
            stuck_pool.submit(client.post, "/v1/tasks", json=body),
            stuck_pool.submit(client.get, f"/v1/tasks/{running}"),
        ]
        wait_until(lambda: proxy.held_bytes > 0, "a round trip held by the proxy")
        # While both wait on the database: the loop answers, and the stream goes on.
        with httpx.Client(base_url=url, timeout=_STEP_S) as probe:
            assert probe.get("/livez").status_code == 200
        tokens = frames.count("token")
        frames.wait_for("token", tokens + 10)
        assert not any(f.done() for f in stuck), [f.result().text for f in stuck if f.done()]

        proxy.resume()
        admitted, read = (f.result(timeout=_STEP_S) for f in stuck)
        assert admitted.status_code == 202, admitted.text
        assert read.status_code == 200 and read.json()["task_id"] == running, read.text
        later = admitted.json()["task_id"]
        ended = {
            task_id: wait_until(
                lambda t=task_id: (task := task_of(client, t))["state"] in TERMINAL and task,
                f"task {task_id} ended",
                timeout_s=60,
            )
            for task_id in (running, later)
        }
        streamed = parse_sse(frames.join())

    for task in ended.values():
        assert task["state"] == "succeeded", (task, log.read_text(encoding="utf-8")[-6000:])
    kinds = [e.event for e in streamed]
    assert kinds.count("token") == 120 and [k for k in kinds if k in ("end", "error")] == ["end"]


@pytest.mark.req("ORCH-STATE-0010")
def test_a_call_the_stalled_database_does_not_answer_is_refused_once_its_time_is_up(
    tmp_path: Path, postgres_url: str, proxy: StallProxy
) -> None:
    # A stall answers nothing and breaks nothing: only the wait's bound (timeout_ms 1000 plus
    # the lock wait 1000) ends a call, 503 STORAGE_UNAVAILABLE rather than a request that hangs.
    url_db = url_through(postgres_url, proxy.port)
    config = write_config(tmp_path / "llorch.yaml", url_db, timeout_ms=1000)
    body = {"model": "mock-small", "prompt": "p", "max_tokens": 3}
    with (
        serve_process("--config", str(config), data_dir=tmp_path / "data") as (url, _, _),
        httpx.Client(base_url=url, timeout=_STEP_S) as client,
    ):
        proxy.stall()
        refused = client.post("/v1/tasks", json=body)
        unready = client.get("/readyz")
        live = client.get("/livez")
        proxy.resume()
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready again")
        accepted = submit_to(client, max_tokens=3)["task_id"]
        ended = wait_until(
            lambda: (task := task_of(client, accepted))["state"] in TERMINAL and task,
            "the task submitted after the stall ends",
        )

    problem = refused.json()
    assert refused.status_code == 503, refused.text
    assert (problem["code"], problem["retriable"]) == ("STORAGE_UNAVAILABLE", True)
    assert int(refused.headers["retry-after"]) >= 1
    assert unready.status_code == 503 and live.status_code == 200
    assert ended["state"] == "succeeded"
