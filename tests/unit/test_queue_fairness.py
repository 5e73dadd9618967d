"""PoolQueue across flows: round-robin inside a band, weights, batch's minimum share, the
drop-lru victim from the heaviest flow, and positions that are the real dispatch order."""

from __future__ import annotations

import copy
import random

import pytest

from llorch.errors import AdmissionReject
from llorch.scheduler.queue import PRIORITIES, PoolQueue, Priority, batch_every


def flow_queue(
    capacity: int = 100_000,
    *,
    weights: dict[str, int] | None = None,
    batch_min_share: float = 0.0,
    policy: str = "reject",
) -> PoolQueue[str]:
    # Items are "flow:n"; the flow is what comes before the colon.
    return PoolQueue(
        capacity,
        "drop-lru" if policy == "drop-lru" else "reject",
        flow_of=lambda item: item.split(":")[0],
        weights=weights,
        batch_min_share=batch_min_share,
    )


def drain(queue: PoolQueue[str]) -> list[str]:
    order = []
    while (item := queue.pop()) is not None:
        order.append(item)
    return order


@pytest.mark.req("ORCH-DATA-0026")
def test_a_flood_of_one_key_does_not_hold_back_another_keys_tasks() -> None:
    queue = flow_queue()
    for n in range(1000):
        queue.push(f"A:{n}", "batch")
    for n in range(20):
        queue.push(f"B:{n}", "batch")

    order = drain(queue)

    # The bound of a round-robin over two flows of weight 1: B's k-th task (0-based) is
    # dispatched at most at dispatch 2k + 1, so all 20 within the first 40, not after 1000.
    b_at = [order.index(f"B:{n}") for n in range(20)]
    assert all(at <= 2 * n + 1 for n, at in enumerate(b_at)), b_at
    assert max(b_at) < 40
    # FIFO within each flow.
    assert [i for i in order if i.startswith("A:")] == [f"A:{n}" for n in range(1000)]


@pytest.mark.req("ORCH-DATA-0027")
def test_weights_3_to_1_give_a_3_to_1_share_of_dispatches() -> None:
    queue = flow_queue(weights={"A": 3, "B": 1})
    for n in range(600):
        queue.push(f"B:{n}", "batch")
        queue.push(f"A:{n}", "batch")

    order = drain(queue)[:400]

    # Within one round (3 + 1 dispatches) of exact: 300 of 400, ±3.
    share_a = sum(1 for item in order if item.startswith("A:"))
    assert abs(share_a - 300) <= 3, share_a
    # And in every window of four dispatches, three are A's.
    for start in range(0, 400, 4):
        window = order[start : start + 4]
        assert sum(1 for i in window if i.startswith("A:")) == 3, (start, window)


@pytest.mark.req("ORCH-DATA-0028")
@pytest.mark.parametrize("share", [0.1, 0.25, 0.3, 0.5])
def test_steady_interactive_load_leaves_batch_its_minimum_share(share: float) -> None:
    queue = flow_queue(batch_min_share=share)
    for n in range(500):
        queue.push(f"batch:{n}", "batch")
    for n in range(5):
        queue.push(f"int:{n}", "interactive")
    dispatched = []
    # A steady interactive stream: one arrives for every dispatch, so interactive always waits.
    for n in range(1000):
        queue.push(f"int:{n + 5}", "interactive")
        item = queue.pop()
        assert item is not None
        dispatched.append(item)

    batch = sum(1 for item in dispatched if item.startswith("batch:"))
    assert batch >= share * len(dispatched), (batch, share)
    # ... and not much more: the share is a floor, the rest still goes to interactive first.
    assert batch <= len(dispatched) / batch_every(share) + 1


@pytest.mark.req("ORCH-DATA-0020")
def test_without_a_share_interactive_stays_strictly_first() -> None:
    queue = flow_queue()
    queue.push("b:0", "batch")
    for n in range(50):
        queue.push(f"i:{n}", "interactive")
    assert drain(queue)[-1] == "b:0"


@pytest.mark.req("ORCH-DATA-0022")
def test_drop_lru_takes_its_victim_from_the_heaviest_flow() -> None:
    queue = flow_queue(4, policy="drop-lru", weights={"A": 1, "B": 1})
    for item in ("B:0", "A:0", "A:1", "A:2"):
        queue.push(item, "batch")
    # A holds three of four places: its oldest goes first, not B's (older) task.
    assert queue.victim_for("batch") == "A:0"


