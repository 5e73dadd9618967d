"""The PostgreSQL store's way to its server: a pool while the server answers, none while not.

While the server answers, :meth:`Link.pool` hands out the pool, and a watcher thread runs
``check`` on a connection every ``retry_s`` (the instance's heartbeat): an outage is noticed,
and readiness follows it, on a server that gets no traffic. Once a call or the watcher finds
the server gone (a broken connection, no connection within the budget), the link is *lost*:
every call is refused at once with :class:`llorch.errors.StorageUnavailable` (nothing waits for
a server that is gone), the old pool is closed, and the watcher tries a new one every
``retry_s`` until the server answers again. The store's worker threads call :meth:`pool`; the
watcher swaps the pool in before it clears the loss, so a call never gets a pool closed for
good (one that got the old pool just before a loss fails, and is translated as the loss).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from llorch.errors import StorageUnavailable

log = logging.getLogger("llorch.persistence")

Connection = psycopg.Connection[tuple[Any, ...]]
Pool = ConnectionPool[Connection]

# How long closing a lost server's pool waits for its worker threads (it answers nothing).
_CLOSE_WAIT_S = 1.0


class Link:
    def __init__(
        self,
        open_pool: Callable[[], Pool],
        *,
        retry_s: float,
        timeout_s: float,
        shown: str,
        check: Callable[[Connection], object] = lambda conn: conn.execute("SELECT 1"),
    ) -> None:
        self._open_pool = open_pool
        self._check_on = check
        self._retry_s = retry_s
        self._timeout_s = timeout_s
        self._shown = shown
        self._pool: Pool | None = open_pool()
        # When ``check`` (the heartbeat) last succeeded, by time.monotonic().
        self._checked_at = time.monotonic()
        self._lost = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llorch-pg-link", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return not self._lost.is_set()

    def heartbeat_age_s(self) -> float:
        """Seconds since ``check`` (the instance's heartbeat) last reached the server."""
        return time.monotonic() - self._checked_at

    def pool(self) -> Pool:
        """The pool; StorageUnavailable at once while the server is lost."""
        pool = self._pool  # read once: the watcher may swap it meanwhile
        if self._lost.is_set() or pool is None:
            raise StorageUnavailable(
                "the database is unreachable; it is tried again every "
                f"{round(self._retry_s * 1000)} ms",
                retry_after_ms=round(self._retry_s * 1000),
            )
        return pool

    def lose(self, cause: BaseException) -> None:
        """The server is gone: refuse calls from now on, and reconnect in the watcher thread."""
        if self._lost.is_set():
            return
        log.warning(
            "database %s unreachable (%s): refusing storage calls until it answers again",
            self._shown,
            " ".join(str(cause).split()) or type(cause).__name__,
            extra={"event": "database_lost"},
        )
        self._lost.set()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if self._pool is not None:
            # A server that answers: wait for the pool's workers to end (each call is bounded
            # by the connect and statement timeouts), so none outlives the store and runs on
            # after its database is gone; a lost one: a short wait, then leave them.
            self._pool.close(timeout=self._timeout_s if self.up else _CLOSE_WAIT_S)
            self._pool = None

    # -- the watcher thread -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._lost.is_set():
                self._reconnect()
            else:
                self._check()
            self._wake.wait(self._retry_s)
            self._wake.clear()

    def _check(self) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            with pool.connection(timeout=self._timeout_s) as conn:
                self._check_on(conn)
        except psycopg.Error as exc:
            self.lose(exc)
        else:
            self._checked_at = time.monotonic()

    def _reconnect(self) -> None:
        old, self._pool = self._pool, None
        if old is not None:
            old.close(timeout=_CLOSE_WAIT_S)
        try:
            pool = self._open_pool()
        except psycopg.Error as exc:
            log.debug("database %s still unreachable: %s", self._shown, exc)
            return
        if self._stop.is_set():
            pool.close(timeout=_CLOSE_WAIT_S)
            return
        self._pool = pool  # before the loss is cleared: pool() never sees None while up
        self._lost.clear()
        log.info("database %s reachable again", self._shown, extra={"event": "database_back"})
