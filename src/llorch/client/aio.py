"""The asyncio client: the same operations and errors as :class:`llorch.client.Client`.

>>> async with AsyncClient.from_url("http://127.0.0.1:8080") as client:  # doctest: +SKIP
...     accepted = await client.create_task(model="mock-small", prompt="Hi", max_tokens=8)
...     async for event in client.events(accepted.task_id):
...         print(event.event, event.data)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from llorch.client import operations as ops
from llorch.client.base import (
    RECONNECT_PAUSE_S,
    Options,
    advised_wait,
    broken_stream,
    error_of,
    result,
    should_wait,
    stream_headers,
    transport_error,
)
from llorch.client.operations import Operation
from llorch.client.sse import Event, SseParser

P = ParamSpec("P")
T = TypeVar("T")


def _bind(
    builder: Callable[P, Operation[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.call(builder(*args, **kwargs))

    method.__name__ = builder.__name__
    method.__doc__ = f"``{builder.__name__}``: see :mod:`llorch.client.operations`."
    return method


class AsyncClient:
    """Both planes over one ``httpx.AsyncClient``."""

    def __init__(
        self,
        options: Options | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.options = options or Options()
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.options.base_url,
            headers=self.options.headers(),
            timeout=self.options.timeout_s,
            transport=transport,
        )

    @classmethod
    def from_url(cls, base_url: str, api_key: str | None = None, **options: Any) -> AsyncClient:
        return cls(Options(base_url=base_url, api_key=api_key, **options))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, op: Operation[T]) -> T:
        """Send one operation; wait on 429/503 as the options say."""
        if self.options.wait_s <= 0:
            return await self._once(op)
        retrying = AsyncRetrying(
            retry=retry_if_exception(should_wait),
            wait=advised_wait(self.options),
            stop=stop_after_delay(self.options.wait_s),
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(op)
        raise AssertionError("tenacity returned without an outcome")  # pragma: no cover

    async def _once(self, op: Operation[T]) -> T:
        try:
            response = await self._http.request(
                op.method, op.path, **self.options.request_kwargs(op)
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, self.options.base_url) from exc
        return result(op, response)

    async def events(
        self, task_id: str, *, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        """The task's events up to its terminal frame, resuming broken streams (see ``Client``)."""
        last = last_event_id
        failures = 0
        timeout = httpx.Timeout(self.options.timeout_s, read=self.options.stream_read_timeout_s)
        while True:
            try:
                async with self._http.stream(
                    "GET", ops.stream_path(task_id), headers=stream_headers(last), timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise error_of(response)
                    parser = SseParser()
                    lines = response.aiter_lines()
                    done = False
                    while not done:
                        line = await anext(lines, None)
                        if line is None:
                            line, done = "", True
                        for event in parser.feed(line):
                            last, failures = event.id, 0
                            yield event
                            if event.terminal:
                                return
            except httpx.TransportError:
                pass
            failures += 1
            if failures > self.options.reconnects:
                raise broken_stream(task_id, failures - 1, last)
            await self._sleep(RECONNECT_PAUSE_S * failures)

    create_task = _bind(ops.create_task)
    list_tasks = _bind(ops.list_tasks)
    get_task = _bind(ops.get_task)
    cancel_task = _bind(ops.cancel_task)
    create_session = _bind(ops.create_session)
    get_session = _bind(ops.get_session)
    delete_session = _bind(ops.delete_session)
    get_capabilities = _bind(ops.get_capabilities)
    create_artifact = _bind(ops.create_artifact)
    list_artifacts = _bind(ops.list_artifacts)
    get_artifact = _bind(ops.get_artifact)
    list_pools = _bind(ops.list_pools)
    get_pool_health = _bind(ops.get_pool_health)
    drain_pool = _bind(ops.drain_pool)
    resume_pool = _bind(ops.resume_pool)
    reload_pool = _bind(ops.reload_pool)
    livez = _bind(ops.livez)
    readyz = _bind(ops.readyz)
    get_metrics = _bind(ops.get_metrics)
