"""Server-Sent Events framing of a task's event stream, and the response that writes it.

The task's events live once, in its :class:`EventStream`; a subscriber only holds its position.
What one client can make the server hold is therefore the transport's buffer, which uvicorn
bounds by pausing writes. A client that stops reading leaves its write blocked: when the task
publishes more than ``max_lag_events`` events meanwhile, or the write stays blocked for
``write_timeout_s``, the client is disconnected (logged and counted) and the task runs on. The
rules live in one :class:`SlowClientGuard` per open response, so the OpenAI facade's chunk stream
keeps them too; one :class:`WriteWatch` task checks every open response's write, and a write
costs its pump a clock read and two attribute stores.
"""

from __future__ import annotations

import asyncio
import logging
import time
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


class SlowClientGuard:
    """The slow-client rules for one open response of one task's stream, whatever its framing
    (the task API's SSE, the OpenAI facade's chunks).

    The response writes every body message through :meth:`send`; :meth:`start` registers the
    pump that writes with the :class:`WriteWatch`, which calls :meth:`check` and cancels the
    pump when the client falls behind. The response then sees :attr:`slow` set, calls
    :meth:`report` and returns without its last body message, so the server closes the
    connection; the task is not touched.
    """

    def __init__(
        self,
        stream: EventStream,
        *,
        task_id: str,
        max_lag_events: int,
        write_timeout_s: float,
        metrics: Metrics,
        watch: WriteWatch,
        framing: str = "sse",
    ) -> None:
        self._stream = stream
        self._task_id = task_id
        self._max_lag = max_lag_events
        self._write_timeout_s = write_timeout_s
        self._metrics = metrics
        self._watch = watch
        self._framing = framing
        self._writing_since: float | None = None
        self._stuck_at = 0
        self._pump: asyncio.Future[None] | None = None
        # The WriteWatch's clock: the running loop's, taken in start().
        self._now: Callable[[], float] = time.monotonic
        self.slow: SlowClient | None = None

    def start(self, pump: asyncio.Future[None]) -> None:
        self._pump = pump
        self._now = asyncio.get_running_loop().time
        self._watch.add(self)

    def stop(self) -> None:
        self._watch.discard(self)

    async def send(self, send: Send, body: bytes) -> None:
        # What the check reads: when the write began, and how far the stream was then.
        self._stuck_at = self._stream.next_seq
        self._writing_since = self._now()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self._writing_since = None

    def check(self, now: float) -> None:
        """Applied by the :class:`WriteWatch`: end a write blocked past the rules."""
        since = self._writing_since
        if since is None or self.slow is not None or self._pump is None:
            return
        if self._stream.next_seq > self._stuck_at + self._max_lag:
            self.slow = SlowClient(
                f"task {self._task_id} published {self._max_lag} events while the "
                "client accepted none"
            )
        elif now - since >= self._write_timeout_s:
            self.slow = SlowClient(f"the client accepted nothing for {self._write_timeout_s:g} s")
        else:
            return
        self._pump.cancel()

    def report(self) -> None:
        self._metrics.inc("llorch_sse_clients_dropped_total")
        log.warning(
            "slow SSE client disconnected: %s",
            self.slow,
            extra={
                "event": "sse_client_dropped",
                "task_id": self._task_id,
                "framing": self._framing,
            },
        )


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` of one task, written under the slow-client rules (``guard``).

    ``on_disconnect`` runs when the client goes away first (``server.cancel_on_disconnect``).
    """

    def __init__(
        self,
        stream: EventStream,
        *,
        task_id: str,
        after: int | None,
        heartbeat_s: float,
        metrics: Metrics,
        guard: SlowClientGuard,
        headers: Mapping[str, str],
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        body = frames(stream, after=after, heartbeat_s=heartbeat_s, metrics=metrics)
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._frames = body
        self._task_id = task_id
        self._on_disconnect = on_disconnect
        self._guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._send_head(send)
        # The frames are written from this task (one task less an open stream holds); the
        # client going away, or the slow-client rules, cancel it, and only those cancels are
        # taken back here.
        pump = asyncio.current_task()
        assert pump is not None
        cancels_before = pump.cancelling()
        pumping = True

        def stop(_listen: asyncio.Future[None]) -> None:
            if pumping:
                pump.cancel()

        listen = asyncio.ensure_future(_until_disconnect(receive))
        listen.add_done_callback(stop)
        self._guard.start(pump)
        try:
            await self._pump(send)
        except asyncio.CancelledError:
            if self._guard.slow is None and not listen.done():
                raise  # not ours (the server's)
            while pump.cancelling() > cancels_before:
                pump.uncancel()
        finally:
            pumping = False
            self._guard.stop()
            listen.cancel()
            await asyncio.gather(listen, return_exceptions=True)
            await self._frames.aclose()
        if self._guard.slow is not None:
            self._guard.report()
            # Returning without the last body message makes the server close the connection.
            return
        if listen.done() and not listen.cancelled() and self._on_disconnect is not None:
            log.info(
                "SSE client disconnected: canceling its task",
                extra={"event": "sse_disconnect_cancel", "task_id": self._task_id},
            )
            self._on_disconnect()

    async def _send_head(self, send: Send) -> None:
        """The response's start, in a frame of its own: the header list (~850 bytes in 17
        blocks) is sent once and not kept for as long as the stream is open."""
        headers, self.raw_headers = self.raw_headers, []
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})

    async def _pump(self, send: Send) -> None:
        async for chunk in self._frames:
            await self._guard.send(send, chunk)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class WriteWatch:
    """One task for every open SSE response: it applies the slow-client rules to blocked writes.

    It looks ``interval_s`` apart while any response is open, and sleeps while none is. A
    response per task before this cost each open stream a task and a timer (memory per stream).
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self._interval_s = interval_s
        self._open: set[SlowClientGuard] = set()
        self._someone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, response: SlowClientGuard) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sse-watch")
        self._open.add(response)
        self._someone.set()

    def discard(self, response: SlowClientGuard) -> None:
        self._open.discard(response)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._open:
                self._someone.clear()
                await self._someone.wait()
            await asyncio.sleep(self._interval_s)
            now = loop.time()
            for response in list(self._open):
                response.check(now)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
