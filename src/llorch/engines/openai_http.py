"""The OpenAI-compatible streaming adapter: llama.cpp server, vLLM, TGI, or any such engine.

A prompt streams from ``POST /v1/completions``, messages from ``POST /v1/chat/completions``,
both with ``"stream": true``. The wire format is Server-Sent Events: ``data: {json}`` chunks
ending with ``data: [DONE]``; comment lines (``:`` keep-alives), ``event:`` and ``id:`` lines are
ignored. A stream that ends without ``[DONE]`` is an error, whatever it carried before.

Usage is the engine's own (asked for with ``stream_options.include_usage``); an engine that sends
none gets its streamed chunks counted, and the :class:`Finish` says ``usage_reported=False``.

Every failure is translated here, once, into the :class:`llorch.errors.EngineError` tree, with
the httpx exception kept as the cause. Before the first token: ``EngineUnavailable`` (cannot
connect), ``EngineTimeout`` (no first token in time), ``EngineStatusError`` / ``EngineRejected``
(an error status), ``EngineProtocolError`` (not a stream, a malformed chunk, no ``[DONE]``).
After the first token every failure is a ``WorkerReset``, or a ``DecodeTimeout`` when the
engine went silent: the caller has relayed tokens and must not retry.

Closing the generator (or cancelling the task that iterates it) leaves the ``client.stream``
block, which closes the HTTP connection at once: the engine sees the disconnect and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from llorch.config import EngineKind, PoolSettings
from llorch.engines.base import Chunk, CompletionRequest, Finish, Token
from llorch.errors import (
    DecodeTimeout,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineStatusError,
    EngineTimeout,
    EngineUnavailable,
    WorkerReset,
)
from llorch.timers import Watchdog

_FINISH_REASONS: dict[str, Literal["stop", "length"]] = {"length": "length"}
_ERROR_BODY_CHARS = 300
_AFTER_DONE_S = 0.5  # how long the end of a response may follow its [DONE]
_STREAMS_PER_POOL = 8  # kept-alive connections per httpx client (see OpenAIHttpEngine.__init__)


@dataclass
class _Progress:
    tokens: int = 0
    usage: tuple[int, int] | None = None
    finish_reason: str | None = None


class OpenAIHttpEngine:
    """One replica: an OpenAI-compatible server at ``base_url`` (without ``/v1``)."""

    def __init__(
        self,
        replica_id: str,
        base_url: str,
        *,
        kind: EngineKind,
        model: str,
        slots: int,
        discover_slots: bool = True,
        api_key: str | None = None,
        connect_timeout_s: float = 2.0,
        first_token_timeout_s: float = 30.0,
        idle_timeout_s: float = 30.0,
        total_timeout_s: float = 600.0,
        extra_body: Mapping[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.engine: str = kind
        self.version = "unknown"
        self.context_size: int | None = None
        self.base_url = base_url
        self._model = model
        self._slots = slots
        self._discover_slots = discover_slots
        self._reported_slots: int | None = None
        self._connect_s = connect_timeout_s
        self._first_token_s = first_token_timeout_s
        self._idle_s = idle_timeout_s
        self._total_s = total_timeout_s
        self._extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Streams go through several small connection pools, not one: httpcore's pool scans
        # all its connections for every idle one when it assigns a request (quadratic), and
        # with 64 kept-alive connections that scan took a quarter of the relay's CPU at c=64.
        self._clients = [
            httpx.AsyncClient(
                base_url=base_url,
                headers=headers,
                transport=transport,
                # The read timeout backs up the idle limit enforced per chunk below.
                timeout=httpx.Timeout(idle_timeout_s, connect=connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=None, max_keepalive_connections=_STREAMS_PER_POOL
                ),
            )
            for _ in range(1 if transport is not None else max(1, -(-slots // _STREAMS_PER_POOL)))
        ]
        self._client = self._clients[0]  # health probes and descriptions
        self._turn = itertools.cycle(self._clients)

    @classmethod
    def for_pool(
        cls,
        replica_id: str,
        base_url: str,
        pool: PoolSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> OpenAIHttpEngine:
        return cls(
            replica_id,
            base_url,
            kind=pool.engine,
            model=pool.served_model or pool.model,
            slots=pool.slots_per_replica,
            discover_slots=pool.discover_slots,
            api_key=pool.api_key,
            connect_timeout_s=pool.timeouts.connect_ms / 1000,
            first_token_timeout_s=pool.timeouts.first_token_ms / 1000,
            idle_timeout_s=pool.decode_timeout_ms / 1000,
            total_timeout_s=pool.timeouts.total_ms / 1000,
            extra_body=pool.extra_body,
            transport=transport,
        )

    @property
    def slots(self) -> int:
        if self._discover_slots and self._reported_slots:
            return self._reported_slots
        return self._slots

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    # -- streaming --------------------------------------------------------------------------

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        chat = request.messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {"X-Correlation-Id": request.correlation_id} if request.correlation_id else {}
        progress = _Progress()
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        total_at = started_at + self._total_s
        # The first-token, idle and total limits, on one watchdog (no timer operation per chunk).
        dog = Watchdog()
        first_at = started_at + self._first_token_s
        if first_at < total_at:
            dog.move(first_at, "the time-to-first-token limit")
        else:
            dog.move(total_at, "the total time limit")
        try:
            async with next(self._turn).stream(
                "POST", path, json=self._body(request), headers=headers
            ) as response:
                await self._check(response)
                # Bytes, split into lines here: one pass per network read, whatever it holds.
                reads = response.aiter_bytes()
                pending = b""
                data: list[bytes] = []
                while True:
                    try:
                        read = await dog.wait(anext(reads, None))
                    except TimeoutError as exc:
                        message = f"{self._where} exceeded {dog.reason}"
                        if progress.tokens:
                            raise DecodeTimeout(message, engine=self.engine) from exc
                        raise EngineTimeout(message, engine=self.engine) from exc
                    if read is None:
                        raise EngineProtocolError(
                            f"{self._where} ended the stream without [DONE]", engine=self.engine
                        )
                    lines = (pending + read).split(b"\n")
                    pending = lines.pop()
                    texts: list[str] = []
                    payloads = 0
                    done = False
                    for line in lines:
                        if line.endswith(b"\r"):
                            line = line[:-1]
                        if line:
                            # ":" starts a comment (a keep-alive); event: and id: are ignored.
                            if line.startswith(b"data:"):
                                data.append(line[6:] if line[5:6] == b" " else line[5:])
                            elif line == b"data":
                                data.append(b"")
                            continue
                        if not data:
                            continue
                        payload = data[0] if len(data) == 1 else b"\n".join(data)
                        data = []
                        payloads += 1
                        if payload == b"[DONE]":
                            done = True
                            break
                        texts += self._parse(payload, chat, progress)
                    if payloads and (progress.tokens or texts):
                        # The idle limit runs from the last chunk, once a token has come.
                        idle_at = loop.time() + self._idle_s
                        if idle_at < total_at:
                            dog.move(idle_at, "the idle limit between chunks")
                        else:
                            dog.move(total_at, "the total time limit")
                    for text in texts:
                        progress.tokens += 1
                        yield Token(text)
                    if done:
                        break
                await self._read_to_end(reads, dog)
            yield self._finish(request, progress)
        except httpx.HTTPError as exc:
            raise self._translate(exc, progress) from exc
        except EngineError as exc:
            if progress.tokens and not isinstance(exc, (WorkerReset, DecodeTimeout)):
                raise WorkerReset(
                    f"{self._where} failed after {progress.tokens} tokens: {exc.message}",
                    engine=self.engine,
                ) from exc
            raise
        finally:
            dog.close()

    def _body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self._extra_body,
            "model": self._model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
        if request.seed is not None:
            body["seed"] = request.seed
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if status != 200:
            text = (await response.aread()).decode("utf-8", "replace")[:_ERROR_BODY_CHARS]
            message = f"{self._where} answered {status}: {text}"
            if status == 429 or status >= 500:
                retry_after = response.headers.get("retry-after", "")
                retry_ms = int(retry_after) * 1000 if retry_after.isdigit() else None
                raise EngineStatusError(
                    message, status=status, engine=self.engine, retry_after_ms=retry_ms
                )
            raise EngineRejected(message, status=status, engine=self.engine)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise EngineProtocolError(
                f"{self._where} answered {content_type or 'no content type'}, not an event stream",
                engine=self.engine,
            )

    async def _read_to_end(self, reads: AsyncIterator[bytes], dog: Watchdog) -> None:
        """After ``[DONE]``: read the rest of the response (the chunked encoding's last chunk).

        A response closed before its end cannot go back to the connection pool: every stream
        would open a new connection. What comes after ``[DONE]`` is ignored; an engine that
        keeps the response open past ``_AFTER_DONE_S`` loses its connection instead.
        """
        dog.move(asyncio.get_running_loop().time() + _AFTER_DONE_S, "the end after [DONE]")
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            while await dog.wait(anext(reads, None)) is not None:
                pass

    def _parse(self, payload: bytes, chat: bool, progress: _Progress) -> list[str]:
        """The texts of one chunk; usage and finish reason are noted in ``progress``."""
        try:
            chunk = orjson.loads(payload)
        except ValueError as exc:
            raise self._malformed(payload) from exc
        if not isinstance(chunk, dict):
            raise self._malformed(payload)
        if "error" in chunk:
            error = chunk["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
            raise EngineError(f"{self._where} reported: {detail}", engine=self.engine)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            try:
                progress.usage = (int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise self._malformed(payload) from exc
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise self._malformed(payload)
        texts = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._malformed(payload)
            delta = choice.get("delta") or {}
            text = delta.get("content") if chat and isinstance(delta, dict) else choice.get("text")
            if text is not None and not isinstance(text, str):
                raise self._malformed(payload)
            if text:
                texts.append(text)
            if choice.get("finish_reason"):
                progress.finish_reason = str(choice["finish_reason"])
        return texts

    def _finish(self, request: CompletionRequest, progress: _Progress) -> Finish:
        if progress.usage is not None:
            tokens_in, tokens_out = progress.usage
            reported = True
        else:
            # The engine sent no usage: count what it streamed, estimate the prompt.
            text = request.prompt or "".join(m.content for m in request.messages or ())
            tokens_in, tokens_out = max(1, math.ceil(len(text) / 4)), progress.tokens
            reported = False
        reason = _FINISH_REASONS.get(progress.finish_reason or "", "stop")
        if progress.finish_reason is None and tokens_out >= request.max_tokens:
            reason = "length"
        return Finish(reason, tokens_in, tokens_out, usage_reported=reported)

    def _malformed(self, payload: bytes) -> EngineProtocolError:
        text = payload[:80].decode("utf-8", "replace")
        return EngineProtocolError(
            f"{self._where} sent a malformed chunk: {text!r}", engine=self.engine
        )

    def _translate(self, exc: httpx.HTTPError, progress: _Progress) -> EngineError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return EngineUnavailable(f"cannot reach {self._where}: {detail}", engine=self.engine)
        if isinstance(exc, httpx.TimeoutException):
            if progress.tokens:
                return DecodeTimeout(f"{self._where} went silent: {detail}", engine=self.engine)
            return EngineTimeout(f"{self._where} timed out: {detail}", engine=self.engine)
        if progress.tokens:
            return WorkerReset(
                f"{self._where} dropped the stream after {progress.tokens} tokens: {detail}",
                engine=self.engine,
            )
        if isinstance(exc, httpx.TransportError):
            return EngineUnavailable(
                f"{self._where} closed the connection: {detail}", engine=self.engine
            )
        return EngineError(f"{self._where} failed: {detail}", engine=self.engine)

    @property
    def _where(self) -> str:
        return f"{self.engine} replica {self.replica_id} at {self.base_url}"

    # -- health -----------------------------------------------------------------------------

    async def health(self) -> bool:
        """``/health`` (``/v1/models`` when there is none) answers 200; then what the engine
        says about itself: llama.cpp ``/props`` (or ``/slots``), vLLM ``/v1/models`` and
        ``/version``, TGI ``/info``. Those are read where present and never fail the probe."""
        try:
            response = await self._client.get("/health", timeout=self._connect_s)
            if response.status_code == 404:
                response = await self._client.get("/v1/models", timeout=self._connect_s)
            if response.status_code != 200:
                # llama.cpp answers 503 while its model loads: not ready yet, and it says so.
                raise EngineUnavailable(
                    f"{self._where} answered {response.status_code} to its health probe",
                    engine=self.engine,
                )
            await self._describe()
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                f"{self._where} did not answer its health probe: {type(exc).__name__}",
                engine=self.engine,
            ) from exc
        return True

    async def _describe(self) -> None:
        if self.engine == "llamacpp":
            props = await self._get_json("/props")
            if isinstance(props, dict):
                self._reported_slots = _positive(props.get("total_slots"))
                settings = props.get("default_generation_settings")
                if isinstance(settings, dict):
                    self.context_size = _positive(settings.get("n_ctx"))
                if isinstance(props.get("build_info"), str):
                    self.version = props["build_info"]
            else:
                slots = await self._get_json("/slots")
                if isinstance(slots, list) and slots:
                    self._reported_slots = len(slots)
        elif self.engine == "vllm":
            models = await self._get_json("/v1/models")
            if isinstance(models, dict) and isinstance(models.get("data"), list):
                for entry in models["data"]:
                    if isinstance(entry, dict) and entry.get("id") == self._model:
                        self.context_size = _positive(entry.get("max_model_len"))
            version = await self._get_json("/version")
            if isinstance(version, dict) and isinstance(version.get("version"), str):
                self.version = version["version"]
        elif self.engine == "tgi":
            info = await self._get_json("/info")
            if isinstance(info, dict):
                self.context_size = _positive(info.get("max_total_tokens"))
                if isinstance(info.get("version"), str):
                    self.version = info["version"]

    async def _get_json(self, path: str) -> Any:
        response = await self._client.get(path, timeout=self._connect_s)
        if response.status_code != 200:
            return None
        try:
            return response.json()
        except ValueError:
            return None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
