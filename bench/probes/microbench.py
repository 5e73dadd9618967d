"""Micro benchmarks behind two choices recorded in bench/NOTES.md.

    .venv/bin/python -m bench.probes.microbench

1. A deadline moved at every item: a bare await, ``llorch.timers.Watchdog``, and
   ``asyncio.timeout`` + ``Timeout.reschedule`` (µs of wall time per item, one task).
2. A 64-token stream from the mock OpenAI engine through httpx's ``AsyncClient.stream``,
   through httpx's ``AsyncHTTPTransport`` directly, and through aiohttp's ``ClientSession``
   (what the adapter uses now), each read to its end on a kept-alive connection (µs of CPU per
   stream, client side).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench
from llorch.timers import Watchdog

ITEMS = 200_000
STREAMS = 300


async def _items() -> AsyncIterator[int]:
    for i in range(ITEMS):
        yield i


async def deadlines() -> None:
    loop = asyncio.get_running_loop()
    items = _items()
    started = time.perf_counter()
    while await anext(items, None) is not None:
        pass
    bare = time.perf_counter() - started

    items, dog = _items(), Watchdog()
    dog.move(loop.time() + 100)
    started = time.perf_counter()
    while await dog.wait(anext(items, None)) is not None:
        dog.move(loop.time() + 100)
    watchdog = time.perf_counter() - started
    dog.close()

    items = _items()
    started = time.perf_counter()
    async with asyncio.timeout(None) as timeout:
        while await anext(items, None) is not None:
            timeout.reschedule(loop.time() + 100)
    reschedule = time.perf_counter() - started
    per = {"bare": bare, "watchdog": watchdog, "reschedule": reschedule}
    print(json.dumps({f"{k}_us_per_item": round(v / ITEMS * 1e6, 2) for k, v in per.items()}))


async def streams(url: str) -> None:
    body = json.dumps(
        {"model": bench.ENGINE_MODEL, "prompt": "x", "max_tokens": 64, "stream": True}
    )
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url) as client:

        async def through_client() -> None:
            async with client.stream("POST", "/v1/completions", content=body, headers=headers) as r:
                async for _ in r.aiter_bytes():
                    pass

        client_us = await _cpu_per_call(through_client)
    transport = httpx.AsyncHTTPTransport()
    timeouts = {"timeout": {"connect": 2.0, "read": 30.0, "write": 30.0, "pool": 30.0}}

    async def through_transport() -> None:
        request = httpx.Request(
            "POST", f"{url}/v1/completions", content=body, headers=headers, extensions=timeouts
        )
        response = await transport.handle_async_request(request)
        try:
            async for _ in response.stream:  # type: ignore[union-attr]
                pass
        finally:
            await response.aclose()

    transport_us = await _cpu_per_call(through_transport)
    await transport.aclose()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def through_aiohttp() -> None:
            async with session.post(
                f"{url}/v1/completions", data=body.encode(), headers=headers
            ) as response:
                while await response.content.readany():
                    pass

        aiohttp_us = await _cpu_per_call(through_aiohttp)
    print(
        json.dumps(
            {
                "httpx_async_client_us_per_stream": client_us,
                "httpx_transport_us_per_stream": transport_us,
                "aiohttp_session_us_per_stream": aiohttp_us,
            }
        )
    )


async def _cpu_per_call(call: object) -> float:
    assert callable(call)
    for _ in range(30):  # warm up, connections open
        await call()
    started = time.process_time()
    for _ in range(STREAMS):
        await call()
    return round((time.process_time() - started) / STREAMS * 1e6)


def main() -> int:
    uvloop.run(deadlines())
    with (
        tempfile.TemporaryDirectory(prefix="llorch-microbench-") as name,
        bench.engine(Path(name), ttft_ms=0, tokens_per_s=0) as url,
    ):
        uvloop.run(streams(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
