"""The task state machine and the registry of live tasks and retained streams."""

from __future__ import annotations

import pytest

from llorch.scheduler.registry import Registry
from llorch.scheduler.task import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    IllegalTransition,
)
from tests.unit.helpers import task_record

ALLOWED = [
    (QUEUED, RUNNING),
    (QUEUED, FAILED),
    (QUEUED, CANCELED),
    (RUNNING, SUCCEEDED),
    (RUNNING, FAILED),
    (RUNNING, CANCELED),
]

ILLEGAL = [
    (SUCCEEDED, RUNNING),
    (QUEUED, SUCCEEDED),
    (QUEUED, QUEUED),
    (RUNNING, QUEUED),
    (RUNNING, RUNNING),
    (FAILED, CANCELED),
    (CANCELED, RUNNING),
    (CANCELED, FAILED),
    (SUCCEEDED, FAILED),
]


def test_a_new_task_record_is_queued() -> None:
    record = task_record("t-1")

    assert record.state == QUEUED
    assert (record.task_id, record.session_id, record.pool_id) == ("t-1", "s-1", "default")


@pytest.mark.parametrize(("start", "end"), ALLOWED)
def test_allowed_transitions(start: str, end: str) -> None:
    record = task_record("t-1")
    record.state = start

    record.move_to(end)

    assert record.state == end


@pytest.mark.parametrize(("start", "end"), ILLEGAL)
def test_illegal_transitions_raise_and_leave_the_state_alone(start: str, end: str) -> None:
    record = task_record("t-1")
    record.state = start

    with pytest.raises(IllegalTransition, match=f"{start} -> {end}"):
        record.move_to(end)
    assert record.state == start


@pytest.mark.req("ORCH-DATA-0050")
@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_a_task_ends_once(terminal: str) -> None:
    record = task_record("t-1")
    record.move_to(RUNNING)
    record.move_to(terminal)

    for state in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED):
        with pytest.raises(IllegalTransition):
            record.move_to(state)


@pytest.mark.req("ORCH-DATA-0053")
def test_the_registry_keeps_the_streams_of_recently_ended_tasks() -> None:
    registry = Registry([], streams_retained=2)
    records = [task_record(f"t-{i}") for i in range(3)]
    for record in records:
        registry.add(record)
    assert registry.stream("t-0") is records[0].events

    for record in records:
        registry.retire(record)

    assert registry.live == {}
    # The oldest ended stream is evicted first.
    assert registry.stream("t-0") is None
    assert registry.stream("t-1") is records[1].events
    assert registry.stream("t-2") is records[2].events
    assert registry.stream("unknown") is None


def test_a_registry_retaining_no_streams_forgets_ended_tasks() -> None:
    registry = Registry([], streams_retained=0)
    record = task_record("t-1")
    registry.add(record)

    registry.retire(record)

    assert registry.stream("t-1") is None
