"""Two real llorch processes on one PostgreSQL database share one queue per pool and the slots
of each engine replica (ORCH-STATE-0030 .. 0036)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.engines.scripted import Reply, ScriptedEngine, Seen, completion_chunks
from tests.support import MODEL, parse_sse, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

TTL_MS = 1000
SWEEP_MS = 200
CAPACITY = 4


def write_config(
    path: Path,
    database_url: str,
    instance_id: str,
    *,
    ttl_ms: int = TTL_MS,
    sweep_ms: int = SWEEP_MS,
    **pool: Any,
) -> Path:
    config: dict[str, Any] = {
        "server": {"shutdown_grace_s": 0, "progress_interval_ms": 100},
        "database": {
            "url": database_url,
            "instance_id": instance_id,
            "retry_ms": 100,
            "instance_ttl_ms": ttl_ms,
            "poll_ms": 50,
            "sweep_ms": sweep_ms,
        },
        "pools": [
            {
                "id": "default",
                "model": MODEL,
                "replicas": 1,
                "slots_per_replica": 2,
                "mock": {"ttft_ms": 0, "tokens_per_s": 20, "eos": False},
                **pool,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def two_instances(
    tmp_path: Path, database_url: str, **pool: Any
) -> Iterator[tuple[httpx.Client, httpx.Client, Any]]:
    """Instances "a" and "b" on one database, with clients; and A's process (to kill it)."""
    with ExitStack() as stack:
        procs = []
        clients = []
        for name in ("a", "b"):
            config = write_config(tmp_path / f"{name}.yaml", database_url, name, **pool)
            url, proc, _ = stack.enter_context(
                serve_process("--config", str(config), data_dir=tmp_path / name)
            )
            procs.append(proc)
            clients.append(stack.enter_context(httpx.Client(base_url=url, timeout=30)))
        yield clients[0], clients[1], procs[0]


def fill_slots(client: httpx.Client, count: int = 2) -> list[str]:
    """``count`` long tasks, running."""
    ids = [submit_to(client, max_tokens=4000)["task_id"] for _ in range(count)]
    for task_id in ids:
        wait_until(lambda t=task_id: task_of(client, t)["state"] == "running", "a long task runs")
    return ids


def burst(clients: list[httpx.Client], total: int) -> list[httpx.Response]:
    """``total`` submissions at once, alternating between the clients' instances."""
    urls = [str(c.base_url) for c in clients]

    def post(i: int) -> httpx.Response:
        with httpx.Client(base_url=urls[i % len(urls)], timeout=30) as client:
            return client.post("/v1/tasks", json={"model": MODEL, "prompt": "p", "max_tokens": 5})

    with ThreadPoolExecutor(total) as pool:
        return list(pool.map(post, range(total)))


def sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


