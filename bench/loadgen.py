"""The load generator of the benchmarks, as its own process; prints one JSON object.

Modes:
    direct   streamed completions straight from an OpenAI-compatible engine
    litellm  the same streamed completions through the LiteLLM proxy (--url is the proxy's,
             --api-key its master key)
    llorch   streamed tasks through llorch: POST /v1/tasks, then GET /v1/tasks/{id}/stream
    facade   the direct mode's streamed completions through llorch's OpenAI-compatible door
             (--url is llorch's): each one a task, answered in OpenAI's chunks
    admit    POST /v1/tasks only: how many are answered 202 per second
    hold     N tasks with N streams open at once (--ramp opening at a time); reads the
             server's resident memory (--pid) before and while they are open, then cancels
             the tasks and reads every stream to its end

Each worker sends its next request as soon as the previous one ended. The measured window is
the --duration seconds after --warmup; a request is counted when it ends inside the window, even if
it started before it; a token is counted when it arrives inside the window. (Counting only the
requests that both start and end inside the window would undercount streams that last a sizeable
part of the window, and count none of those that last longer: a LiteLLM stream of 256 tokens at
concurrency 64 takes 10 s or more on one core. Completions still come in waves then, so
``per_s_by_tokens``, the token rate over the tokens per stream, is the steadier tasks/s.)

The client is aiohttp on uvloop, reading each response a network read at a time: the load
generator shares its core with the engine, and with httpx (and a line iterator) it used three
quarters of that core at concurrency 64, which slowed the engine it measured
(bench/NOTES.md, "The load generator").
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop


@dataclass
class Sample:
    start: float
    end: float
    ttft: float | None
    tokens: int
    ok: bool
    status: str
    # When each token arrived (perf_counter), for the tokens that arrived inside the window.
    arrivals: list[float] = field(default_factory=list)


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def lines_of(pending: bytes, read: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in ``pending + read`` (without their ends), and what is left over."""
    lines = (pending + read).split(b"\n")
    rest = lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines], rest


async def stream_direct(client: aiohttp.ClientSession, args: argparse.Namespace) -> Sample:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    body = {
        "model": args.model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    done = False
    arrivals: list[float] = []
    async with client.post(f"{args.url}/v1/completions", data=orjson.dumps(body)) as response:
        if response.status != 200:
            await response.read()
            return Sample(start, time.perf_counter(), None, 0, False, str(response.status))
        pending = b""
        while not done and (read := await response.content.readany()):
            now = time.perf_counter()
            lines, pending = lines_of(pending, read)
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                choice = orjson.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    arrivals.append(now)
                    tokens += 1
                    if ttft is None:
                        ttft = now - start
    status = "200" if done else "cut"
    return Sample(start, time.perf_counter(), ttft, tokens, done, status, arrivals)


async def stream_llorch(client: aiohttp.ClientSession, args: argparse.Namespace) -> Sample:
    start = time.perf_counter()
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens}
    async with client.post(f"{args.url}/v1/tasks", data=orjson.dumps(body)) as admitted:
        answer = await admitted.read()
        if admitted.status != 202:
            code = orjson.loads(answer).get("code", "") if answer else ""
            return Sample(start, time.perf_counter(), None, 0, False, f"{admitted.status} {code}")
    task_id = orjson.loads(answer)["task_id"]
    ttft = None
    tokens = 0
    terminal = ""
    arrivals: list[float] = []
    async with client.get(f"{args.url}/v1/tasks/{task_id}/stream") as response:
        if response.status != 200:
            await response.read()
            return Sample(start, time.perf_counter(), None, 0, False, str(response.status))
        pending = b""
        ended = False
        while not ended and (read := await response.content.readany()):
            now = time.perf_counter()
            lines, pending = lines_of(pending, read)
            for line in lines:
                if line.startswith(b"event: "):
                    event = line[7:]
                    if event == b"token":
                        arrivals.append(now)
                        tokens += 1
                        if ttft is None:
                            ttft = now - start
                    elif event in (b"end", b"error"):
                        terminal = event.decode()
                elif terminal and line.startswith(b"data: "):
                    if terminal == "error":
                        code = orjson.loads(line[6:]).get("code", "error")
                        return Sample(start, time.perf_counter(), ttft, tokens, False, code)
                    ended = True
                    break
    ok = terminal == "end"
    return Sample(start, time.perf_counter(), ttft, tokens, ok, "end" if ok else "cut", arrivals)


