"""PoolQueue: two priority lanes, a bound, and the two policies for a full queue."""

from __future__ import annotations

from typing import Literal

import pytest

from llorch.errors import AdmissionReject, QueueFullDropLru
from llorch.scheduler.queue import PRIORITIES, PoolQueue, Priority


def filled(
    capacity: int, policy: Literal["reject", "drop-lru"], *items: tuple[str, Priority]
) -> PoolQueue[str]:
    queue: PoolQueue[str] = PoolQueue(capacity, policy)
    for item, priority in items:
        queue.push(item, priority)
    return queue


@pytest.mark.req("ORCH-DATA-0020")
def test_interactive_lane_is_served_before_batch_and_each_lane_is_fifo() -> None:
    queue = filled(
        10,
        "reject",
        ("b1", "batch"),
        ("i1", "interactive"),
        ("b2", "batch"),
        ("i2", "interactive"),
        ("i3", "interactive"),
    )

    assert list(queue) == ["i1", "i2", "i3", "b1", "b2"]
    assert (queue.depth("interactive"), queue.depth("batch"), len(queue)) == (3, 2, 5)
    assert queue.peek() == "i1"
    popped = [queue.pop() for _ in range(5)]
    assert popped == ["i1", "i2", "i3", "b1", "b2"]
    assert queue.pop() is None
    assert queue.peek() is None


@pytest.mark.req("ORCH-DATA-0020")
def test_a_batch_task_waits_behind_interactive_tasks_that_arrive_later() -> None:
    queue = filled(10, "reject", ("b1", "batch"))
    queue.push("i1", "interactive")

    assert queue.position("b1", "batch") == 1
    assert queue.pop() == "i1"


@pytest.mark.req("ORCH-DATA-0021")
def test_reject_policy_refuses_a_newcomer_at_a_full_queue_and_changes_nothing() -> None:
    queue = filled(2, "reject", ("i1", "interactive"), ("b1", "batch"))

    for priority in PRIORITIES:
        with pytest.raises(AdmissionReject) as caught:
            queue.victim_for(priority)
        assert caught.value.code == "ADMISSION_REJECT"
        assert caught.value.retriable is True
        assert caught.value.policy_label == "reject"
    assert list(queue) == ["i1", "b1"]


@pytest.mark.req("ORCH-DATA-0020", "ORCH-DATA-0021")
def test_a_queue_below_capacity_admits_without_a_victim() -> None:
    queue = filled(2, "reject", ("i1", "interactive"))

    assert queue.victim_for("interactive") is None
    assert queue.victim_for("batch") is None
    queue.pop()
    assert filled(1, "drop-lru").victim_for("batch") is None


@pytest.mark.req("ORCH-DATA-0022")
def test_drop_lru_picks_the_oldest_lower_priority_task_first() -> None:
    queue = filled(
        4,
        "drop-lru",
        ("i1", "interactive"),
        ("b1", "batch"),
        ("i2", "interactive"),
        ("b2", "batch"),
    )

    # An interactive newcomer displaces a batch task before any interactive one.
    assert queue.victim_for("interactive") == "b1"
    # A batch newcomer displaces the oldest batch task.
    assert queue.victim_for("batch") == "b1"
    # Nothing changes until the caller removes the victim.
    assert len(queue) == 4


@pytest.mark.req("ORCH-DATA-0022")
def test_drop_lru_falls_back_to_the_oldest_task_of_the_same_priority() -> None:
    queue = filled(
        3, "drop-lru", ("i1", "interactive"), ("i2", "interactive"), ("i3", "interactive")
    )

    assert queue.victim_for("interactive") == "i1"


@pytest.mark.req("ORCH-DATA-0023")
def test_drop_lru_refuses_a_batch_newcomer_facing_only_interactive_tasks() -> None:
    queue = filled(2, "drop-lru", ("i1", "interactive"), ("i2", "interactive"))

    with pytest.raises(QueueFullDropLru) as caught:
        queue.victim_for("batch")
    assert caught.value.code == "QUEUE_FULL_DROP_LRU"
    assert caught.value.retriable is True
    assert caught.value.policy_label == "drop-lru"
    assert list(queue) == ["i1", "i2"]


@pytest.mark.req("ORCH-DATA-0020")
def test_position_counts_in_dispatch_order_and_is_none_when_not_queued() -> None:
    queue = filled(
        10,
        "reject",
        ("i1", "interactive"),
        ("b1", "batch"),
        ("i2", "interactive"),
        ("b2", "batch"),
    )

    assert queue.position("i1", "interactive") == 0
    assert queue.position("i2", "interactive") == 1
    assert queue.position("b1", "batch") == 2
    assert queue.position("b2", "batch") == 3
    assert queue.position("zz", "batch") is None
    # An item is looked up in the lane it was queued in only.
    assert queue.position("b1", "interactive") is None


@pytest.mark.req("ORCH-DATA-0020")
def test_remove_takes_an_item_out_of_its_lane_only() -> None:
    queue = filled(10, "reject", ("i1", "interactive"), ("b1", "batch"), ("b2", "batch"))

    assert queue.remove("b1", "interactive") is False
    assert queue.remove("i1", "interactive") is True
    assert queue.remove("i1", "interactive") is False
    assert queue.position("b2", "batch") == 1
    assert list(queue) == ["b1", "b2"]
    assert queue.remove("b1", "batch") is True
    assert list(queue) == ["b2"]
    assert len(queue) == 1
