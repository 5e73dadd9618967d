"""The Python objects an open event stream holds in the server, by tracemalloc.

    PYTHONPATH=src:. .venv/bin/python -m bench.probes.stream_memory [--streams 300] [--frames 12]

llorch with the mock pool and the load of the streams profile of ``bench/run.py`` (the load
generator's hold mode: a token every 10 s, the tasks canceled once the heap is read). A
``sitecustomize`` module put on the server's path starts tracemalloc on SIGUSR2 (after eight
warm-up tasks, so only what comes after is traced) and writes a snapshot on SIGUSR1 (one second
after every stream has opened, when the profile reads RSS): what is left in it is what the open
streams hold. Prints the bytes per stream by group (the uvicorn connection, connexion and the
edge, the SSE response, the task's run, the events published so far, the mock engine) and by
source line. Tracing makes the server slow; the resident size it prints is with tracemalloc on.
Nothing is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import loadgen
from bench import run as bench
from bench.loadgen import rss_kib

SITECUSTOMIZE = """
import os, signal, tracemalloc
def _start(*_):
    tracemalloc.start(int(os.environ["LLORCH_TM_FRAMES"]))
def _dump(*_):
    import gc
    gc.collect()
    tracemalloc.take_snapshot().dump(os.environ["LLORCH_TM_SNAPSHOT"])
    tracemalloc.stop()
signal.signal(signal.SIGUSR2, _start)
signal.signal(signal.SIGUSR1, _dump)
"""

# The streams profile's engine (bench/run.py, profile_streams): a token every 10 s, so every
# stream is open when the heap is read, and its tasks are canceled afterwards.
TOKENS_PER_S = 0.1
MAX_TOKENS = 240

# The first match names a traced block's group (its traceback's files, oldest frame first).
GROUPS = (
    ("engines/mock.py", "mock engine (the bench's)"),
    ("scheduler/events.py", "events published so far"),
    ("scheduler/", "the task's run (scheduler)"),
    ("api/sse.py", "SSE response"),
    ("stream_route.py", "SSE response"),
    ("starlette/responses.py", "SSE response"),
    ("persistence/", "admission, storage"),
    ("connexion/", "connexion, starlette, the edge"),
    ("starlette/", "connexion, starlette, the edge"),
    ("api/middleware.py", "connexion, starlette, the edge"),
    ("uvicorn/", "the uvicorn connection"),
    ("api/http.py", "the uvicorn connection"),
)


def group(files: list[str]) -> str:
    joined = " ".join(files)
    return next((name for key, name in GROUPS if key in joined), "the loop (C allocations)")


async def hold(url: str, pid: int, streams: int) -> float:
    """Open ``streams`` streams as the streams profile does, snapshot the server once all are
    open, then cancel their tasks; KiB of RSS a stream."""
    args = argparse.Namespace(
        url=url,
        model="mock-small",
        prompt="tell me a story about a quiet river",
        max_tokens=MAX_TOKENS,
        ramp=256,
        hold_timeout=300.0,
        api_key=None,
    )
    async with loadgen.session(args, args.hold_timeout) as client:
        warm, tasks, _ = await loadgen.open_all(client, args, 8)
        await loadgen.end_all(client, args, warm, tasks)
        await asyncio.sleep(1)
        os.kill(pid, signal.SIGUSR2)
        await asyncio.sleep(0.5)
        base = rss_kib(pid)
        held, tasks, open_s = await loadgen.open_all(client, args, streams)
        await asyncio.sleep(1.0)  # as the profile does
        during = rss_kib(pid)
        os.kill(pid, signal.SIGUSR1)
        print(f"{streams} streams open after {open_s:.1f} s", flush=True)
        await loadgen.end_all(client, args, held, tasks)
        if held.errors or held.ended_ok != streams:
            raise RuntimeError(f"{held.ended_ok} of {streams} ended; errors {held.errors}")
        return (during - base) / streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc's frames per block")
    parser.add_argument("--lines", type=int, default=25, help="source lines to print")
    parser.add_argument("--keep", type=Path, help="a copy of the heap snapshot, for tracemalloc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-stream-memory-") as name:
        tmp = Path(name)
        (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
        snapshot = tmp / "heap.snapshot"
        env = {
            "LLORCH_TM_FRAMES": str(args.frames),
            "LLORCH_TM_SNAPSHOT": str(snapshot),
            "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]),
        }
        replicas = max(8, -(-args.streams // 1024))
        slots = args.streams // replicas + 1
        pool = bench.mock_pool(replicas=replicas, slots=slots, ttft_ms=0, tokens_per_s=TOKENS_PER_S)
        with bench.llorch(tmp, [pool], env=env) as (url, pid):
            kib = asyncio.run(hold(url, pid, args.streams))
            while not snapshot.exists():  # written by the server, after a collection
                time.sleep(0.2)
        heap = tracemalloc.Snapshot.load(str(snapshot))
        if args.keep:
            shutil.copyfile(snapshot, args.keep)
    n = args.streams
    by_group: Counter[str] = Counter()
    for stat in heap.statistics("traceback"):
        by_group[group([frame.filename for frame in stat.traceback])] += stat.size
    print(f"RSS {kib:.1f} KiB a stream (tracemalloc on); Python objects, bytes a stream:")
    print(f"{sum(by_group.values()) / n:8.0f}  in all")
    for name, size in by_group.most_common():
        print(f"{size / n:8.0f}  {name}")
    for stat in heap.statistics("lineno")[: args.lines]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1].split("/src/")[-1]
        print(f"{stat.size / n:8.0f}  {stat.count / n:6.2f} blocks  {where}:{frame.lineno}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