async def admit_only(client: aiohttp.ClientSession, args: argparse.Namespace) -> Sample:
    start = time.perf_counter()
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens}
    async with client.post(f"{args.url}/v1/tasks", data=orjson.dumps(body)) as response:
        answer = await response.read()
    ok = response.status == 202
    code = "" if ok or not answer else f" {orjson.loads(answer).get('code', '')}"
    return Sample(start, time.perf_counter(), None, 0, ok, f"{response.status}{code}")


MODES = {
    "direct": stream_direct,
    "litellm": stream_direct,
    "facade": stream_direct,
    "llorch": stream_llorch,
    "admit": admit_only,
}


# Idle connections are dropped before uvicorn's keep-alive timeout (5 s) can close them: a request
# sent on a connection the server is closing gets a reset (ECONNRESET) or no answer at all.
KEEPALIVE_S = 3.0


def session(args: argparse.Namespace, timeout_s: float) -> aiohttp.ClientSession:
    """One client for all workers: a connection per worker, kept alive, JSON bodies."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers=headers,
        auto_decompress=False,
    )


async def closed_loop(args: argparse.Namespace) -> dict[str, Any]:
    call = MODES[args.mode]
    run = Run()
    t0, cpu0 = time.perf_counter(), time.process_time()
    measure_from = t0 + args.warmup
    until = measure_from + args.duration

    async def worker(i: int) -> None:
        # Workers start spread over the first half of the warm-up: with an engine that takes
        # the same time for every stream, workers started together would stay in step, and
        # their completions would come in waves that the window's edges cut (a few % of
        # tasks/s, either way).
        await asyncio.sleep(i * args.warmup / 2 / args.concurrency)
        while time.perf_counter() < until:
            try:
                sample = await call(client, args)
            except (aiohttp.ClientError, TimeoutError) as exc:
                now = time.perf_counter()
                sample = Sample(now, now, None, 0, False, type(exc).__name__)
            run.samples.append(sample)

    async with session(args, 60.0) as client:
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    counted = [s for s in run.samples if measure_from <= s.end <= until]
    ok = [s for s in counted if s.ok]
    errors: dict[str, int] = {}
    for s in counted:
        if not s.ok:
            errors[s.status] = errors.get(s.status, 0) + 1
    ttfts = [s.ttft * 1000 for s in ok if s.ttft is not None]
    # Tokens are counted by when they arrived, so streams that straddle the window's edges
    # count for their part inside it (tasks/s, by completions, is quantised when every worker's
    # stream takes about as long as the window or longer).
    tokens = sum(1 for s in run.samples if s.ok for t in s.arrivals if measure_from <= t <= until)
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "counted": "streams that ended in the window; tokens that arrived in it",
        "completed": len(ok),
        "errors": errors,
        "per_s": len(ok) / args.duration,
        "tokens_per_s": tokens / args.duration,
        # Whole streams' worth of tokens per second: the tasks/s that the token rate sustains.
        "per_s_by_tokens": tokens / args.duration / args.max_tokens,
        "ttft_ms_p50": quantile(ttfts, 0.50),
        "ttft_ms_p99": quantile(ttfts, 0.99),
        # The load generator's own CPU (seconds per second, warm-up included):
        # near 1.0, it and not the server under test sets the pace.
        "loadgen_cpu_share": round(cpu_share, 3),
    }


def failure(exc: BaseException) -> str:
    """An exception's class, with the errno of the OSError beneath it when there is one."""
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = getattr(cause, "os_error", None) or cause.__cause__ or cause.__context__
    if cause is None:
        return f"{type(exc).__name__}: {exc}"[:120]
    assert isinstance(cause, OSError)
    return f"{type(exc).__name__} {errno.errorcode.get(cause.errno or 0, cause.errno)}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Holding:
    """The hold mode's counts: streams opened (or failed before opening), ended, errors."""

    n: int
    opening: asyncio.Semaphore
    errors: dict[str, int] = field(default_factory=dict)
    opened: int = 0
    ended_ok: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    task_ids: list[str] = field(default_factory=list)  # the tasks whose streams opened

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count(self) -> None:
        """A stream opened, or failed before it could open: the next one may start opening."""
        self.opened += 1
        self.opening.release()
        if self.opened == self.n:
            self.all_open.set()


