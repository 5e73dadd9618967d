"""Server-Sent Events framing of a task's event stream, and the response that writes it.

The task's events live once, in its :class:`EventStream`; a subscriber only holds its position.
What one client can make the server hold is therefore the transport's buffer, which uvicorn
bounds by pausing writes. A client that stops reading leaves its write blocked: when the task
publishes more than ``max_lag_events`` events meanwhile, or the write stays blocked for
``write_timeout_s``, the client is disconnected (logged and counted) and the task runs on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llorch.metrics import Metrics
from llorch.scheduler.events import Event, EventStream

HEARTBEAT = b": heartbeat\n\n"

log = logging.getLogger("llorch.streams")


def encode(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.seq,
        event.kind.encode(),
        orjson.dumps(event.data),
    )


async def frames(
    stream: EventStream, *, after: int | None, heartbeat_s: float, metrics: Metrics
) -> AsyncGenerator[bytes, None]:
    """The stream's SSE bytes: every event published since the last read, framed at once."""
    metrics.inc("llorch_open_streams")
    try:
        async for batch in stream.batches(after=after, heartbeat_s=heartbeat_s):
            if batch is None:
                yield HEARTBEAT
            elif len(batch) == 1:
                yield encode(batch[0])
            else:
                yield b"".join([encode(event) for event in batch])
    finally:
        metrics.dec("llorch_open_streams")


class SlowClient(Exception):
    """The client fell too far behind its stream."""


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` of one task, written under the slow-client rules above.

    ``on_disconnect`` runs when the client goes away first (``server.cancel_on_disconnect``).
    """

    def __init__(
        self,
        stream: EventStream,
        *,
        task_id: str,
        after: int | None,
        heartbeat_s: float,
        max_lag_events: int,
        write_timeout_s: float,
        metrics: Metrics,
        headers: Mapping[str, str],
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        body = frames(stream, after=after, heartbeat_s=heartbeat_s, metrics=metrics)
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._frames = body
        self._stream = stream
        self._task_id = task_id
        self._max_lag = max_lag_events
        self._write_timeout_s = write_timeout_s
        self._metrics = metrics
        self._on_disconnect = on_disconnect
        self._writing_since: float | None = None
        self._stuck_at = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        pump = asyncio.ensure_future(self._pump(send))
        listen = asyncio.ensure_future(_until_disconnect(receive))
        guard = asyncio.ensure_future(self._guard())
        try:
            await asyncio.wait({pump, listen, guard}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, listen, guard):
                task.cancel()
            await asyncio.gather(pump, listen, guard, return_exceptions=True)
            await self._frames.aclose()
        for task in (pump, guard):
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is None:
                continue
            if not isinstance(error, SlowClient):
                raise error
            self._metrics.inc("llorch_sse_clients_dropped_total")
            log.warning(
                "slow SSE client disconnected: %s",
                error,
                extra={"event": "sse_client_dropped", "task_id": self._task_id},
            )
            # Returning without the last body message makes the server close the connection.
            return
        if listen.done() and not listen.cancelled() and self._on_disconnect is not None:
            log.info(
                "SSE client disconnected: canceling its task",
                extra={"event": "sse_disconnect_cancel", "task_id": self._task_id},
            )
            self._on_disconnect()

    async def _pump(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        async for chunk in self._frames:
            # What the guard reads: when the write began, and how far the stream was then.
            self._stuck_at = self._stream.next_seq
            self._writing_since = loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._writing_since = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _guard(self) -> None:
        """Raise :class:`SlowClient` when one write stays blocked past the slow-client rules.

        It runs beside the pump and wakes only when the stream has moved ``max_lag_events`` on,
        or a write may have been blocked for ``write_timeout_s``: a write costs the pump two
        attribute stores, not a task and a timer.
        """
        loop = asyncio.get_running_loop()
        while True:
            since = self._writing_since
            if since is None:
                target, wake_at = self._stream.next_seq + self._max_lag, loop.time()
            else:
                target, wake_at = self._stuck_at + self._max_lag, since
            wake_at += self._write_timeout_s
            try:
                async with asyncio.timeout_at(wake_at):
                    if self._stream.closed:
                        await asyncio.Event().wait()  # only the timeout ends this wait
                    await self._stream.wait_for_seq(target)
            except TimeoutError:
                pass
            since = self._writing_since
            if since is None:
                continue
            if self._stream.next_seq > self._stuck_at + self._max_lag:
                raise SlowClient(
                    f"task {self._task_id} published {self._max_lag} events while the "
                    "client accepted none"
                )
            if loop.time() - since >= self._write_timeout_s:
                raise SlowClient(f"the client accepted nothing for {self._write_timeout_s:g} s")


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
