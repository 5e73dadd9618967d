"""Server-Sent Events framing of a task's event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from llorch.metrics import Metrics
from llorch.scheduler.events import Event, EventStream

HEARTBEAT = b": heartbeat\n\n"


def encode(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.seq,
        event.kind.encode(),
        orjson.dumps(event.data),
    )


async def frames(
    stream: EventStream, *, after: int | None, heartbeat_s: float, metrics: Metrics
) -> AsyncIterator[bytes]:
    metrics.inc("llorch_open_streams")
    try:
        async for event in stream.subscribe(after=after, heartbeat_s=heartbeat_s):
            yield HEARTBEAT if event is None else encode(event)
    finally:
        metrics.dec("llorch_open_streams")
