"""A loopback TCP proxy in front of PostgreSQL that a test cuts and heals: a network partition
between one llorch instance and its database, the others still reaching it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit


class Proxy:
    """Forwards connections to ``host:port``. :meth:`cut` closes every connection and refuses
    new ones (accepted, then closed at once) until :meth:`heal`."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self.port = 0

    def url_for(self, database_url: str) -> str:
        """``database_url`` through this proxy."""
        parts = urlsplit(database_url)
        host = parts.netloc.rsplit("@", 1)
        auth = f"{host[0]}@" if len(host) == 2 else ""
        return parts._replace(netloc=f"{auth}127.0.0.1:{self.port}").geturl()

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_cut(True), self._loop).result(10)

    def heal(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_cut(False), self._loop).result(10)

    async def _set_cut(self, cut: bool) -> None:
        self._cut = cut
        if cut:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )
        self._writers.difference_update((writer, up_writer))

    async def _start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


@contextmanager
def proxy_to(database_url: str) -> Iterator[Proxy]:
    """A proxy to the server of ``database_url``, served by its own loop in a thread."""
    parts = urlsplit(database_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    loop = proxy._loop
    server = loop.run_until_complete(proxy._start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.cut()
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
