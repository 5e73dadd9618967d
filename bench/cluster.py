"""The ``cluster`` profile: admission and streamed tasks per second on SQLite (one instance), on
PostgreSQL with one instance, and on PostgreSQL with two instances sharing the database.

The same loads as the admission profile (wrk, ``POST /v1/tasks``, the embedded mock engine) and
the saturation profile (256 streamed tokens from the mock OpenAI engine, no delay), split evenly
across the instances when there are two. Every process's CPU share (CPU seconds per second) is
reported beside the rates: llorch's instances, the engine and the PostgreSQL cluster (its
postmaster and every backend). On two cores the instances share llorch's core, so two instances
show what the cluster costs, not how it scales.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tools.postgres import private_cluster

TOKENS = 256
STREAM_CONCURRENCY = 32
ADMIT_CONNECTIONS = 32
CONFIGS = (("sqlite", 1), ("postgres", 1), ("postgres", 2))

Llorch = Callable[..., contextlib.AbstractContextManager[tuple[str, int]]]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class CpuMeter:
    """CPU seconds per second of named processes (and a process tree: PostgreSQL's backends)."""

    def __init__(self, pids: dict[str, int], trees: dict[str, int]) -> None:
        self._pids, self._trees = pids, trees
        self._before = self._read()
        self._started = time.monotonic()

    def _read(self) -> dict[str, dict[int, float]]:
        read: dict[str, dict[int, float]] = {}
        for name, pid in self._pids.items():
            read[name] = {pid: _cpu_s(pid)}
        for name, root in self._trees.items():
            tree: dict[int, float] = {}
            for pid in [root, *_children(root)]:
                with contextlib.suppress(OSError):
                    tree[pid] = _cpu_s(pid)
            read[name] = tree
        return read

    def shares(self) -> dict[str, float]:
        after, wall = self._read(), time.monotonic() - self._started
        return {
            f"{name}_cpu_share": round(
                sum(s - self._before[name].get(pid, 0.0) for pid, s in procs.items()) / wall, 3
            )
            for name, procs in after.items()
        }


def _in_parallel(calls: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in calls]

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@contextlib.contextmanager
def _instances(
    llorch: Llorch, tmp: Path, pool: dict[str, Any], count: int, url: str | None
) -> Iterator[list[tuple[str, int]]]:
    env = {} if url is None else {"LLORCH_DATABASE_URL": url}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(llorch(tmp, [pool], env=env)) for _ in range(count)]


def _postmaster(root: Path) -> int:
    return int((root / "data" / "postmaster.pid").read_text().splitlines()[0])


def _admission(
    servers: list[tuple[str, int]],
    trees: dict[str, int],
    admit: Callable[[str, int], dict[str, Any]],
) -> dict[str, Any]:
    meter = CpuMeter({f"llorch{i}": pid for i, (_, pid) in enumerate(servers)}, trees)
    each = ADMIT_CONNECTIONS // len(servers)
    runs = _in_parallel([functools.partial(admit, url, each) for url, _ in servers])
    seconds = max(r["duration_us"] for r in runs) / 1e6
    return {
        "per_s": sum(r["accepted"] for r in runs) / seconds,
        "refused": sum(r["refused"] + r["socket_errors"] for r in runs),
        "latency_ms_p99": max(r["latency_p99_ms"] for r in runs),
        **meter.shares(),
    }


def _streamed(
    servers: list[tuple[str, int]],
    pids: dict[str, int],
    trees: dict[str, int],
    stream: Callable[[str, int], dict[str, Any]],
) -> dict[str, Any]:
    meter = CpuMeter(pids | {f"llorch{i}": pid for i, (_, pid) in enumerate(servers)}, trees)
    each = STREAM_CONCURRENCY // len(servers)
    runs = _in_parallel([functools.partial(stream, url, each) for url, _ in servers])
    return {
        "per_s": sum(r["per_s"] for r in runs),
        "errors": sum(sum(r.get("errors", {}).values()) for r in runs),
        "ttft_ms_p99": max(r["ttft_ms_p99"] or 0 for r in runs),
        "loadgen_cpu_share": sum(r["loadgen_cpu_share"] for r in runs),
        **meter.shares(),
    }


