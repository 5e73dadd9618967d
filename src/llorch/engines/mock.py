"""The built-in mock engine: deterministic text, configurable latency, injectable failures.

Text is a function of (seed, prompt) only, so the same request always streams the same tokens.
Timing follows ``ttft_ms`` and ``tokens_per_s`` (0 means as fast as possible). With ``eos``
(the default) a completion may stop before ``max_tokens`` at a length drawn from the same seed.
Failures are injected by configuration, per replica: ``before_first_token`` (an engine error
after the TTFT), ``mid_stream`` (a worker reset after ``after_tokens`` tokens), ``hang`` (silence
after ``after_tokens`` tokens, for decode timeouts) and ``down`` (the replica reports unhealthy).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncGenerator

from llorch.config import FailureSettings, MockSettings
from llorch.engines.base import Accepted, Chunk, CompletionRequest, EngineLoad, Finish, Token
from llorch.errors import EngineError, WorkerReset

_WORDS = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "that",
    "for",
    "it",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "be",
    "or",
    "an",
    "are",
    "his",
    "her",
    "once",
    "upon",
    "time",
    "there",
    "lived",
    "small",
    "river",
    "stone",
    "light",
    "quiet",
    "city",
    "north",
    "engine",
    "token",
    "queue",
    "budget",
    "stream",
    "model",
    "night",
    "morning",
    "garden",
    "window",
    "story",
    "answer",
    "question",
    "simple",
    "clear",
    "warm",
    "cold",
    "bright",
    "green",
    "silver",
    "ancient",
    "careful",
    "patient",
    "rapid",
    "gentle",
    "distant",
    "hidden",
    "open",
)


def count_tokens(text: str) -> int:
    """The mock tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def prompt_text(request: CompletionRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    return "\n".join(f"{m.role}: {m.content}" for m in request.messages or ())


_INDICES = range(len(_WORDS))


def _draw_words(key: str, max_tokens: int, eos: bool) -> bytes:
    """The indices in ``_WORDS`` of a completion's words, drawn at once from the generator
    seeded by ``key``, as the stream used to draw them one by one (the same length and words).

    A ``random.Random`` holds 2.5 KiB of state: kept for the life of every open stream, that was
    a tenth of a stream's memory in the 10,000-streams benchmark. One byte a word is kept instead.
    """
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    length = min(max_tokens, rng.randint(8, 512) if eos else max_tokens)
    return bytes(rng.choice(_INDICES) for _ in range(length))


class MockEngine:
    engine = "mock"
    version = "mock-1"
    context_size: int | None = None
    # Text is a function of (seed, prompt): it cannot be shaped (response_format), call tools,
    # or be steered by penalties or a logit bias (all refused, ORCH-ENG-0009), and sampling
    # knobs other than the seed (temperature, top_p) change nothing.
    features: frozenset[str] = frozenset()
    load: EngineLoad | None = None  # llorch's own slot count is the whole truth

    def __init__(
        self,
        replica_id: str,
        *,
        settings: MockSettings,
        slots: int,
        failure: FailureSettings | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._settings = settings
        self._slots = slots
        self._failure = failure or FailureSettings()

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def failure(self) -> FailureSettings:
        return self._failure

    def inject(self, failure: FailureSettings) -> None:
        """Change the injected failure at run time (pact provider states, fault drills).

        A replica put ``down`` fails its next health probe; streams already running go on.
        """
        self._failure = failure

    async def health(self) -> bool:
        return self._failure.mode != "down"

    async def close(self) -> None:
        return None

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        text = prompt_text(request)
        tokens_in = max(1, count_tokens(text))
        if self._failure.mode == "down":
            raise EngineError(f"replica {self.replica_id} is down", engine=self.engine)
        yield Accepted()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self._settings.ttft_ms / 1000)
        if self._failure.mode == "before_first_token":
            raise EngineError(
                f"replica {self.replica_id} failed before the first token", engine=self.engine
            )
        words = _draw_words(f"{request.seed}\x00{text}", request.max_tokens, self._settings.eos)
        interval = 1 / self._settings.tokens_per_s if self._settings.tokens_per_s > 0 else 0.0
        first_token_at = start + self._settings.ttft_ms / 1000
        # Only the tail that a stop sequence could still complete is kept.
        window = max((len(s) for s in request.stop), default=0) + 16
        produced = ""
        for i, index in enumerate(words):
            if self._failure.mode in ("mid_stream", "hang") and i == self._failure.after_tokens:
                if self._failure.mode == "hang":
                    await asyncio.Event().wait()
                raise WorkerReset(
                    f"replica {self.replica_id} reset after {i} tokens", engine=self.engine
                )
            word = _WORDS[index]
            piece = word if i == 0 else " " + word
            if request.stop and any(s in produced + piece for s in request.stop):
                yield Finish("stop", tokens_in, i)
                return
            if interval:
                delay = first_token_at + i * interval - loop.time()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
            if window > 16:
                produced = (produced + piece)[-window:]
            yield Token(piece)
        out = len(words)
        yield Finish("length" if out == request.max_tokens else "stop", tokens_in, out)
