"""What the cluster fan-out costs: the durable transcript's writer and its NOTIFYs, measured.

    .venv/bin/python -m bench.probes.fanout_cost [--tasks 64] [--tokens-per-s 50]
        [--max-tokens 200] [--flush-ms 5]

A private PostgreSQL cluster (tools/postgres.py), one database migrated by the real store, and
``--tasks`` simulated streams of ``--max-tokens`` token frames each at ``--tokens-per-s``
(``{"t": ..., "i": ...}`` as the relay publishes them, then an ``end`` frame), appended from the
event loop to :class:`llorch.persistence.pg_events.Transcript` as a running instance does. A
:class:`llorch.persistence.pg_notify.Listener` stands for a second instance and reads the
frames each notification names (one read for all of them, as scheduler.remote_stream does).

Printed (JSON): rows/s and flushes (= NOTIFYs) per second written, the writer thread's CPU per
streamed task and per 1,000 frames, this process's CPU per task (writer, reader and the load
itself), the PostgreSQL server's CPU per task (all its processes, from /proc), and the delay
from a frame's append to the notification that names it on the other "instance"
(p50 / p99). Not a timed test: figures for bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llorch.persistence.pg_events import EVENTS_CHANNEL, Transcript
from llorch.persistence.pg_notify import Listener
from llorch.persistence.postgres import PostgresStorage
from llorch.persistence.rows import SessionRow, TaskRow
from tools.postgres import private_cluster


def server_cpu_s(user: str = "postgres") -> float:
    """CPU seconds (user + system) of every process of ``user``, from /proc."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def seed(url: str, tasks: int) -> list[str]:
    store = PostgresStorage.open(url, profile="test")
    session = SessionRow("s-1", 0, 0, 10**9, 0, 10**6, 10**9, 10**9, 1e9)
    ids = [f"t-{i:04d}-{os.urandom(8).hex()}" for i in range(tasks)]
    for n, task_id in enumerate(ids):
        row = TaskRow(
            task_id=task_id,
            session_id="s-1",
            pool_id="default",
            model="m",
            priority="interactive",
            state="running",
            request_json="{}",
            request_digest=task_id,
            correlation_id=task_id,
            created_ms=0,
        )
        store.admit_task(row, session, new_session=n == 0)
    store.close()
    return ids


async def stream(
    transcript: Transcript,
    task_id: str,
    tokens: int,
    rate: float,
    sent: dict[tuple[str, int], float],
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    transcript.append(task_id, 0, "started", {"queue_wait_ms": 0}, False)
    for i in range(tokens):
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))
        sent[(task_id, i + 1)] = time.monotonic()
        transcript.append(task_id, i + 1, "token", {"t": " word", "i": i}, False)
    transcript.append(task_id, tokens + 1, "end", {"finish_reason": "length"}, True)


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    ids = seed(url, args.tasks)
    transcript = Transcript(url, flush_s=args.flush_ms / 1000)
    reader = Transcript(url)  # the other instance's reads (its pool only)
    transcript.start()
    reader.start()
    ears = Listener(url, retry_s=1.0)
    delays: list[float] = []
    sent: dict[tuple[str, int], float] = {}
    seen: dict[str, int] = dict.fromkeys(ids, 0)
    reads: set[asyncio.Task[None]] = set()

    async def read(task_ids: list[str]) -> None:
        got = await asyncio.to_thread(reader.read_many, {t: seen[t] for t in task_ids})
        now = time.monotonic()
        for task_id, frames in got.items():
            for seq, _, _ in frames.frames:
                if (at := sent.get((task_id, seq))) is not None:
                    delays.append(now - at)
                seen[task_id] = max(seen[task_id], seq)

    def heard(payload: str) -> None:
        # One read for every task a notification names, as scheduler.remote_stream reads.
        if args.no_reader:
            return
        task = asyncio.get_running_loop().create_task(read(payload.split()))
        reads.add(task)
        task.add_done_callback(reads.discard)

    ears.listen(EVENTS_CHANNEL, heard)
    ears.start(asyncio.get_running_loop())
    while not ears.up:  # noqa: ASYNC110 (a condition of another thread)
        await asyncio.sleep(0.01)
    cpu0, pg0, wall0 = time.process_time(), server_cpu_s(), time.monotonic()
    await asyncio.gather(
        *(stream(transcript, t, args.max_tokens, args.tokens_per_s, sent) for t in ids)
    )
    frames = args.tasks * (args.max_tokens + 2)
    while transcript.stats.frames < frames:  # noqa: ASYNC110 (a condition of another thread)
        await asyncio.sleep(0.01)
    wall = time.monotonic() - wall0
    await asyncio.sleep(0.5)  # the last reads
    cpu, pg = time.process_time() - cpu0, server_cpu_s() - pg0
    stats = transcript.stats
    await asyncio.to_thread(ears.close)
    transcript.close()
    reader.close()
    delays.sort()
    return _report(args, stats, frames, wall, cpu, pg) | _delays(delays)


def _report(
    args: argparse.Namespace, stats: Any, frames: int, wall: float, cpu: float, pg: float
) -> dict[str, Any]:
    """The rates and costs of one run: the writer's stats over the wall time and the tasks."""
    return {
        "tasks": args.tasks,
        "tokens_per_s_each": args.tokens_per_s,
        "frames": frames,
        "wall_s": round(wall, 2),
        "frames_per_s": round(stats.frames / wall),
        "rows_per_s": round(stats.rows / wall),
        "flushes_per_s": round(stats.flushes / wall, 1),
        "notifies_per_s": round(stats.notifies / wall, 1),
        "frames_per_flush": round(stats.frames / max(1, stats.flushes), 1),
        "rows_per_flush": round(stats.rows / max(1, stats.flushes), 1),
        "writer_cpu_ms_per_task": round(1000 * stats.busy_s / args.tasks, 2),
        "writer_cpu_ms_per_1000_frames": round(1e6 * stats.busy_s / frames, 2),
        "process_cpu_ms_per_task": round(1000 * cpu / args.tasks, 2),
        "postgres_cpu_ms_per_task": round(1000 * pg / args.tasks, 2),
        "postgres_cpu_share": round(pg / wall, 3),
    }


def _delays(delays: list[float]) -> dict[str, float]:
    if not delays:
        return {}
    return {
        "append_to_remote_read_ms_p50": round(1000 * statistics.median(delays), 2),
        "append_to_remote_read_ms_p99": round(1000 * delays[int(0.99 * (len(delays) - 1))], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--tokens-per-s", type=float, default=50.0)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--flush-ms", type=float, default=5.0)
    parser.add_argument(
        "--no-reader", action="store_true", help="only the writer (no reads on notification)"
    )
    args = parser.parse_args()
    with private_cluster() as pg:
        url = pg.create_database("fanout")
        print(json.dumps(asyncio.run(measure(url, args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
