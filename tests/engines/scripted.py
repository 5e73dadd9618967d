"""A scripted OpenAI-compatible engine on a real socket, for what llama.cpp cannot show.

Each POST is answered by the next :class:`Reply` of the script (the last one repeats): a status,
a content type and body parts written one by one, then an end — a clean close, an abrupt reset
of the connection, or a hang until the client gives up. A ``GET`` of a path in ``pages`` answers
that page (a status and a body, changeable between probes); any other ``GET`` answers 200 with a
small JSON body. Every request is recorded (method, path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.support import free_port

# "mute": no answer at all (not even its head) until the client gives up.
End = Literal["close", "reset", "hang", "mute"]


@dataclass(frozen=True)
class Reply:
    parts: tuple[str, ...] = ()
    status: int = 200
    content_type: str = "text/event-stream"
    end: End = "close"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def chunk(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def completion_chunks(
    texts: list[str], *, finish: str = "length", usage: tuple[int, int] | None = None
) -> list[str]:
    """``/v1/completions`` chunks as llama.cpp and vLLM send them (usage in the last chunk)."""
    parts = [chunk({"choices": [{"index": 0, "text": t, "finish_reason": None}]}) for t in texts]
    last: dict[str, Any] = {"choices": [{"index": 0, "text": "", "finish_reason": finish}]}
    if usage is not None:
        last["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return [*parts, chunk(last)]


# Loop iterations from an accepted socket to its protocol's connection_made (asyncio's accept
# task, the transport's call_soon), with one to spare.
_ACCEPT_STEPS = 3


@dataclass
class ScriptedEngine:
    script: list[Reply]
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    # GET path → (status, body): what the engine says about itself (/slots, /metrics).
    pages: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Set when a client closed a connection the engine was still streaming on.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _hangs: list[asyncio.Event] = field(default_factory=list)
    # The connections open now, from the moment they are accepted (before their handler
    # starts): closed at exit (Python 3.11's Server.close leaves them open, and one would be
    # collected later as an unclosed transport).
    _open: set[asyncio.BaseTransport] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedEngine:
        loop = asyncio.get_running_loop()

        def protocol() -> _Tracked:
            return _Tracked(asyncio.StreamReader(loop=loop), self._serve, self._open)

        self._server = await loop.create_server(protocol, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for hang in self._hangs:
            hang.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        # A connection accepted just before the close gets its transport from a task asyncio
        # scheduled then: let those run (a task, then its connection_made), so that no accepted
        # socket is left to the garbage collector (an "unclosed socket" in some later test).
        for _ in range(_ACCEPT_STEPS):
            await asyncio.sleep(0)
        # Every connection accepted, its handler started or not, is closed now.
        for transport in list(self._open):
            transport.close()
        await asyncio.sleep(0)  # their connection_lost callbacks run

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The loop is closing with a client's keep-alive connection still open: end quietly
            # (asyncio's stream callback would report a cancelled handler as an error).
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode().split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (h.partition(":") for h in header_lines if h)
        }
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        self.seen.append(Seen(method, path, headers, json.loads(raw) if raw else None))
        if method == "GET":
            status, text = self.pages.get(path, (200, '{"status":"ok"}'))
            body = text.encode()
            kind = "application/json" if text.startswith(("{", "[")) else "text/plain"
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\n".encode()
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return True
        posts = sum(1 for s in self.seen if s.method == "POST")
        reply = self.script[min(posts, len(self.script)) - 1]
        if reply.end != "mute":
            writer.write(
                f"HTTP/1.1 {reply.status} X\r\ncontent-type: {reply.content_type}\r\n"
                "connection: close\r\n\r\n".encode()
            )
        for part in reply.parts:
            writer.write(part.encode())
            await writer.drain()
            await asyncio.sleep(0.001)
        if reply.end in ("hang", "mute"):
            # Until the client closes its side (reading then returns EOF) or the test ends.
            hang = asyncio.Event()
            self._hangs.append(hang)
            eof = asyncio.ensure_future(reader.read())
            stop = asyncio.ensure_future(hang.wait())
            await asyncio.wait([eof, stop], return_when=asyncio.FIRST_COMPLETED)
            if eof.done():
                self.disconnected.set()
            eof.cancel()
            stop.cancel()
        elif reply.end == "reset":
            writer.transport.abort()
        return False

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]

    def gets(self, path: str) -> int:
        """How many times ``path`` was read."""
        return sum(1 for s in self.seen if s.method == "GET" and s.path == path)

    async def read_again(self, path: str, times: int = 2) -> None:
        """Until ``path`` has been read ``times`` more times: with a probe loop that reads it
        once a round, the round before the last one has ended, and its reading taken effect."""
        goal = self.gets(path) + times
        async with asyncio.timeout(20):
            while self.gets(path) < goal:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


class _Tracked(asyncio.StreamReaderProtocol):
    """asyncio.start_server's protocol, keeping its transport in ``opened`` while connected."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        opened: set[asyncio.BaseTransport],
    ) -> None:
        super().__init__(reader, serve)
        self._opened = opened
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._opened.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._opened.discard(self._transport)
        super().connection_lost(exc)
