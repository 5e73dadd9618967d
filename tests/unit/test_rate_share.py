"""A key's rate limit shared by the instances of a cluster: each enforces its share of it
(ORCH-STATE-0053)."""

from __future__ import annotations

import pytest

from llorch.api.auth import TokenBucket
from llorch.config import RateLimit


@pytest.mark.req("ORCH-STATE-0053")
def test_an_instance_allows_its_share_of_the_rate_and_of_the_burst() -> None:
    bucket = TokenBucket(RateLimit(per_s=10, burst=4), now_s=0.0)

    assert [bucket.take(0.0, share=2) for _ in range(2)] == [0.0, 0.0]
    # Half the burst is spent; a token comes back at half the rate: 5 a second.
    assert bucket.take(0.0, share=2) == pytest.approx(0.2)
    assert bucket.take(0.2, share=2) == 0.0


@pytest.mark.req("ORCH-STATE-0053")
def test_every_instance_allows_at_least_one_request_of_a_burst() -> None:
    bucket = TokenBucket(RateLimit(per_s=1, burst=1), now_s=0.0)

    assert bucket.take(0.0, share=3) == 0.0
    assert bucket.take(0.0, share=3) == pytest.approx(3.0)
