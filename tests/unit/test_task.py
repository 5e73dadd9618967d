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
    registry = Registry([], streams_retained=2, streams_retained_bytes=2**30)
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
    registry = Registry([], streams_retained=0, streams_retained_bytes=2**30)
    record = task_record("t-1")
    registry.add(record)

    registry.retire(record)

    assert registry.stream("t-1") is None


@pytest.mark.req("ORCH-DATA-0059")
def test_the_registry_keeps_ended_streams_within_its_byte_budget_oldest_first() -> None:
    records = [task_record(f"t-{i}") for i in range(4)]
    for record in records:
        for i in range(10):
            record.events.publish("token", {"t": "w", "i": i})
    size = records[0].events.approx_bytes
    registry = Registry([], streams_retained=100, streams_retained_bytes=2 * size)

    for record in records:
        registry.add(record)
        registry.retire(record)

    assert [registry.stream(r.task_id) is not None for r in records] == [False, False, True, True]
    assert registry.retained == 2
    assert registry.retained_bytes == 2 * size


@pytest.mark.req("ORCH-DATA-0059")
def test_a_stream_larger_than_the_whole_byte_budget_is_not_kept() -> None:
    small, large = task_record("t-small"), task_record("t-large")
    small.events.publish("token", {"t": "w", "i": 0})
    for i in range(100):
        large.events.publish("token", {"t": "w", "i": i})
    registry = Registry(
        [], streams_retained=100, streams_retained_bytes=small.events.approx_bytes * 10
    )

    for record in (small, large):
        registry.add(record)
        registry.retire(record)

    # The large stream would have pushed the small one out and still not fit: it alone goes.
    assert registry.stream("t-large") is None
    assert registry.stream("t-small") is small.events
    assert registry.retained_bytes == small.events.approx_bytes
