"""What the sync and async clients share: answers to results or typed errors, and the policy of
waiting on 429 / 503."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import RetryCallState

from llorch.client.errors import ApiError, ClientError, ProtocolError, TransportError, api_error
from llorch.client.operations import Operation

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8080"
# Waiting on 429/503 without advice from the server.
DEFAULT_RETRY_AFTER_S = 1.0
# Pause before reconnecting a stream that broke (times the number of attempts).
RECONNECT_PAUSE_S = 0.2

WaitHook = Callable[[ApiError, float], None]


@dataclass(frozen=True)
class Options:
    """How a client talks to the server.

    ``wait_s`` > 0 waits on retriable 429 / 503 answers for at most that long in total, each
    time as long as ``Retry-After`` advises; ``reconnects`` is how many times in a row a broken
    stream is resumed with ``Last-Event-ID`` before giving up.
    """

    base_url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = 30.0
    stream_read_timeout_s: float = 120.0
    wait_s: float = 0.0
    reconnects: int = 5
    on_wait: WaitHook | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "llorch-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request_kwargs(self, op: Operation[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": dict(op.params), "headers": dict(op.headers)}
        if op.content is not None:
            kwargs["content"] = op.content
        elif op.json is not None:
            kwargs["json"] = op.json
        return kwargs


def result(op: Operation[T], response: httpx.Response) -> T:
    """The operation's result, or the typed error of the answer."""
    if response.status_code in op.ok:
        try:
            return op.parse(response)
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(
                f"{op.operation_id}: {response.status_code} answer does not parse: {exc}"
            ) from exc
    raise error_of(response)


def error_of(response: httpx.Response) -> ClientError:
    try:
        envelope = response.json()
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict) or "code" not in envelope:
        return ProtocolError(
            f"HTTP {response.status_code} without an error envelope: {response.text[:200]!r}"
        )
    return api_error(response.status_code, envelope, response.headers)


def transport_error(exc: httpx.TransportError, base_url: str) -> TransportError:
    return TransportError(f"cannot reach {base_url}: {str(exc) or type(exc).__name__}")


def should_wait(exc: BaseException) -> bool:
    """Only answers a retry can cure: 429 queue full / rate limited, 503 unavailable."""
    return isinstance(exc, ApiError) and exc.status in (429, 503) and exc.retriable


def advised_wait(options: Options) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        seconds = DEFAULT_RETRY_AFTER_S
        if isinstance(exc, ApiError):
            seconds = exc.retry_after_s or DEFAULT_RETRY_AFTER_S
            if options.on_wait is not None:
                options.on_wait(exc, seconds)
        return seconds

    return wait


def stream_headers(last_event_id: int | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def broken_stream(task_id: str, attempts: int, last: int | None) -> TransportError:
    after = f" after frame {last}" if last is not None else ""
    return TransportError(
        f"the stream of task {task_id} broke{after} and {attempts} reconnect(s) failed"
    )