async def hold_one(client: aiohttp.ClientSession, args: argparse.Namespace, h: Holding) -> None:
    """Submit a task and read its stream to the terminal frame (counted once it has opened)."""
    body = {
        "model": args.model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "task_id": f"hold-{uuid.uuid4().hex}",
    }
    await h.opening.acquire()
    counted = False
    try:
        async with client.post(f"{args.url}/v1/tasks", data=orjson.dumps(body)) as sent:
            answer = await sent.read()
        if sent.status != 202:
            code = orjson.loads(answer).get("code", "") if answer else ""
            h.error(f"submit {sent.status} {code}")
            return
        task_id = orjson.loads(answer)["task_id"]
        async with client.get(f"{args.url}/v1/tasks/{task_id}/stream") as resp:
            counted = True
            h.count()
            if resp.status != 200:
                h.error(f"stream {resp.status}")
                return
            h.task_ids.append(task_id)
            terminal = ""
            async for raw in resp.content:
                line = raw.rstrip(b"\r\n")
                if line in (b"event: end", b"event: error"):
                    terminal = line[7:].decode()
                    break
            if terminal == "end":
                h.ended_ok += 1
            else:
                h.error(f"terminal {terminal or 'missing'}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        h.error(failure(exc))
    finally:
        if not counted:
            h.count()


async def cancel_all(client: aiohttp.ClientSession, args: argparse.Namespace, h: Holding) -> None:
    """Cancel every task whose stream opened, ``--ramp`` at a time: each stream then ends with
    ``end`` (``finish_reason: canceled``), or has ended already (the cancel is answered 204)."""

    async def cancel(task_id: str) -> None:
        async with h.opening:
            try:
                async with client.post(f"{args.url}/v1/tasks/{task_id}/cancel") as answer:
                    await answer.read()
                if answer.status != 204:
                    h.error(f"cancel {answer.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                h.error(f"cancel {failure(exc)}")

    await asyncio.gather(*(cancel(task_id) for task_id in h.task_ids))


async def open_all(
    client: aiohttp.ClientSession, args: argparse.Namespace, n: int
) -> tuple[Holding, list[asyncio.Task[None]], float]:
    """``n`` streams opened, ``--ramp`` at a time; the seconds until all had opened."""
    h = Holding(n, asyncio.Semaphore(args.ramp))
    started = time.perf_counter()
    tasks = [asyncio.create_task(hold_one(client, args, h)) for _ in range(n)]
    await asyncio.wait_for(h.all_open.wait(), timeout=args.hold_timeout)
    return h, tasks, time.perf_counter() - started


async def end_all(
    client: aiohttp.ClientSession,
    args: argparse.Namespace,
    h: Holding,
    tasks: list[asyncio.Task[None]],
) -> None:
    await cancel_all(client, args, h)
    await asyncio.gather(*tasks)


async def hold(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``--concurrency`` streams, at most ``--ramp`` opening at a time, and keep them open
    while the server's RSS is read; then cancel their tasks and read each stream to its end.

    The streams' tasks must outlast the opening (a slow engine, many tokens): a stream that
    ended before the reading would not be counted in it."""
    n = args.concurrency
    async with session(args, args.hold_timeout) as client:
        # Warm the server's code paths, then measure its baseline.
        warm, tasks, _ = await open_all(client, args, 8)
        await end_all(client, args, warm, tasks)
        base = rss_kib(args.pid)
        h, tasks, open_s = await open_all(client, args, n)
        await asyncio.sleep(1.0)
        during = rss_kib(args.pid)
        still_open = n - h.ended_ok - sum(h.errors.values())
        await end_all(client, args, h, tasks)
    errors = {**{f"warm-up {k}": v for k, v in warm.errors.items()}, **h.errors}
    return {
        "mode": "hold",
        "streams": n,
        "ended_ok": h.ended_ok,
        "errors": errors,
        "rss_base_kib": base,
        "rss_open_kib": during,
        # Seconds until every stream had its headers, and how many were open when RSS was read.
        "open_s": round(open_s, 2),
        "open_at_reading": still_open,
        "kib_per_stream": (during - base) / n,
    }


def main() -> int:
    # Every stream is a socket: the soft limit of open files (often 1,024) up to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=[*MODES, "hold"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default="tell me a story about a quiet river")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--pid", type=int, help="the server's pid (hold mode)")
    parser.add_argument("--api-key", help="sent as a bearer token (litellm mode)")
    parser.add_argument(
        "--ramp", type=int, default=256, help="hold mode: streams opening at a time"
    )
    parser.add_argument(
        "--hold-timeout", type=float, default=300.0, help="hold mode: seconds for opening all"
    )
    args = parser.parse_args()
    result = uvloop.run(hold(args) if args.mode == "hold" else closed_loop(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
