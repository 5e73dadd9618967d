"""The OpenAI-compatible streaming adapter: llama.cpp server, vLLM, TGI, or any such engine.

A prompt streams from ``POST /v1/completions``, messages from ``POST /v1/chat/completions``,
both with ``"stream": true``. The wire format is Server-Sent Events: ``data: {json}`` chunks
ending with ``data: [DONE]``; comment lines (``:`` keep-alives), ``event:`` and ``id:`` lines are
ignored. A stream that ends without ``[DONE]`` is an error, whatever it carried before.

Usage is the engine's own (asked for with ``stream_options.include_usage``); an engine that sends
none gets its streamed chunks counted, and the :class:`Finish` says ``usage_reported=False``.

Every failure is translated here, once, into the :class:`llorch.errors.EngineError` tree, with
the aiohttp exception kept as the cause. Before the first token: ``EngineUnavailable`` (cannot
connect), ``EngineTimeout`` (no first token in time), ``EngineStatusError`` / ``EngineRejected``
(an error status), ``EngineProtocolError`` (not a stream, a malformed chunk, no ``[DONE]``).
After the first token every failure is a ``WorkerReset``, or a ``DecodeTimeout`` when the
engine went silent: the caller has relayed tokens and must not retry.

Closing the generator (or cancelling the task that iterates it) closes the HTTP connection at
once: the engine sees the disconnect and stops. A response read to its end goes back to the
connection pool, so streams one after another reuse a connection.

The HTTP client is aiohttp's: its parser (llhttp, in C) reads a streamed response for about half
the CPU that httpx, httpcore and h11 took (bench/NOTES.md, "The engine's HTTP client").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

from llorch.config import EngineKind, PoolSettings
from llorch.engines.base import (
    FREQUENCY_PENALTY,
    LOGIT_BIAS,
    LOGPROBS,
    PRESENCE_PENALTY,
    RESPONSE_FORMAT,
    TOOLS,
    Accepted,
    ChatMessage,
    Chunk,
    CompletionRequest,
    EngineLoad,
    Finish,
    FinishReason,
    Output,
    Outputs,
    Token,
    ToolCallDelta,
    estimate_tokens_in,
)
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

_FINISH_REASONS: dict[str, FinishReason] = {"length": "length", "tool_calls": "tool_calls"}
_ERROR_BODY_CHARS = 300
_AFTER_DONE_S = 0.5  # how long the end of a response may follow its [DONE]
# No compressed streams: an SSE body is decoded chunk by chunk as it comes.
_HEADERS = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
_JSON = {"Content-Type": "application/json"}

# What each kind of engine serves beyond text (ORCH-ENG-0008, ORCH-ENG-0014): llama.cpp's server
# and vLLM take OpenAI's response_format and tools on chat completions, and its penalties and
# logit_bias on both; TGI's have not always had OpenAI's shape, and no TGI server was checked.
_OPENAI_FEATURES = frozenset(
    {RESPONSE_FORMAT, TOOLS, PRESENCE_PENALTY, FREQUENCY_PENALTY, LOGIT_BIAS, LOGPROBS}
)
_FEATURES: dict[str, frozenset[str]] = {
    "llamacpp": _OPENAI_FEATURES,
    "vllm": _OPENAI_FEATURES,
    "openai": _OPENAI_FEATURES,
    "tgi": frozenset(),
}


@dataclass
class _Progress:
    tokens: int = 0
    usage: tuple[int, int] | None = None
    cached: int | None = None
    finish_reason: str | None = None
    # The tool calls begun (their first piece named the function), by index.
    calls: set[int] = field(default_factory=set)


_T = TypeVar("_T")


class _SseReader:
    """The ``data`` payloads of an SSE byte stream, split once per network read, whatever it
    holds. ``:`` starts a comment (a keep-alive); ``event:`` and ``id:`` lines are ignored."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []

    def feed(self, read: bytes) -> list[bytes]:
        """The payloads completed by ``read``."""
        lines = (self._pending + read).split(b"\n")
        self._pending = lines.pop()
        payloads: list[bytes] = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line == b"data":
                    data.append(b"")
                continue
            if data:
                payloads.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
        return payloads


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
        total_timeout_s: float = 600.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.engine: str = kind
        self.features = _FEATURES.get(kind, frozenset())
        self.version = "unknown"
        self.context_size: int | None = None
        self.load: EngineLoad | None = None
        self.base_url = base_url
        root = base_url.rstrip("/")
        self._urls = {False: f"{root}/v1/completions", True: f"{root}/v1/chat/completions"}
        self._root = root
        self._model = model
        self._slots = slots
        self._discover_slots = discover_slots
        self._reported_slots: int | None = None
        self._connect_s = connect_timeout_s
        self._total_s = total_timeout_s
        self._extra_body = dict(extra_body or {})
        self._headers = dict(_HEADERS)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Made on first use, inside the event loop (aiohttp binds a session to its loop).
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_pool(
        cls,
        replica_id: str,
        base_url: str,
        pool: PoolSettings,
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
            total_timeout_s=pool.timeouts.total_ms / 1000,
            extra_body=pool.extra_body,
        )

    @property
    def slots(self) -> int:
        if self._discover_slots and self._reported_slots:
            return self._reported_slots
        return self._slots

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                headers=self._headers,
                # No limit here: the dispatcher gives a replica no more streams than its slots.
                # Released connections stay alive (aiohttp keeps them 15 s).
                connector=aiohttp.TCPConnector(limit=0),
                # The transport's limits: connect here, the total per call in stream(). The
                # first-token and idle limits are the scheduler's, for every engine alike.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_s),
                auto_decompress=False,
            )
        return session

    # -- streaming --------------------------------------------------------------------------

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        chat = request.messages is not None
        headers = dict(_JSON)
        if request.correlation_id:
            headers["X-Correlation-Id"] = request.correlation_id
        progress = _Progress()
        total_at = asyncio.get_running_loop().time() + self._total_s
        # The total time limit of one call, the wait for the response's head included.
        dog = Watchdog()
        dog.move(total_at, "the total time limit")
        response: aiohttp.ClientResponse | None = None
        try:
            body = _dumps(self._body(request))
            post = self._client().post(self._urls[chat], data=body, headers=headers)
            response = await self._within(dog, post, progress)
            await self._check(response)
            yield Accepted()
            content = response.content
            events = _SseReader()
            while True:
                read = await self._within(dog, content.readany(), progress)
                if not read:
                    raise EngineProtocolError(
                        f"{self._where} ended the stream without [DONE]", engine=self.engine
                    )
                outputs: Outputs = []
                done = False
                for payload in events.feed(read):
                    if payload == b"[DONE]":
                        done = True
                        break
                    outputs += self._parse(payload, chat, progress)
                if outputs:
                    # A tool call's piece counts as a token: once one is relayed, no retry.
                    progress.tokens += len(outputs)
                    yield outputs  # those of one read in one step
                if done:
                    break
            if await self._read_to_end(content, dog):
                response.release()  # back to the pool, before the caller moves on
                response = None
            yield self._finish(request, progress)
        except aiohttp.ClientError as exc:
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
            if response is not None:
                # Not read to its end (a failure, a cancel, the generator closed): its
                # connection is closed, and the engine sees the disconnect and stops.
                response.close()

    async def _within(self, dog: Watchdog, step: Awaitable[_T], progress: _Progress) -> _T:
        """``step``, unless the call's total time runs out first."""
        try:
            return await dog.wait(step)
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):
                raise  # a transport error (the connect limit): translated by stream()
            raise self._overdue(dog, progress) from exc

    def _overdue(self, dog: Watchdog, progress: _Progress) -> EngineError:
        """The watchdog's deadline passed: a decode timeout once tokens have come."""
        message = f"{self._where} exceeded {dog.reason}"
        if progress.tokens:
            return DecodeTimeout(message, engine=self.engine)
        return EngineTimeout(message, engine=self.engine)

    def _body(self, request: CompletionRequest) -> dict[str, Any]:
        # llama.cpp keeps a slot's prompt cache only when asked; placement sends prompts that
        # share a prefix to the replica that served it last (the pool's extra_body may say no).
        cache: dict[str, Any] = {"cache_prompt": True} if self.engine == "llamacpp" else {}
        body: dict[str, Any] = {
            **cache,
            **self._extra_body,
            "model": self._model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.messages is not None:
            body["messages"] = [_message(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt
        tools = list(request.tools) or None
        optional = {
            "seed": request.seed,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": list(request.stop) or None,
            "response_format": request.response_format,
            "tools": tools,
            "tool_choice": request.tool_choice if tools else None,
            "parallel_tool_calls": request.parallel_tool_calls if tools else None,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "logit_bias": request.logit_bias,
            "logprobs": True if request.logprobs else None,
            "top_logprobs": request.top_logprobs if request.logprobs else None,
        }
        body |= {name: value for name, value in optional.items() if value is not None}
        return body

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status != 200:
            text = (await response.read()).decode("utf-8", "replace")[:_ERROR_BODY_CHARS]
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

    async def _read_to_end(self, content: aiohttp.StreamReader, dog: Watchdog) -> bool:
        """After ``[DONE]``: read the rest of the response (the chunked encoding's last chunk);
        True when it ended, so that its connection can serve the next stream.

        What comes after ``[DONE]`` is ignored; an engine that keeps the response open past
        ``_AFTER_DONE_S`` loses its connection instead.
        """
        dog.move(asyncio.get_running_loop().time() + _AFTER_DONE_S, "the end after [DONE]")
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            while await dog.wait(content.readany()):
                pass
            return True
        return False

    def _parse(self, payload: bytes, chat: bool, progress: _Progress) -> list[Output]:
        """The texts and tool-call pieces of one chunk; usage and finish reason are noted in
        ``progress``."""
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
            progress.cached = _cached_tokens(usage)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise self._malformed(payload)
        outputs: list[Output] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._malformed(payload)
            delta = choice.get("delta") or {}
            if chat and not isinstance(delta, dict):
                raise self._malformed(payload)
            text = delta.get("content") if chat else choice.get("text")
            if text is not None and not isinstance(text, str):
                raise self._malformed(payload)
            if text:
                logprobs = _logprobs(choice.get("logprobs")) if chat else ()
                if logprobs is None:
                    raise self._malformed(payload)
                outputs.append(Token(text, logprobs))
            if chat and delta.get("tool_calls") is not None:
                pieces = _tool_call_pieces(delta["tool_calls"])
                if pieces is None or not _begun(pieces, progress.calls):
                    raise self._malformed(payload)
                outputs += pieces
            if choice.get("finish_reason"):
                progress.finish_reason = str(choice["finish_reason"])
        return outputs

    def _finish(self, request: CompletionRequest, progress: _Progress) -> Finish:
        if progress.usage is not None:
            tokens_in, tokens_out = progress.usage
            reported = True
        else:
            # The engine sent no usage: count what it streamed, estimate the prompt as
            # admission does.
            tokens_in, tokens_out = estimate_tokens_in(request), progress.tokens
            reported = False
        reason = _FINISH_REASONS.get(progress.finish_reason or "", "stop")
        if progress.finish_reason is None and tokens_out >= request.max_tokens:
            reason = "length"
        return Finish(
            reason, tokens_in, tokens_out, usage_reported=reported, tokens_cached=progress.cached
        )

    def _malformed(self, payload: bytes) -> EngineProtocolError:
        text = payload[:80].decode("utf-8", "replace")
        return EngineProtocolError(
            f"{self._where} sent a malformed chunk: {text!r}", engine=self.engine
        )

    def _translate(self, exc: aiohttp.ClientError, progress: _Progress) -> EngineError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return EngineUnavailable(f"cannot reach {self._where}: {detail}", engine=self.engine)
        if isinstance(exc, aiohttp.ServerTimeoutError):
            if progress.tokens:
                return DecodeTimeout(f"{self._where} went silent: {detail}", engine=self.engine)
            return EngineTimeout(f"{self._where} timed out: {detail}", engine=self.engine)
        if progress.tokens:
            return WorkerReset(
                f"{self._where} dropped the stream after {progress.tokens} tokens: {detail}",
                engine=self.engine,
            )
        if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            return EngineUnavailable(
                f"{self._where} closed the connection: {detail}", engine=self.engine
            )
        if isinstance(exc, aiohttp.ClientResponseError):
            return EngineProtocolError(
                f"{self._where} answered malformed HTTP: {detail}", engine=self.engine
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
            status, _ = await self._get("/health")
            if status == 404:
                status, _ = await self._get("/v1/models")
            if status != 200:
                # llama.cpp answers 503 while its model loads: not ready yet, and it says so.
                raise EngineUnavailable(
                    f"{self._where} answered {status} to its health probe", engine=self.engine
                )
            await self._describe()
            self.load = await self._read_load()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                what = "cannot connect"
            elif isinstance(exc, TimeoutError):
                what = "timed out"
            else:
                what = type(exc).__name__
            raise EngineUnavailable(
                f"{self._where} did not answer its health probe: {what}", engine=self.engine
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

    async def _read_load(self) -> EngineLoad | None:
        """The engine's own load (ORCH-ENG-0025): llama.cpp ``/slots`` (``is_processing``),
        vLLM ``/metrics`` (requests running and waiting, KV-cache usage). None when the engine
        has no such endpoint or it fails: llorch's own slot count stays in charge."""
        try:
            if self.engine == "llamacpp":
                return _slots_load(await self._get_json("/slots"))
            if self.engine == "vllm":
                status, body = await self._get("/metrics")
                return _vllm_load(body.decode("utf-8", "replace")) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None
        return None

    async def _get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of a GET, read to its end so that the connection can be reused."""
        timeout = aiohttp.ClientTimeout(total=self._connect_s)
        async with self._client().get(f"{self._root}{path}", timeout=timeout) as response:
            return response.status, await response.read()

    async def _get_json(self, path: str) -> Any:
        status, body = await self._get(path)
        if status != 200:
            return None
        try:
            return orjson.loads(body)
        except ValueError:
            return None


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits (in a tool's or a format's JSON schema)
        return json.dumps(body, ensure_ascii=False).encode()


def _message(message: ChatMessage) -> dict[str, Any]:
    """A chat message as OpenAI's API takes it, tool calls and tool results included."""
    sent: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        sent["tool_calls"] = list(message.tool_calls)
    if message.tool_call_id is not None:
        sent["tool_call_id"] = message.tool_call_id
    return sent


def _tool_call_pieces(calls: Any) -> list[ToolCallDelta] | None:
    """The pieces of ``delta.tool_calls``, None when it does not have OpenAI's shape. A piece
    without ``index`` (some engines send whole calls) is placed by its position."""
    if not isinstance(calls, list):
        return None
    pieces = []
    for position, call in enumerate(calls):
        function = (call.get("function") or {}) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return None
        index = call.get("index", position)
        texts = (call.get("id"), function.get("name"), function.get("arguments"))
        if not _is_index(index) or any(t is not None and not isinstance(t, str) for t in texts):
            return None
        call_id, name, arguments = texts
        pieces.append(ToolCallDelta(index, arguments or "", call_id or None, name or None))
    return pieces


def _logprobs(logprobs: Any) -> tuple[dict[str, Any], ...] | None:
    """A chat chunk's ``logprobs.content`` entries (none when it has none), None when they do not
    have OpenAI's shape (a ``token`` and a numeric ``logprob`` each)."""
    if logprobs is None:
        return ()
    content = logprobs.get("content") if isinstance(logprobs, dict) else 0
    if content is None:
        return ()
    if not isinstance(content, list) or not all(_is_logprob(e) for e in content):
        return None
    return tuple(content)


def _is_logprob(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return False
    logprob = entry.get("logprob")
    return isinstance(logprob, int | float) and not isinstance(logprob, bool)


def _begun(pieces: list[ToolCallDelta], calls: set[int]) -> bool:
    """Note the calls ``pieces`` begin; False when one continues a call never begun (a call's
    first piece must name its function)."""
    for piece in pieces:
        if piece.index not in calls:
            if piece.name is None:
                return False
            calls.add(piece.index)
    return True


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _slots_load(slots: Any) -> EngineLoad | None:
    """llama.cpp's ``/slots``: a list with one object per slot, ``is_processing`` in each."""
    if not isinstance(slots, list) or not slots:
        return None
    if not all(isinstance(s, dict) and isinstance(s.get("is_processing"), bool) for s in slots):
        return None
    return EngineLoad(busy_slots=sum(s["is_processing"] for s in slots), total_slots=len(slots))


_VLLM_SERIES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:gpu_cache_usage_perc": "kv",  # its name before vLLM 0.10
}


def _vllm_load(text: str) -> EngineLoad | None:
    """vLLM's Prometheus text: requests running and waiting are summed over its series (one per
    model and engine core), the KV-cache usage (a fraction, despite ``_perc``) is the highest."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        what = _VLLM_SERIES.get(name)
        if what is None:
            continue
        rest = line[line.rindex("}") + 1 :] if "{" in line and "}" in line else line[len(name) :]
        try:
            value = float(rest.split()[0])  # a timestamp may follow
        except (IndexError, ValueError):
            continue
        if value != value or value < 0:  # NaN or negative: not a load
            continue
        sums[what] = max(sums.get(what, 0.0), value) if what == "kv" else sums.get(what, 0) + value
    if not sums:
        return None
    running, waiting = sums.get("running"), sums.get("waiting")
    return EngineLoad(
        busy_slots=None if running is None else round(running),
        waiting=None if waiting is None else round(waiting),
        kv_cache_usage=None if "kv" not in sums else min(1.0, sums["kv"]),
    )


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` when the engine reports it (llama.cpp,
    vLLM with prefix caching); an odd value is ignored, not an error: it is advisory."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached >= 0 else None
