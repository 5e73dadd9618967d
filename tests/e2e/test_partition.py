"""An instance cut off from PostgreSQL while the others still reach it: it stops its runs before
a survivor takes them over, and its clients get the end the database holds
(ORCH-STATE-0037, ORCH-STATE-0038)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.stall_proxy import StallProxy, url_through
from tests.e2e.test_cluster_queue import (
    CountingEngine,
    Posts,
    engine_in_thread,
    leftovers,
    write_config,
)
from tests.engines.scripted import Reply, completion_chunks
from tests.support import parse_sse, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

TTL_MS = 4000
SWEEP_MS = 400  # the fence: max(TTL - 3 sweeps, TTL / 2) = 2.8 s without a heartbeat


def active(engine: CountingEngine) -> int:
    """The completions the engine is streaming now."""
    assert isinstance(engine.seen, Posts)
    return engine.seen.active


def _instance(stack: ExitStack, home: Path, database_url: str, engine_url: str) -> httpx.Client:
    """One instance on ``database_url``, on a one-slot replica of the engine: its client."""
    config = write_config(
        home.with_suffix(".yaml"),
        database_url,
        home.name,
        ttl_ms=TTL_MS,
        sweep_ms=SWEEP_MS,
        engine="openai",
        endpoints=[engine_url],
        discover_slots=False,
        slots_per_replica=1,
        queue={"capacity": 10},
    )
    base, _, _ = stack.enter_context(serve_process("--config", str(config), data_dir=home))
    return stack.enter_context(httpx.Client(base_url=base, timeout=60))


@pytest.mark.req("ORCH-STATE-0037", "ORCH-STATE-0038")
def test_an_instance_cut_off_from_the_database_stops_its_run_before_a_survivor_takes_its_slot(
    tmp_path: Path, postgres_url: str
) -> None:
    # The first completion streams three tokens and then nothing until its caller hangs up;
    # the later ones are short.
    hang = Reply(tuple(completion_chunks(["x"] * 3)[:-1]), end="hang")
    short = Reply((*completion_chunks(["y", "y"], usage=(1, 2)), "data: [DONE]\n\n"))
    engine = CountingEngine([hang, short])
    with ExitStack() as stack:
        stack.enter_context(engine_in_thread(engine))
        target = urlsplit(postgres_url)
        proxy = stack.enter_context(StallProxy((target.hostname or "", target.port or 5432)))

        def start(name: str, database_url: str) -> httpx.Client:
            return _instance(stack, tmp_path / name, database_url, engine.url)

        a = start("a", url_through(postgres_url, proxy.port))
        held = submit_to(a, max_tokens=50)["task_id"]
        wait_until(lambda: task_of(a, held)["state"] == "running", "A runs the task")
        follow = stack.enter_context(ThreadPoolExecutor(1))
        followed = follow.submit(lambda: a.get(f"/v1/tasks/{held}/stream").text)
        wait_until(lambda: active(engine) == 1, "the engine streams A's task")
        b = start("b", postgres_url)  # after A took the only slot
        # Queued behind A's lease on the only slot.
        later = submit_to(b, max_tokens=2)["task_id"]

        proxy.cut()  # A alone loses the database
        wait_until(
            lambda: active(engine) == 0,
            "A stops its engine call",
            timeout_s=TTL_MS / 1000 + 20,
        )
        taken = wait_until(
            lambda: (s := task_of(b, held))["state"] == "failed" and s,
            "B ends A's task",
            timeout_s=TTL_MS / 1000 + 20,
        )
        ran = wait_until(
            lambda: (s := task_of(b, later))["state"] == "succeeded" and s,
            "B runs the queued task on the freed slot",
        )
        proxy.heal()
        stream = parse_sse(followed.result(timeout=60))
        told = wait_until(
            lambda: (s := task_of(a, held))["state"] == "failed" and s, "A reads the end again"
        )
        leases, open_tasks = leftovers(postgres_url)

    assert engine.peak == 1  # A's run stopped before B took the slot: never two on one slot
    assert taken["error"]["code"] == "WORKER_RESET" and taken["error"]["retriable"]
    assert ran["usage"]["tokens_out"] == 2
    kinds = [e.event for e in stream]
    assert kinds.count("token") == 3 and kinds[-1] == "error", kinds
    assert [k for k in kinds if k in ("end", "error")] == ["error"]  # one terminal frame
    terminal = stream[-1].data
    # The end the database holds (B's), told on A: one terminal state for every client.
    assert (terminal["code"], terminal["message"]) == ("WORKER_RESET", taken["error"]["message"])
    assert told["error"] == taken["error"]
    assert (leases, open_tasks) == ([(0,)], [(0,)])
