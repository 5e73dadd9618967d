"""Reading a trace's transcript back into frames: only a contiguous, terminated run is taken."""

from __future__ import annotations

from typing import Any

import pytest

from llorch.scheduler.replay import BadTranscript, transcript_frames


def frame(seq: int, event: str = "token") -> dict[str, Any]:
    return {"id": seq, "event": event, "data": {"i": seq}}


@pytest.mark.req("ORCH-DATA-0096")
def test_a_transcript_gives_its_frames_with_their_ids() -> None:
    trace = {"transcript": [frame(0, "started"), frame(1), frame(2, "end")]}

    assert transcript_frames(trace) == [
        (0, "started", {"i": 0}),
        (1, "token", {"i": 1}),
        (2, "end", {"i": 2}),
    ]


@pytest.mark.req("ORCH-DATA-0096")
@pytest.mark.parametrize(
    "trace",
    [
        {},
        {"transcript": []},
        {"transcript": "frames"},
        {"transcript": [frame(0), frame(2, "end")]},  # a gap
        {"transcript": [frame(0), frame(1)]},  # no terminal frame
        {"transcript": [frame(0, "end"), frame(1, "end")]},  # two
        {"transcript": [{"id": "0", "event": "end", "data": {}}]},
        {"transcript": [["not", "a", "frame"]]},
        ["not", "a", "trace"],
    ],
)
def test_a_transcript_that_is_not_one_terminated_run_is_refused(trace: Any) -> None:
    with pytest.raises(BadTranscript):
        transcript_frames(trace)
