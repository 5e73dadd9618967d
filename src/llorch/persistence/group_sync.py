"""Group commit for SQLite: one fsync of the write-ahead log makes every commit before it durable.

SQLite runs with ``synchronous=NORMAL`` in WAL mode: a commit writes its frames to the ``-wal``
file (the operating system's cache) and returns without an fsync, so it survives a killed process
but not a power loss. ``synchronous=FULL`` would fsync the log at every commit, on the event loop.
Instead, a caller about to answer for a commit (a 202, a 201, a task's terminal frame) awaits
:meth:`GroupSync.durable`: the log file is fsynced in a worker thread, and every commit written
before that fsync began is durable when it returns (ORCH-STATE-0020). Callers arriving while an
fsync is under way wait for the next one (theirs may have been written after it began); every
caller waiting meanwhile shares it. That is what ``FULL`` promises, with one fsync per batch.
What cannot wait (a task's terminal frame) is handed over with :meth:`GroupSync.when_durable`
and called after that fsync, before any waiter resumes: a reader that awaited
:meth:`GroupSync.durable` finds every end it covers published.

Checkpoints stay SQLite's: in WAL mode it fsyncs the log before copying it into the database
file and the database file after, so a commit moved out of the log stays durable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from llorch.errors import StorageError

log = logging.getLogger("llorch.persistence")


# Backoff of a log that cannot be synced while ends wait for it: 50 ms doubling to 5 s.
_RETRY_FIRST_S, _RETRY_MAX_S = 0.05, 5.0


class GroupSync:
    def __init__(self, database: Path) -> None:
        self._wal = database.with_name(database.name + "-wal")
        self._directory = database.parent
        # The log file's inode when its directory entry was last made durable.
        self._wal_inode: int | None = None
        # Commits made on the loop's connection, and how many of them an fsync covers.
        self._committed = 0
        self._synced = 0
        self._inflight: asyncio.Future[StorageError | None] | None = None
        # What waits for a commit to be durable: (commits it needs covered, what to call).
        self._callbacks: list[tuple[int, Callable[[], None]]] = []
        self._retry_s = _RETRY_FIRST_S
        self.fsyncs = 0

    def note_commit(self) -> None:
        """A commit returned on the loop's connection: not durable until the next fsync."""
        self._committed += 1

    @property
    def pending(self) -> bool:
        """Whether a commit is not covered by an fsync yet."""
        return self._synced < self._committed

    async def durable(self) -> None:
        """Return once every commit made before this call is durable (the callbacks waiting
        for those commits called first); StorageError when the log cannot be synced."""
        target = self._committed
        while self._synced < target:
            # Shielded: a caller that goes away leaves the fsync to the others.
            failure = await asyncio.shield(self._start())
            if failure is not None:
                raise failure

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once every commit made so far is durable: at once
        when it is, else after the fsync that covers them (tried again while it fails)."""
        if not self.pending:
            callback()
            return
        self._callbacks.append((self._committed, callback))
        self._start()

    def sync_now(self) -> None:
        """Every commit so far durable, blocking (at start-up, before anything is served)."""
        covered = self._committed
        self._fsync()
        self._synced = max(self._synced, covered)

    def _start(self) -> asyncio.Future[StorageError | None]:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._run())
        return self._inflight

    async def _run(self) -> StorageError | None:
        covered = self._committed  # every commit so far is in the log file already
        try:
            await asyncio.to_thread(self._fsync)
        except StorageError as exc:
            log.error("cannot make commits durable (trying again): %s", exc)
            if self._callbacks:
                asyncio.get_running_loop().call_later(self._retry_s, self._start)
                self._retry_s = min(2 * self._retry_s, _RETRY_MAX_S)
            return exc
        finally:
            self._inflight = None
        self._retry_s = _RETRY_FIRST_S
        self._synced = max(self._synced, covered)
        self._call_back()
        return None

    def _call_back(self) -> None:
        ready = [cb for needs, cb in self._callbacks if needs <= self._synced]
        self._callbacks = [(n, cb) for n, cb in self._callbacks if n > self._synced]
        for callback in ready:
            try:
                callback()
            except Exception:  # a bug in one caller leaves the others theirs
                log.exception("a callback waiting for a durable commit failed")
        if self._callbacks:
            self._start()

    def _fsync(self) -> None:
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # no log: SQLite checkpointed it into the database file, synced
        except OSError as exc:
            raise StorageError(f"cannot open the write-ahead log to sync it: {exc}") from exc
        try:
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
            if inode != self._wal_inode:
                # A new log file: its directory entry must be durable too.
                self._fsync_directory()
                self._wal_inode = inode
            self.fsyncs += 1
        except OSError as exc:
            raise StorageError(f"cannot sync the write-ahead log: {exc}") from exc
        finally:
            os.close(fd)

    def _fsync_directory(self) -> None:
        fd = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
