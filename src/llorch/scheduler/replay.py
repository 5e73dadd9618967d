"""Replaying an ended task's stream from the durable transcript in its trace artifact.

The registry keeps the streams of recently ended tasks in memory, within a count and a byte
budget. An older task's events are still on disk: its trace artifact, written once when it
ended (``scheduler.ending.trace_document``), holds the SSE transcript with the frames' real
ids, the terminal frame included. :func:`replay_from_trace` rebuilds the stream from it; when
there is no trace, or it cannot be read, the caller falls back to the terminal frame alone,
rebuilt from the task's row.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from llorch.artifacts import ArtifactStore
from llorch.errors import LlorchError
from llorch.persistence import TaskRow
from llorch.scheduler.events import TERMINAL, EventStream
from llorch.scheduler.task import TERMINAL_STATES

log = logging.getLogger("llorch.scheduler")


class BadTranscript(ValueError):
    """A trace's transcript that is not one contiguous, terminated run of frames."""


def replay_from_trace(artifacts: ArtifactStore | None, row: TaskRow) -> EventStream | None:
    """The ended task's stream rebuilt from its trace's transcript, closed; None when the task
    has no trace (or has not ended) or its trace cannot be read (a warning is logged)."""
    if artifacts is None or row.trace_artifact_id is None or row.state not in TERMINAL_STATES:
        return None
    try:
        _, content = artifacts.get(row.trace_artifact_id)
        frames = transcript_frames(orjson.loads(content))
        if row.terminal_event_id is not None and frames[-1][0] != row.terminal_event_id:
            raise BadTranscript("its terminal frame's id is not the task's")
    except (LlorchError, orjson.JSONDecodeError, BadTranscript) as exc:
        log.warning(
            "task %s: cannot replay its stream from trace %s, only its terminal frame: %s",
            row.task_id,
            row.trace_artifact_id,
            exc,
            extra={"event": "replay_from_trace_failed", "task_id": row.task_id},
        )
        return None
    return EventStream.replayed(frames)


def transcript_frames(trace: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of every frame of a trace document's transcript, checked: ids
    contiguous, exactly one terminal frame and it last."""
    transcript = trace.get("transcript") if isinstance(trace, dict) else None
    if not isinstance(transcript, list) or not transcript:
        raise BadTranscript("no transcript")
    frames: list[tuple[int, str, dict[str, Any]]] = []
    for frame in transcript:
        if not isinstance(frame, dict):
            raise BadTranscript("a frame is not an object")
        seq, kind, data = frame.get("id"), frame.get("event"), frame.get("data")
        if not isinstance(seq, int) or not isinstance(kind, str) or not isinstance(data, dict):
            raise BadTranscript("a frame lacks its id, event or data")
        if frames and seq != frames[-1][0] + 1:
            raise BadTranscript("frame ids are not contiguous")
        frames.append((seq, kind, data))
    if frames[-1][1] not in TERMINAL or any(kind in TERMINAL for _, kind, _ in frames[:-1]):
        raise BadTranscript("the transcript does not end with its one terminal frame")
    return frames