def leftovers(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The slot leases and the open (queued or running) tasks left in the database."""
    leases = sql(url, "SELECT count(*) FROM slot_leases")
    open_tasks = sql(url, "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')")
    return leases, open_tasks


def checkpointed(url: str, task_ids: list[str]) -> bool:
    """Whether every one of the tasks has recorded some progress (tokens_out > 0)."""
    query = "SELECT bool_and(tokens_out > 0) FROM tasks WHERE task_id = ANY(%s)"
    return sql(url, query, task_ids) == [(True,)]


@pytest.mark.req("ORCH-STATE-0030", "ORCH-STATE-0031")
def test_a_burst_split_across_instances_gets_exactly_the_pools_capacity(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(
        tmp_path, postgres_url, queue={"capacity": CAPACITY, "policy": "reject"}
    ) as (a, b, _):
        fill_slots(a)
        answers = burst([a, b], 12)
        queued = sql(postgres_url, "SELECT count(*) FROM tasks WHERE state = 'queued'")

    statuses = Counter(r.status_code for r in answers)
    assert statuses == {202: CAPACITY, 429: 12 - CAPACITY}, statuses
    assert {r.json()["code"] for r in answers if r.status_code == 429} == {"ADMISSION_REJECT"}
    assert queued == [(CAPACITY,)]


@pytest.mark.req("ORCH-STATE-0030", "ORCH-STATE-0031")
def test_drop_lru_across_instances_ends_the_victims_and_never_holds_more_than_capacity(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(
        tmp_path, postgres_url, queue={"capacity": CAPACITY, "policy": "drop-lru"}
    ) as (a, b, _):
        fill_slots(a)
        answers = burst([a, b], 12)
        entries = sql(postgres_url, "SELECT count(*) FROM queue_entries")
        accepted = [r.json()["task_id"] for r in answers if r.status_code == 202]
        ends = [task_of(a if i % 2 else b, t) for i, t in enumerate(accepted)]

    assert len(accepted) == 12
    assert entries == [(CAPACITY,)]
    states = Counter((e["state"], (e.get("error") or {}).get("code")) for e in ends)
    assert states == {("queued", None): CAPACITY, ("failed", "QUEUE_FULL_DROP_LRU"): 12 - CAPACITY}


@pytest.mark.req("ORCH-STATE-0034")
def test_a_task_queued_on_one_instance_is_canceled_from_the_other(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(tmp_path, postgres_url) as (a, b, _):
        fill_slots(a)
        queued = submit_to(a, max_tokens=5)["task_id"]
        assert b.post(f"/v1/tasks/{queued}/cancel").status_code == 204
        seen_on_a = wait_until(
            lambda: (t := task_of(a, queued))["state"] == "canceled" and t, "canceled on A"
        )
        stream = a.get(f"/v1/tasks/{queued}/stream").text
        started = sql(postgres_url, "SELECT started_ms FROM tasks WHERE task_id = %s", queued)

    assert seen_on_a["state"] == "canceled"
    assert started == [(None,)]  # never dispatched
    assert "event: started" not in stream


@pytest.mark.req("ORCH-STATE-0034")
def test_a_task_queued_past_its_wait_limit_ends_queue_timeout_on_either_instance(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(tmp_path, postgres_url) as (a, b, _):
        fill_slots(b)
        late = submit_to(a, max_tokens=5, max_wait_ms=300)["task_id"]
        ended = wait_until(
            lambda: (t := task_of(b, late))["state"] == "failed" and t, "the wait limit passes"
        )
        entries = sql(postgres_url, "SELECT count(*) FROM queue_entries")

    assert ended["error"]["code"] == "QUEUE_TIMEOUT"
    assert ended["timings"]["started_ms"] is None
    assert entries == [(0,)]


@pytest.mark.req("ORCH-STATE-0033")
def test_two_instances_never_run_more_tasks_on_one_replica_than_its_slots(
    tmp_path: Path, postgres_url: str
) -> None:
    # 800 tokens, a millisecond or more apart: each request lasts most of a second or more,
    # long enough for both slots to be busy at once on a loaded machine.
    parts = [*completion_chunks(["x"] * 800, usage=(1, 800)), "data: [DONE]\n\n"]
    engine = CountingEngine([Reply(tuple(parts))])
    with engine_in_thread(engine):
        pool = {
            "engine": "openai",
            "endpoints": [engine.url],
            "discover_slots": False,
            "slots_per_replica": 2,
            "queue": {"capacity": 50},
        }
        with two_instances(tmp_path, postgres_url, **pool) as (a, b, _):
            ids = [submit_to(c, max_tokens=800)["task_id"] for c in (a, b) * 6]
            ends = [
                wait_until(
                    lambda t=t: (s := task_of(a, t))["state"] in ("succeeded", "failed") and s,
                    "the task ends",
                    timeout_s=60,
                )
                for t in ids
            ]
            ran_on = sql(postgres_url, "SELECT DISTINCT instance_id FROM tasks")

    assert [e["state"] for e in ends] == ["succeeded"] * 12, ends
    assert len(engine.posts()) == 12
    assert engine.peak == 2  # both instances had queued work, and the slots were shared
    assert {row[0] for row in ran_on} == {"a", "b"}


@pytest.mark.req("ORCH-STATE-0032", "ORCH-STATE-0035", "ORCH-STATE-0036")
def test_after_sigkill_of_an_instance_the_other_ends_its_running_tasks_and_runs_its_queue(
    tmp_path: Path, postgres_url: str
) -> None:
    config_a = write_config(tmp_path / "a.yaml", postgres_url, "a")
    config_b = write_config(tmp_path / "b.yaml", postgres_url, "b")
    with ExitStack() as stack:
        url_a, proc_a, _ = stack.enter_context(
            serve_process("--config", str(config_a), data_dir=tmp_path / "a")
        )
        a = stack.enter_context(httpx.Client(base_url=url_a, timeout=30))
        # Before B starts: A runs these two, and B cannot take a slot while A's leases live.
        running = fill_slots(a)
        queued = [submit_to(a, max_tokens=3)["task_id"] for _ in range(3)]
        url_b, _, _ = stack.enter_context(
            serve_process("--config", str(config_b), data_dir=tmp_path / "b")
        )
        b = stack.enter_context(httpx.Client(base_url=url_b, timeout=30))
        # A client of B follows a task A admitted, from before A dies until B has run it.
        follow = ThreadPoolExecutor(1)
        followed = follow.submit(lambda: b.get(f"/v1/tasks/{queued[0]}/stream").text)
        wait_until(lambda: checkpointed(postgres_url, running), "A checkpointed its running tasks")
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(timeout=10)
        bound_s = (TTL_MS + SWEEP_MS) / 1000 + 10  # a liveness bound, not a timing
        ended = [
            wait_until(
                lambda t=t: (s := task_of(b, t))["state"] == "failed" and s,
                "A's running task ends on B",
                timeout_s=bound_s,
            )
            for t in running
        ]
        done = [
            wait_until(
                lambda t=t: (s := task_of(b, t))["state"] == "succeeded" and s,
                "A's queued task runs on B",
            )
            for t in queued
        ]
        owners = sql(postgres_url, "SELECT instance_id FROM tasks WHERE task_id = ANY(%s)", queued)
        stream = parse_sse(followed.result(timeout=30))
        follow.shutdown()
        leases, open_tasks = leftovers(postgres_url)
        gone = sql(postgres_url, "SELECT instance_id FROM instances ORDER BY instance_id")

    assert [e["error"]["code"] for e in ended] == ["WORKER_RESET"] * 2
    assert all(e["error"]["retriable"] for e in ended)
    assert all(e["usage"]["tokens_out"] > 0 for e in ended)  # charged for checkpointed progress
    assert [d["usage"]["tokens_out"] for d in done] == [3, 3, 3]
    assert owners == [("b",)] * 3  # admitted on A, dispatched by B
    kinds = [e.event for e in stream]  # the stream on B of a task A admitted: all of it
    assert (kinds[0], kinds.count("token"), kinds[-1]) == ("started", 3, "end"), kinds
    assert [k for k in kinds if k in ("end", "error")] == ["end"]
    assert leases == [(0,)]
    assert gone == [("b",)]
    assert open_tasks == [(0,)]  # every accepted task ended, each once (one terminal state)


class Posts(list[Seen]):
    """The requests a :class:`CountingEngine` saw; a POST counts as active from when it is
    read until its answer ends."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.peak = 0

    def append(self, seen: Seen) -> None:
        super().append(seen)
        if seen.method == "POST":
            self.active += 1
            self.peak = max(self.peak, self.active)


@dataclass
class CountingEngine(ScriptedEngine):
    """The scripted engine, counting the completions it streams at once."""

    seen: list[Seen] = field(default_factory=Posts)

    @property
    def peak(self) -> int:
        assert isinstance(self.seen, Posts)
        return self.seen.peak

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        before = len(self.posts())
        try:
            return await super()._one(reader, writer)
        finally:
            if len(self.posts()) > before:
                assert isinstance(self.seen, Posts)
                self.seen.active -= 1


@contextmanager
def engine_in_thread(engine: CountingEngine) -> Iterator[CountingEngine]:
    """The scripted engine served by its own event loop in a thread, for server processes."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with engine:
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield engine
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()