@pytest.mark.req("ORCH-DATA-0022")
def test_drop_lru_heaviness_is_per_unit_of_weight() -> None:
    queue = flow_queue(4, policy="drop-lru", weights={"A": 4, "B": 1})
    for item in ("A:0", "A:1", "A:2", "B:0"):
        queue.push(item, "batch")
    # A: 3 tasks for weight 4 (0.75 each); B: 1 for weight 1: B is the heaviest.
    assert queue.victim_for("interactive") == "B:0"


def random_queue(rng: random.Random) -> tuple[PoolQueue[str], list[tuple[str, Priority]]]:
    queue = flow_queue(
        weights={f: rng.randint(1, 4) for f in "ABCD"},
        batch_min_share=rng.choice([0.0, 0.1, 0.34, 0.5]),
    )
    queued: list[tuple[str, Priority]] = []
    for n in range(rng.randint(0, 40)):
        op = rng.random()
        if op < 0.6 or not queued:
            item, priority = f"{rng.choice('ABCD')}:{n}", rng.choice(PRIORITIES)
            queue.push(item, priority)
            queued.append((item, priority))
        elif op < 0.85:
            popped = queue.pop()
            queued = [q for q in queued if q[0] != popped]
        else:
            gone = queued.pop(rng.randrange(len(queued)))
            assert queue.remove(*gone)
    return queue, queued


@pytest.mark.req("ORCH-DATA-0029")
def test_positions_are_the_dispatch_order_whatever_came_before() -> None:
    rng = random.Random(19)
    for _ in range(400):
        queue, queued = random_queue(rng)
        positions = {item: queue.position(item, priority) for item, priority in queued}
        order = list(queue)
        assert drain(copy.deepcopy(queue)) == order
        assert positions == {item: order.index(item) for item, _ in queued}


@pytest.mark.req("ORCH-DATA-0029")
def test_the_position_promised_to_a_newcomer_is_the_one_it_gets() -> None:
    rng = random.Random(23)
    for _ in range(400):
        queue, queued = random_queue(rng)
        flow, priority = rng.choice("ABCDE"), rng.choice(PRIORITIES)
        victim = rng.choice(queued)[0] if queued and rng.random() < 0.5 else None
        promised = queue.position_if_pushed(flow, priority, victim)
        after = copy.deepcopy(queue)
        if victim is not None:
            assert after.remove(victim, next(p for i, p in queued if i == victim))
        after.push(f"{flow}:new", priority)
        assert drain(after).index(f"{flow}:new") == promised


@pytest.mark.req("ORCH-ENG-0015", "ORCH-DATA-0029")
def test_a_task_sent_back_is_its_bands_next_and_the_order_is_as_before() -> None:
    rng = random.Random(14)
    checked = 0
    for _ in range(400):
        queue, queued = random_queue(rng)
        before = list(queue)
        head = queue.pop()
        if head is None:
            continue
        priority = next(p for i, p in queued if i == head)
        queue.push_front(head, priority)
        order = list(queue)
        in_band = {i for i, p in queued if p == priority}
        # Its band's dispatch order is the one before it was taken: it comes first again.
        assert [i for i in order if i in in_band] == [i for i in before if i in in_band]
        assert next(i for i in order if i in in_band) == head
        # Positions stay the real dispatch order, the task sent back counted in the depth.
        assert len(queue) == len(queued)
        positions = {item: queue.position(item, p) for item, p in queued}
        assert positions == {item: order.index(item) for item, _ in queued}
        assert drain(copy.deepcopy(queue)) == order
        checked += 1
    assert checked > 300


@pytest.mark.req("ORCH-ENG-0015")
def test_a_task_sent_back_is_never_refused_for_capacity() -> None:
    queue = flow_queue(capacity=2)
    for item in ("A:0", "B:1"):
        queue.push(item, "interactive")
    head = queue.pop()
    assert head == "A:0"
    queue.push("B:2", "interactive")  # the place it left was taken meanwhile
    queue.push_front(head, "interactive")
    assert len(queue) == 3
    assert queue.position("A:0", "interactive") == 0
    with pytest.raises(AdmissionReject):
        queue.victim_for("interactive")  # newcomers see the queue full
