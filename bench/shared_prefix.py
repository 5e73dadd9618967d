"""The ``shared_prefix`` profile: cache-aware placement against least-loaded-only placement.

Several long system prompts, many sessions (each task a new session with one of the system
prompts and its own question), two real llama.cpp replicas (xllamacpp's llama-server, the wider
random-weight model the engine tests use, two slots each). The same workload runs twice on
fresh servers: once with llorch's cache-aware placement (the default), once with the prefix map
off (``placement.prefix_map_bytes: 0``), where placement is least loaded with a random
tie-break. Reported: TTFT p50/p99 as a client sees it (from the ``POST`` to the first token
frame), the placement reasons, and the prompt tokens the engines evaluated by their own
``/metrics`` (``llamacpp:prompt_tokens_total``) against those they took from their caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from tests.engines.llamacpp import LlamaServer
from tests.engines.tiny_gguf import write_tiny_llama

MODEL = "tiny"
PROMPTS = 16  # system prompts: more than the replicas' slots
TASKS = 64  # sessions, one task each
CONCURRENCY = 2  # of the replicas' 2 x 2 slots: a warm replica usually has one free
MAX_TOKENS = 4
TOPICS = tuple(
    f"{area} {part}"
    for area in ("shipping", "billing", "returns", "warranty")
    for part in ("policy", "exceptions", "escalation", "tooling")
)

# (name, the pool's placement settings)
CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("cache_aware", {}),
    ("least_loaded", {"prefix_map_bytes": 0}),
)


def system_prompts(count: int) -> list[str]:
    """``count`` distinct system prompts of ~1,400 characters (about 1,000 tokens here)."""
    return [
        f"You are the {topic} desk of a small shop. Answer briefly, politely and exactly; "
        f"never promise what the {topic} policy does not say. " * 10
        for topic in TOPICS[:count]
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_task(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One task through llorch: its TTFT as a client sees it, its replica and placement."""
    started = time.perf_counter()
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    admitted = await client.post("/v1/tasks", json=body)
    if admitted.status_code != 202:
        return {"error": f"{admitted.status_code} {admitted.text[:80]}"}
    task_id = admitted.json()["task_id"]
    sample: dict[str, Any] = {"ttft_s": None}
    event = ""
    async with client.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "started":
                    data = orjson.loads(line[6:])
                    sample |= {"replica_id": data["replica_id"], "placement": data["placement"]}
                elif event == "token" and sample["ttft_s"] is None:
                    sample["ttft_s"] = time.perf_counter() - started
                elif event in ("end", "error"):
                    if event == "error":
                        sample["error"] = orjson.loads(line[6:])["code"]
                    break
    return sample


async def drive(url: str, prompts: list[str], seed: int) -> list[dict[str, Any]]:
    """``TASKS`` tasks, ``CONCURRENCY`` at a time, each with a system prompt drawn at random."""
    rng = random.Random(seed)
    plan = [
        [
            {"role": "system", "content": rng.choice(prompts)},
            {"role": "user", "content": f"Question {n}: what about order {rng.randint(1, 9999)}?"},
        ]
        for n in range(TASKS)
    ]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def gated(messages: list[dict[str, str]]) -> dict[str, Any]:
            async with gate:
                return await one_task(client, messages)

        return list(await asyncio.gather(*(gated(m) for m in plan)))


def engine_counts(url: str) -> dict[str, float]:
    """The llama.cpp server's own prompt-token counters."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total")
    pairs = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value, *_ in pairs if name in wanted}


def row_of(
    name: str, samples: list[dict[str, Any]], counts: list[dict[str, float]]
) -> dict[str, Any]:
    ttfts = [s["ttft_s"] * 1000 for s in samples if s.get("ttft_s") is not None]
    evaluated = sum(c.get("llamacpp:prompt_tokens_total", 0.0) for c in counts)
    cached = sum(c.get("llamacpp:prompt_tokens_cached_total", 0.0) for c in counts)
    return {
        "config": name,
        "tasks": len(samples),
        "errors": sum(1 for s in samples if "error" in s),
        "ttft_ms_mean": round(statistics.fmean(ttfts), 1) if ttfts else None,
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_p99": round(percentile(ttfts, 0.99), 1) if ttfts else None,
        "placements": dict(Counter(s.get("placement", "none") for s in samples)),
        "per_replica": dict(Counter(s.get("replica_id", "none") for s in samples)),
        "prompt_tokens_evaluated": int(evaluated),
        "prompt_tokens_cached": int(cached),
    }


@contextlib.contextmanager
def replicas(model: Path) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    """Two fresh llama.cpp servers (empty prompt caches), two slots of 2,048 tokens each."""
    with (
        LlamaServer(model, n_parallel=2, n_ctx=4096) as one,
        LlamaServer(model, n_parallel=2, n_ctx=4096) as two,
    ):
        yield one, two


def profile_shared_prefix(
    tmp: Path, llorch: Callable[[Path, list[dict[str, Any]]], Any]
) -> dict[str, Any]:
    """Each configuration of ``CONFIGS`` on fresh replicas with the same workload."""
    model = write_tiny_llama(tmp / "shared-prefix.gguf", width=512, layers=4, heads=8)
    prompts = system_prompts(PROMPTS)
    rows = []
    for name, placement in CONFIGS:
        with replicas(model) as (one, two):
            pool = {
                "id": "bench",
                "engine": "llamacpp",
                "model": MODEL,
                "endpoints": [one.url, two.url],
                "slots_per_replica": 2,
                "max_tokens_out": 64,
                "queue": {"capacity": 1000, "policy": "reject"},
                "placement": placement,
                "extra_body": {"ignore_eos": True},
            }
            with llorch(tmp, [pool]) as (url, _):
                samples = asyncio.run(drive(url, prompts, seed=19))
            row = row_of(name, samples, [engine_counts(one.url), engine_counts(two.url)])
        print(f"    {name:12} {orjson.dumps(row).decode()}", flush=True)
        rows.append(row)
    workload = {
        "system_prompts": PROMPTS,
        "system_prompt_chars": len(prompts[0]),
        "tasks": TASKS,
        "concurrency": CONCURRENCY,
        "max_tokens": MAX_TOKENS,
        "replicas": "2 llama.cpp servers x 2 slots, 1 thread each",
    }
    return {"workload": workload, "rows": rows}
