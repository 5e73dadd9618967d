"""CPU per token of the pieces of the relay's token path, in process, without sockets.

    PYTHONPATH=<tree>/src:. .venv/bin/python -m bench.probes.token_path

µs of CPU per token (``process_time``, the best of 7 rounds of 100 streams of 256 tokens), for:

- ``parse``: an engine's SSE bytes (reads of 1,400 bytes) to ``Token`` objects: the OpenAI
  adapter's reader and chunk parser;
- ``step_each`` and ``step_per_read``: the relay's loop (``Watchdog.wait`` on the next item of
  an async generator, a ``token`` event published, the idle limit moved) with a step per token,
  and with one step per read of 6 tokens (what the adapter yields since issue 18);
- ``publish``: ``EventStream.publish`` of a token event;
- ``encode``: ``sse.encode`` of a token event.

The pieces are what a token costs besides the sockets, aiohttp's HTTP parsing and the loop's
wake-ups, which ``relay_cost.py`` measures with them; these move far less between runs on a
shared machine, so two trees compare here (run it with each tree's ``src``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llorch.api.sse import encode
from llorch.engines import openai_http
from llorch.engines.base import Token
from llorch.scheduler.events import EventStream
from llorch.timers import Watchdog

STREAMS = 100
TOKENS = 256
PER_READ = 6


def _best(run: Callable[[], object]) -> float:
    """µs of CPU per token of ``run`` (STREAMS streams of TOKENS tokens), the best of 7."""
    rounds = []
    for _ in range(7):
        started = time.process_time()
        run()
        rounds.append(time.process_time() - started)
    return round(1e6 * min(rounds) / STREAMS / TOKENS, 3)


def _engine_bytes() -> list[bytes]:
    def chunk(text: str) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": None}
        body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
        return b"data: " + orjson.dumps({**body, "choices": [choice]}) + b"\n\n"

    stream = b"".join(chunk(f" word{i % 7}") for i in range(TOKENS))
    return [stream[i : i + 1400] for i in range(0, len(stream), 1400)]


def parse() -> float:
    engine = openai_http.OpenAIHttpEngine("r", "http://x", kind="openai", model="m", slots=1)
    reads = _engine_bytes()

    def run() -> None:
        for _ in range(STREAMS):
            reader, progress = openai_http._SseReader(), openai_http._Progress()
            for read in reads:
                for payload in reader.feed(read):
                    engine._parse(payload, False, progress)

    return _best(run)


async def _items(batches: list[list[Token]], each: bool) -> AsyncIterator[Token | list[Token]]:
    for batch in batches:
        if each:
            for token in batch:
                yield token
        else:
            yield batch


async def steps() -> dict[str, float]:
    loop = asyncio.get_running_loop()
    tokens = [Token(f" w{i}") for i in range(TOKENS)]
    batches = [tokens[i : i + PER_READ] for i in range(0, TOKENS, PER_READ)]
    out = {}
    for name, each in (("step_each", True), ("step_per_read", False)):
        rounds = []
        for _ in range(7):
            started = time.process_time()
            for _ in range(STREAMS):
                events, dog, items = EventStream(), Watchdog(), _items(batches, each)
                dog.move(loop.time() + 100)
                while (item := await dog.wait(anext(items, None))) is not None:
                    now = loop.time()
                    for token in item if isinstance(item, list) else (item,):
                        events.publish("token", {"t": token.text, "i": events.next_seq})
                    dog.move(now + 100)
                dog.close()
            rounds.append(time.process_time() - started)
        out[name] = round(1e6 * min(rounds) / STREAMS / TOKENS, 3)
    return out


def publish_and_encode() -> dict[str, float]:
    def publish() -> None:
        for _ in range(STREAMS):
            events = EventStream()
            for i in range(TOKENS):
                events.publish("token", {"t": " word", "i": i})

    events = EventStream()
    for i in range(TOKENS):
        events.publish("token", {"t": " word", "i": i})

    def frames() -> None:
        for _ in range(STREAMS):
            b"".join([encode(event) for event in events.events])

    return {"publish": _best(publish), "encode": _best(frames)}


async def measure() -> dict[str, float]:
    return {"parse": parse(), **(await steps()), **publish_and_encode()}


def main() -> int:
    print(json.dumps({f"{k}_us_per_token": v for k, v in uvloop.run(measure()).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
