"""An instance's ears on PostgreSQL: ``LISTEN``/``NOTIFY`` on one dedicated connection.

:class:`Listener` owns one psycopg connection (autocommit) in a thread of its own; nothing of
it runs on the event loop. The thread waits on the connection's socket and on a wake-up pipe;
each notification is handed to the loop with ``call_soon_threadsafe``, where the channel's
callbacks run (``listen(channel, callback)``, ``callback(payload)``). :meth:`Listener.notify`
queues a notification that the thread sends on the same connection, without waiting.

Notifications are wake-ups, never the truth: the database's tables are. A notification sent
while the connection is down is lost, so the listener reconnects by itself every ``retry_s``
and, once its channels are listened to again, runs every ``on_connect`` callback on the loop
(the first connect included): each subscriber catches up from its table then (ORCH-STATE-0040).
A notification queued with :meth:`notify` while the connection is down is dropped, for the
same reason. Usage::

    listener = Listener(conninfo, retry_s=1.0)
    listener.listen("llorch_cancel", on_cancel)
    listener.on_connect(catch_up)
    listener.start(asyncio.get_running_loop())
    listener.notify("llorch_cancel", task_id)
    ...
    listener.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("llorch.persistence")

Connection = psycopg.Connection[tuple[Any, ...]]

_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
MAX_PAYLOAD_BYTES = 7999
# Notifications queued for sending at most; more are dropped (they are only wake-ups).
_MAX_QUEUED = 10_000


class Listener:
    def __init__(self, conninfo: str, *, retry_s: float = 1.0, name: str = "llorch-pg-listen"):
        self._conninfo = conninfo
        self._retry_s = retry_s
        self._name = name
        self._callbacks: dict[str, list[Callable[[str], None]]] = {}
        self._on_connect: list[Callable[[], None]] = []
        self._listening: set[str] = set()  # the thread's: channels LISTENed on this connection
        self._outbox: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._up = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        """Whether the connection is open and every channel listened to."""
        return self._up.is_set()

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` on the loop for every notification on ``channel``."""
        if not _CHANNEL.match(channel):
            raise ValueError(f"not a channel name: {channel!r}")
        self._callbacks.setdefault(channel, []).append(callback)
        self._wake()

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop after every (re)connect, once listening: what was
        notified while the connection was down is lost, and the subscriber catches up."""
        self._on_connect.append(callback)

    def notify(self, channel: str, payload: str) -> None:
        """Send a notification soon, from the listener's thread; dropped while disconnected."""
        if not _CHANNEL.match(channel):
            raise ValueError(f"not a channel name: {channel!r}")
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError("a NOTIFY payload must be under 8000 bytes")
        if not self._up.is_set() or self._outbox.qsize() >= _MAX_QUEUED:
            log.debug("notification on %s dropped: not connected", channel)
            return
        self._outbox.put((channel, payload))
        self._wake()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the thread -------------------------------------------------------------------------

    def _wake(self) -> None:
        # A full pipe wakes the thread anyway; a closed one has no thread left to wake.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    self._serve(conn)
            except psycopg.Error as exc:
                if self._up.is_set():
                    log.warning(
                        "LISTEN connection lost (%s): reconnecting every %g s",
                        " ".join(str(exc).split()) or type(exc).__name__,
                        self._retry_s,
                        extra={"event": "listener_lost"},
                    )
            finally:
                self._up.clear()
                self._listening.clear()
            self._stop.wait(self._retry_s)

    def _serve(self, conn: Connection) -> None:
        self._subscribe(conn)
        self._up.set()
        self._drain(conn)
        self._to_loop(self._connected)
        sock = conn.fileno()
        while not self._stop.is_set():
            # Notifications that arrive with a statement's answer wait in psycopg's backlog,
            # not on the socket: drained after every statement too.
            if self._subscribe(conn) | self._send(conn):
                self._drain(conn)
            ready, _, _ = select.select([sock, self._wake_r], [], [], self._retry_s)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if sock in ready:
                self._drain(conn)
            elif not ready:
                conn.execute("SELECT 1")  # an idle check: a dead server is noticed
                self._drain(conn)

    def _drain(self, conn: Connection) -> None:
        for note in conn.notifies(timeout=0):
            self._to_loop(self._deliver, note.channel, note.payload)

    def _subscribe(self, conn: Connection) -> bool:
        """LISTEN to the channels subscribed since; whether there were any."""
        new = [c for c in list(self._callbacks) if c not in self._listening]
        for channel in new:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._listening.add(channel)
        return bool(new)

    def _send(self, conn: Connection) -> bool:
        """Send the queued notifications; whether there were any."""
        sent = False
        while True:
            try:
                channel, payload = self._outbox.get_nowait()
            except queue.Empty:
                return sent
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            sent = True

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
            loop.call_soon_threadsafe(callback, *args)

    # -- on the loop ------------------------------------------------------------------------

    def _connected(self) -> None:
        for callback in list(self._on_connect):
            _guarded(callback)

    def _deliver(self, channel: str, payload: str) -> None:
        for callback in list(self._callbacks.get(channel, ())):
            _guarded(callback, payload)


def _guarded(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:  # one subscriber's bug must not silence the others
        log.exception("a notification callback failed")
