"""A loopback TCP proxy the test controls: it forwards every connection to its target until it is
stalled, then holds what it reads (both ways) without forwarding or closing anything, until it
is resumed. A database behind it looks like one that stopped answering on live connections (a
hung server, a network partition behind a middlebox): no error, no reset, only silence. Cut, it
closes every connection and refuses new ones until it is healed: a partition between one client
and the database that others still reach.

    with StallProxy(("127.0.0.1", 5432)) as proxy:
        url = f"postgresql://llorch@127.0.0.1:{proxy.port}/postgres"
        proxy.stall()
        ...  # every round trip through it waits
        proxy.resume()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from urllib.parse import urlsplit


def url_through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by a proxy's on 127.0.0.1."""
    parts = urlsplit(url)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


class StallProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        # Bytes read from the proxy's clients while stalled (held, not forwarded yet).
        self.held_bytes = 0
        self._accepting = threading.Thread(target=self._accept, name="stall-proxy", daemon=True)
        self._accepting.start()

    def stall(self) -> None:
        """Stop forwarding: what is read from now on is held; no connection is closed."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward what was held, and everything after it."""
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection, and every new one at once, until :meth:`heal`."""
        self._refusing.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def heal(self) -> None:
        self._refusing.clear()

    def close(self) -> None:
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> StallProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self._refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink, held in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, held), name="stall-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count_held: bool) -> None:
        try:
            while data := source.recv(65536):
                if not self._flowing.is_set():
                    if count_held:
                        with self._lock:
                            self.held_bytes += len(data)
                    self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