def profile_cluster(
    tmp: Path,
    *,
    llorch: Llorch,
    engine: Callable[..., contextlib.AbstractContextManager[str]],
    engine_pid: Callable[[str], int],
    admit: Callable[[str, int], dict[str, Any]],
    stream: Callable[[str, int], dict[str, Any]],
    pools: tuple[dict[str, Any], Callable[[str], dict[str, Any]]],
) -> dict[str, Any]:
    """Each configuration of ``CONFIGS``: admission/s and streamed tasks/s with CPU shares."""
    admit_pool, stream_pool = pools
    rows = []
    with private_cluster() as pg, engine(tmp, ttft_ms=0, tokens_per_s=0) as engine_url:
        trees = {"postgres": _postmaster(pg.root)}
        for n, (store, count) in enumerate(CONFIGS):
            on_pg = store == "postgres"
            row: dict[str, Any] = {"store": store, "instances": count}
            url = pg.create_database(f"bench_admit_{n}") if on_pg else None
            with _instances(llorch, tmp, admit_pool, count, url) as servers:
                row["admission"] = _admission(servers, trees if on_pg else {}, admit)
            url = pg.create_database(f"bench_stream_{n}") if on_pg else None
            with _instances(llorch, tmp, stream_pool(engine_url), count, url) as servers:
                pids = {"engine": engine_pid(engine_url)}
                row["streamed"] = _streamed(servers, pids, trees if on_pg else {}, stream)
            print(f"    {store:8} x{count} {row}", flush=True)
            rows.append(row)
    return {"tokens": TOKENS, "rows": rows}


def _cores_per_1000(measure: dict[str, Any], prefix: str) -> float | None:
    """CPU cores (of the processes whose share is named ``prefix…``) per 1,000 per second."""
    share = sum(v for k, v in measure.items() if k.startswith(prefix) and k.endswith("_share"))
    return share / measure["per_s"] * 1000 if measure["per_s"] else None


def report_lines(profile: dict[str, Any], fmt: Callable[[float | None, int], str]) -> list[str]:
    """The profile's table for docs/benchmarks.md."""
    lines = [
        "### One and two instances (SQLite, PostgreSQL)",
        "",
        f"Admission: wrk, {ADMIT_CONNECTIONS} connections in all, the embedded mock engine. "
        f"Streamed: {TOKENS} tokens from the mock OpenAI engine (no delay), "
        f"{STREAM_CONCURRENCY} streams in all; split evenly across the instances. "
        "Every instance is pinned to llorch's one core, so two instances show what the cluster "
        "costs on this machine, not how it scales. Cores per 1,000/s: llorch's CPU share "
        "(all instances) over the rate, times 1,000; PostgreSQL's own beside it.",
        "",
        "| store | instances | admission/s | llorch cores per 1,000 202/s | PostgreSQL cores "
        "| streamed tasks/s | llorch cores per 1,000 tasks/s | PostgreSQL cores | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in profile["rows"]:
        admit, streamed = row["admission"], row["streamed"]
        lines.append(
            f"| {row['store']} | {row['instances']} | {fmt(admit['per_s'], 0)} "
            f"| {fmt(_cores_per_1000(admit, 'llorch'), 2)} "
            f"| {fmt(_cores_per_1000(admit, 'postgres'), 2)} "
            f"| {fmt(streamed['per_s'], 1)} | {fmt(_cores_per_1000(streamed, 'llorch'), 2)} "
            f"| {fmt(_cores_per_1000(streamed, 'postgres'), 2)} "
            f"| {admit['refused'] + streamed['errors']} |"
        )
    return [*lines, ""]
