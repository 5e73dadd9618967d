"""CPU per admitted task with no HTTP in between, and what SQLite takes of it.

    .venv/bin/python -m bench.probes.admission_inprocess [--tasks 3000] [--sql] [--logs]
        [--gc-young N]

llorch's app (``create_app``, the mock pool of the admission profile: 4 x 64 slots, no delay,
1 token a task) is called as an ASGI app, in this process, with ``POST /v1/tasks`` at
concurrency 32. Prints CPU seconds per task (``process_time``, every thread) for the request
path (until the last 202) and for the whole task (until the process is idle again: every
task has ended), and the event loop's thread alone for the whole task. ``--sql`` also
times every SQLite statement by its first words (wall time, on the event loop's thread);
``--logs`` writes llorch's JSON log lines (to stderr) as ``serve`` does; ``--gc-young`` tries
another set-up of the cyclic collector (bench/NOTES.md, "Admission CPU"). Without HTTP, these move
less between runs than the figures of ``bench/admission_cost.py``, so they suit A/B comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from asgi_lifespan import LifespanManager

from llorch.api import logs
from llorch.api.app import create_app
from llorch.config import Settings
from llorch.contracts import validate_config
from llorch.persistence import db as persistence


def settings(data_dir: Path) -> Settings:
    """CONFIG validated like a configuration file, in the test profile, in ``data_dir``."""
    validate_config(CONFIG)
    return Settings.from_mapping(CONFIG).with_server(data_dir=str(data_dir), profile="test")


BODY = b'{"model": "mock-small", "prompt": "Once upon a time", "max_tokens": 1}'
CONFIG: dict[str, Any] = {
    "pools": [
        {
            "id": "bench",
            "model": "mock-small",
            "replicas": 4,
            "slots_per_replica": 64,
            "queue": {"capacity": 100_000, "policy": "reject"},
            "mock": {"ttft_ms": 0, "tokens_per_s": 0, "eos": False},
        }
    ],
    "sessions": {"max_turns": 10_000_000},
}


def scope() -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(BODY)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/tasks",
        "raw_path": b"/v1/tasks",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def submit(app: Any) -> int:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)  # the client never goes away
        raise AssertionError("unreachable")

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope(), receive, send)
    return status[0]


async def until_idle(quiet_s: float = 0.3) -> None:
    """Wait until the process spends under 2 % of ``quiet_s`` in CPU over ``quiet_s``."""
    while True:
        before = time.process_time()
        await asyncio.sleep(quiet_s)
        if time.process_time() - before < 0.02 * quiet_s:
            return


class TimedConnection:
    """A sqlite3 connection whose ``execute`` is timed by statement kind."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        #: seconds of every call, by statement kind
        self.calls: dict[str, list[float]] = collections.defaultdict(list)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        started = time.perf_counter()
        try:
            return self._conn.execute(sql, *args)
        finally:
            words = sql.split()
            kind = " ".join(words[:3] if words[0] in ("INSERT", "SELECT") else words[:2])
            self.calls[kind].append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def statement_report(seconds: list[float], tasks: int) -> dict[str, float]:
    """How often a statement kind ran per task and how long its calls took (µs), the slow
    ones included: a WAL checkpoint runs inside the COMMIT that triggers it."""
    ordered = sorted(seconds)
    n = len(ordered)
    return {
        "per_task": round(n / tasks, 2),
        "us_mean": round(1e6 * sum(ordered) / n, 1),
        "us_p50": round(1e6 * ordered[n // 2], 1),
        "us_p99": round(1e6 * ordered[min(n - 1, int(n * 0.99))], 1),
        "us_max": round(1e6 * ordered[-1], 1),
        "ms_in_calls_over_1_ms": round(1e3 * sum(t for t in ordered if t > 0.001), 1),
    }


async def run(tasks: int, sql: bool, gc_young: int | None = None) -> dict[str, Any]:
    timed: list[TimedConnection] = []
    if sql:
        opened = persistence.Database.open.__func__  # type: ignore[attr-defined]

        def open_timed(cls: type[persistence.Database], *a: Any, **k: Any) -> Any:
            db = opened(cls, *a, **k)
            db._conn = TimedConnection(db._conn)
            timed.append(db._conn)
            return db

        persistence.Database.open = classmethod(open_timed)  # type: ignore[method-assign,assignment]
    with tempfile.TemporaryDirectory(prefix="llorch-admission-") as name:
        app = create_app(settings(Path(name)))
        async with LifespanManager(app) as manager:
            for _ in range(300):  # warm up
                await submit(manager.app)
            await asyncio.sleep(0.5)
            if gc_young is not None:
                gc.collect()
                gc.freeze()  # start-up's objects: no collection walks them again
                gc.set_threshold(gc_young, 20, 10)
            for conn in timed:
                conn.calls.clear()
            limit = asyncio.Semaphore(32)

            async def one() -> int:
                async with limit:
                    return await submit(manager.app)

            started, loop_started = time.process_time(), time.thread_time()
            codes = await asyncio.gather(*(one() for _ in range(tasks)))
            request_path = time.process_time() - started
            await until_idle()  # every task has ended
            whole, loop_whole = time.process_time() - started, time.thread_time() - loop_started
    report: dict[str, Any] = {
        "tasks": tasks,
        "statuses": sorted(set(codes)),
        "us_cpu_request_path": round(1e6 * request_path / tasks),
        "us_cpu_whole_task": round(1e6 * whole / tasks),
        # The event loop's thread alone (the trace's file is written in a worker thread).
        "us_loop_cpu_whole_task": round(1e6 * loop_whole / tasks),
    }
    if sql:
        calls: dict[str, list[float]] = collections.defaultdict(list)
        for conn in timed:
            for kind, seconds in conn.calls.items():
                calls[kind] += seconds
        report["sqlite_us_per_task"] = round(1e6 * sum(map(sum, calls.values())) / tasks)
        report["sqlite_by_statement"] = {
            kind: statement_report(seconds, tasks)
            for kind, seconds in sorted(calls.items(), key=lambda kv: -sum(kv[1]))
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--sql", action="store_true", help="time SQLite's statements too")
    parser.add_argument("--logs", action="store_true", help="write the JSON log lines")
    parser.add_argument(
        "--gc-young",
        type=int,
        help="after the warm-up: gc.freeze() and the young generation's threshold at this "
        "(middle and old at 20 and 10); without it, Python's defaults (700, 10, 10)",
    )
    args = parser.parse_args()
    if args.logs:
        logs.configure()
    print(json.dumps(uvloop.run(run(args.tasks, args.sql, args.gc_young)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
