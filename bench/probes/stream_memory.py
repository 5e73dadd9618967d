"""The Python objects an open event stream holds in the server, by tracemalloc.

    PYTHONPATH=src:. .venv/bin/python -m bench.probes.stream_memory [--streams 300] [--frames 12]

llorch with the mock pool as the streams profile of ``bench/run.py`` starts it, but at one token
a second (24 tokens), so that every stream is still open when the heap is read. A
``sitecustomize`` module put on the server's path starts tracemalloc on SIGUSR2 (after eight
warm-up tasks, so only what comes after is traced) and writes a snapshot on SIGUSR1 (once every
stream has its first frame): what is left in it is what the open streams hold. Prints the bytes
per stream by group (the uvicorn connection, connexion and the edge, the SSE response, the
task's run, the events published so far, the mock engine) and by source line. Tracing makes the
server slow; the resident size it prints is with tracemalloc on. Nothing is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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
    """Open ``streams`` streams, snapshot the server once all are open; KiB of RSS a stream."""
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:
        opened: list[int] = []
        all_open = asyncio.Event()

        async def one(tokens: int) -> None:
            body = {"model": "mock-small", "prompt": "Once upon a time", "max_tokens": tokens}
            body["task_id"] = f"mem-{uuid.uuid4().hex}"
            async with s.post(f"{url}/v1/tasks", data=orjson.dumps(body)) as answer:
                await answer.read()
            async with s.get(f"{url}/v1/tasks/{body['task_id']}/stream") as stream:
                first = True
                async for line in stream.content:
                    if first:
                        opened.append(1)
                        first = False
                        if len(opened) == streams:
                            all_open.set()
                    if line.startswith((b"event: end", b"event: error")):
                        return

        for _ in range(8):
            await one(2)
        opened.clear()
        all_open.clear()
        await asyncio.sleep(1)
        os.kill(pid, signal.SIGUSR2)
        await asyncio.sleep(0.5)
        base = rss_kib(pid)
        tasks = [asyncio.create_task(one(24)) for _ in range(streams)]
        started = time.monotonic()
        await all_open.wait()
        during = rss_kib(pid)
        os.kill(pid, signal.SIGUSR1)
        print(f"{streams} streams open after {time.monotonic() - started:.1f} s", flush=True)
        await asyncio.gather(*tasks)
        return (during - base) / streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc's frames per block")
    parser.add_argument("--lines", type=int, default=25, help="source lines to print")
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
        pool = bench.mock_pool(replicas=replicas, slots=slots, ttft_ms=0, tokens_per_s=1)
        with bench.llorch(tmp, [pool], env=env) as (url, pid):
            kib = asyncio.run(hold(url, pid, args.streams))
            while not snapshot.exists():  # written by the server, after a collection
                time.sleep(0.2)
        heap = tracemalloc.Snapshot.load(str(snapshot))
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
