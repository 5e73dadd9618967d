"""Streams and cancels of tasks that another instance runs (cluster mode: storage is PostgreSQL).

The instance that runs a task records every frame of its stream in the durable transcript
(:class:`llorch.persistence.pg_events.Transcript`, ORCH-STATE-0041): :meth:`Fanout.record`
taps the task's :class:`EventStream` when the task is taken on. Any other instance serves the
task's stream from there (ORCH-STATE-0042): one :class:`MirrorStream` per task and instance,
shared by its subscribers, filled with the frames after the last one it holds by one reader task
for all mirrors, in one round trip for all the tasks a NOTIFY on :data:`EVENTS_CHANNEL` named
(and for every mirror every ``poll_s``: a notification lost in an outage is not waited for),
until the terminal frame. A task whose row ended but whose transcript holds no terminal frame
(a restart's reconcile or a survivor ended it, or its rows were deleted after the retention)
gets the rest from its trace, else the terminal frame rebuilt from its row as
``replay_from_row`` does, once the row has been ended for ``grace_s`` (the frames of an
instance that ended it normally arrive within milliseconds of its commit).

A mirror opened here while its task waited in the shared queue, when this instance then takes
the task on, is fed by the task's own stream as it publishes (ORCH-STATE-0061): reading back
frames this process has just written cost PostgreSQL a third of its CPU per streamed task (see
bench/NOTES.md). A send-back to the shared queue gives it back to the transcript.

While the database is unreachable a mirror keeps its subscribers' responses open with
heartbeats and goes on where it was once the database answers again.

A cancel of a task this instance does not hold is recorded on the task's row and NOTIFYed on
:data:`CANCEL_CHANNEL` (ORCH-STATE-0043); every instance's listener hears it and the one running
the task cancels it locally. After each reconnect of the listener, the instance also reads
which of its live tasks have a cancel recorded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from llorch.artifacts import ArtifactStore
from llorch.clock import Clock
from llorch.errors import StorageError
from llorch.persistence import Storage, TaskRow
from llorch.scheduler.events import _EVENT_BYTES, TERMINAL, Event, EventStream, approx_bytes
from llorch.scheduler.replay import replay_from_trace
from llorch.scheduler.settle import replay_from_row
from llorch.scheduler.task import TERMINAL_STATES, TaskRecord

if TYPE_CHECKING:
    from llorch.persistence.pg_events import ClusterLinks, Read

log = logging.getLogger("llorch.scheduler")

# Channels of llorch.persistence.pg_events (not imported here: a SQLite server never loads it).
EVENTS_CHANNEL = "llorch_events"
CANCEL_CHANNEL = "llorch_cancel"
# Wake-ups only (the tables are the truth, polled besides): a task queued or sent back in the
# pool the payload names; a pool's desired state changed (drain, resume, reload).
QUEUE_CHANNEL = "llorch_queue"
CONTROL_CHANNEL = "llorch_control"


class MirrorStream(EventStream):
    """A task's stream as the durable transcript tells it, on an instance that does not run it.

    Its events keep their ids; there may be a gap before a terminal frame rebuilt from the
    task's row (the frames in between died with the instance that ran it).
    """

    def __init__(self, task_id: str, fanout: Fanout) -> None:
        super().__init__()
        self.task_id = task_id
        self._fanout = fanout
        self._readers = 0
        self.loaded = asyncio.Event()  # the first read is done (or failed)
        # Loop time its row was first read ended while it had no terminal frame.
        self.ended_seen_at: float | None = None
        # The record of the task while this instance runs it, and its send-backs then: its
        # frames come from its stream as they are published, never read back from the database.
        self._fed_by: TaskRecord | None = None
        self._fed_requeues = 0

    @property
    def fed_here(self) -> bool:
        """Whether the task is run here, since it was last taken on: a busy engine's send-back
        (after which any instance may claim it) gives the mirror back to the transcript."""
        fed_by = self._fed_by
        return fed_by is not None and fed_by.requeues == self._fed_requeues

    def adopt(self, record: TaskRecord) -> bool:
        """Follow the stream of ``record``, the task now taken on by this instance, from the
        frames it holds on; False (nothing done) when they do not continue this mirror's (the
        frames in between are only in the transcript) or the mirror is closed."""
        local = record.events
        first = local.events[0].seq if local.events else local.next_seq
        if self.closed or first > self.next_seq:
            return False
        for event in local.events:
            self.add(event.seq, event.kind, event.data)
        self._fed_by, self._fed_requeues = record, record.requeues
        self.loaded.set()
        return True

    @property
    def next_seq(self) -> int:
        return self._events[-1].seq + 1 if self._events else 0

    def add(self, seq: int, kind: str, data: dict[str, Any]) -> None:
        """An event read from the transcript (or rebuilt); one at or below the last is ignored."""
        if self.closed or (self._events and seq <= self._events[-1].seq):
            return
        self._events.append(Event(seq, kind, data))
        self.approx_bytes += _EVENT_BYTES + approx_bytes(data)
        self._wake()

    def _start_index(self, after: int | None) -> int:
        if after is None:
            return 0
        return bisect.bisect_right(self._events, after, key=lambda e: e.seq)

    async def batches(
        self, *, after: int | None = None, heartbeat_s: float | None = None
    ) -> AsyncIterator[list[Event] | None]:
        self._readers += 1
        self._fanout.follow(self)
        try:
            await self.loaded.wait()
            if after is not None and self.closed and after >= self._events[-1].seq:
                # A resume at or past the terminal frame gets it again (as for a local stream).
                after = self._events[-1].seq - 1
            async for batch in super().batches(after=after, heartbeat_s=heartbeat_s):
                if batch is not None and after is not None and batch[0].seq <= after:
                    # Positions are not ids here: a resume past the frames read so far starts
                    # at the end of the list, and the frames up to its id come first.
                    batch = [e for e in batch if e.seq > after]
                    if not batch:
                        continue
                yield batch
        finally:
            self._readers -= 1
            if self._readers == 0:
                self._fanout.unfollow(self)


class Fanout:
    def __init__(
        self,
        links: ClusterLinks,
        db: Storage,
        clock: Clock,
        artifacts: ArtifactStore | None = None,
        *,
        poll_s: float = 1.0,
        grace_s: float = 2.0,
    ) -> None:
        self._links = links
        self._db = db
        self._clock = clock
        self._artifacts = artifacts
        self._poll_s = poll_s
        self._grace_s = grace_s
        self._mirrors: dict[str, MirrorStream] = {}
        # The mirrors to read next (a notification named them, or they are new), and the
        # reader's wake-up; one read for all of them.
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        # The scheduler's: cancel a task this instance holds, and the ids of those it holds.
        self.cancel_held: Callable[[str], None] = lambda task_id: None
        self.held: Callable[[], Iterable[str]] = list
        links.listener.listen(EVENTS_CHANNEL, self._on_events)
        links.listener.listen(CANCEL_CHANNEL, self._on_cancel)
        links.listener.on_connect(self._on_connect)

    # -- the running instance's side --------------------------------------------------------

    def record(self, record: TaskRecord) -> None:
        """Record the frames of a task this instance takes on in the durable transcript. A
        mirror of it here (a client came while it was queued in the shared queue) is fed its
        frames as they are published (ORCH-STATE-0061), not read back from the database."""
        append, task_id = self._links.transcript.append, record.task_id
        mirror = self._mirrors.get(task_id)
        if mirror is not None and mirror.adopt(record):
            fed = mirror

            def tap(event: Event) -> None:
                append(task_id, event.seq, event.kind, event.data, event.kind in TERMINAL)
                if fed.fed_here:
                    fed.add(event.seq, event.kind, event.data)

        else:

            def tap(event: Event) -> None:
                append(task_id, event.seq, event.kind, event.data, event.kind in TERMINAL)

        record.events.tap = tap

    # -- the other instances' side ----------------------------------------------------------

    def stream(self, task_id: str) -> MirrorStream:
        """The task's mirror on this instance (shared by its subscribers)."""
        mirror = self._mirrors.get(task_id)
        if mirror is None:
            mirror = self._mirrors[task_id] = MirrorStream(task_id, self)
        return mirror

    async def request_cancel(self, task_id: str) -> bool:
        """Record the cancel of a task another instance holds and tell it (StorageError when
        the database refuses); whether the task was queued or running."""
        now_ms = self._clock.now_ms()
        transcript = self._links.transcript
        return await asyncio.to_thread(transcript.request_cancel, task_id, now_ms)

    def request_cancel_soon(self, task_id: str) -> None:
        """:meth:`request_cancel` for a caller that cannot wait (a client's disconnect)."""
        self._chore(self._cancel_quietly(task_id))

    async def close(self) -> None:
        tasks = [*self._chores, *([self._reader] if self._reader is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reader = None
        self._mirrors.clear()

    # -- the reader -------------------------------------------------------------------------

    def follow(self, mirror: MirrorStream) -> None:
        """A subscriber came: the mirror is read (at once when new)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="mirrors")
        if not mirror.loaded.is_set():
            self._mark(mirror.task_id)

    def unfollow(self, mirror: MirrorStream) -> None:
        """Its last subscriber left: forget the mirror (a new subscriber reads afresh)."""
        if self._mirrors.get(mirror.task_id) is mirror:
            del self._mirrors[mirror.task_id]

    def _mark(self, *task_ids: str) -> None:
        self._dirty.update(task_ids)
        self._wake.set()

    async def _read_loop(self) -> None:
        """Read the marked mirrors in one round trip (every mirror at least every ``poll_s``),
        until closed."""
        loop = asyncio.get_running_loop()
        polled_at = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, polled_at + self._poll_s - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            names = set(self._dirty)
            self._dirty.clear()
            if loop.time() - polled_at >= self._poll_s:  # lost notifications are not waited for
                names.update(self._mirrors)
                polled_at = loop.time()
            mirrors = self._mirrors
            wanted = {t: m for t in names if (m := mirrors.get(t)) is not None and not m.fed_here}
            reads = await self._read(wanted)
            for task_id, mirror in wanted.items():
                try:
                    if (read := reads.get(task_id)) is not None:
                        await self._apply(mirror, read)
                except Exception:  # a bug: the other mirrors go on, this one is read again
                    log.exception("task %s: its mirror could not take a read", task_id)
                mirror.loaded.set()
                if mirror.closed and self._mirrors.get(task_id) is mirror:
                    del self._mirrors[task_id]

    async def _read(self, wanted: dict[str, MirrorStream]) -> dict[str, Read]:
        """The frames after each mirror's last; none while the database is unreachable (the
        listener's reconnect marks every mirror: no read waits for a connection meanwhile)."""
        if not wanted or not self._links.listener.up:
            return {}
        after = {task_id: mirror.next_seq - 1 for task_id, mirror in wanted.items()}
        try:
            return await asyncio.to_thread(self._links.transcript.read_many, after)
        except StorageError as exc:
            log.debug("the transcript is not readable now: %s", exc)
            return {}

    async def _apply(self, mirror: MirrorStream, read: Read) -> None:
        for seq, kind, data in read.frames:
            mirror.add(seq, kind, data)
        if read.state in TERMINAL_STATES and not mirror.closed:
            now = asyncio.get_running_loop().time()
            if mirror.ended_seen_at is None:
                mirror.ended_seen_at = now
            await self._end_from_row(mirror, now - mirror.ended_seen_at)

    async def _end_from_row(self, mirror: MirrorStream, seen_ended_s: float) -> None:
        """The row ended and the transcript has no terminal frame: once it is old enough that
        none will come, the rest from the trace, else the terminal frame from the row (both
        read through Storage.run)."""
        try:
            row = await self._db.run(self._db.get_task, mirror.task_id)
        except StorageError:
            return
        if row is None or row.state not in TERMINAL_STATES:
            return
        ended_ago_s = (self._clock.now_ms() - (row.ended_ms or 0)) / 1000
        if max(seen_ended_s, ended_ago_s) < self._grace_s:
            return
        rest = await self._db.run(_rest_of, self._artifacts, row, mirror.next_seq)
        for event in rest:
            mirror.add(event.seq, event.kind, event.data)

    # -- notifications ----------------------------------------------------------------------

    def _on_events(self, payload: str) -> None:
        mirrors = self._mirrors
        named = [t for t in payload.split() if (m := mirrors.get(t)) is not None and not m.fed_here]
        if named:
            self._mark(*named)

    def _on_cancel(self, task_id: str) -> None:
        self.cancel_held(task_id)

    def _on_connect(self) -> None:
        """Notifications sent while the listener was away are lost: every mirror reads again,
        and the cancels recorded for the tasks held here are read."""
        self._mark(*self._mirrors)
        self._chore(self.catch_up_cancels())

    async def catch_up_cancels(self, task_ids: Iterable[str] | None = None) -> None:
        """Cancel those of ``task_ids`` (default: every task held here) whose row records a
        cancel: after the listener reconnects, and right after tasks are taken on (a restart's
        restore; a claim from the shared queue), since a cancel may have been notified while
        nobody here listened."""
        held = list(self.held() if task_ids is None else task_ids)
        try:
            asked = await asyncio.to_thread(self._links.transcript.cancels_asked, held)
        except StorageError as exc:
            log.warning("cannot read the cancels asked of this instance's tasks: %s", exc)
            return
        for task_id in asked:
            self.cancel_held(task_id)

    async def _cancel_quietly(self, task_id: str) -> None:
        try:
            await self.request_cancel(task_id)
        except StorageError as exc:
            log.warning("task %s: the cancel could not be recorded: %s", task_id, exc)

    def _chore(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


def _rest_of(artifacts: ArtifactStore | None, row: TaskRow, next_seq: int) -> list[Event]:
    """The frames of an ended task from id ``next_seq``: from its trace when it replays, else
    only its terminal frame, from its row (at least ``next_seq``: never an id seen before)."""
    traced = replay_from_trace(artifacts, row)
    if traced is not None:
        return [e for e in traced.events if e.seq >= next_seq]
    terminal = replay_from_row(row).events[-1]
    return [Event(max(terminal.seq, next_seq), terminal.kind, terminal.data)]
