"""A circuit breaker per engine replica.

::

    closed ──(failure_threshold consecutive failures)──► open
    open ──(cooldown_s passed; the next health probe is the trial)──► half_open
    half_open ──(the probe succeeds)──► closed
    half_open ──(the probe fails)──► open (the cool-down starts again)

Only a closed circuit takes traffic. The trial in the half-open state is a health probe, not a
client's task, so no task is sent to a replica that is likely still broken. Time comes from an
injected :class:`llorch.clock.Clock`.
"""

from __future__ import annotations

from typing import Literal

from llorch.clock import Clock

BreakerState = Literal["closed", "open", "half_open"]

# The value of the state gauge (llorch_replica_breaker_state) for each state.
STATE_VALUE: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(self, *, failure_threshold: int, cooldown_s: float, clock: Clock) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self.state: BreakerState = "closed"
        self.consecutive_failures = 0
        self._opened_at = 0.0

    @property
    def allows_traffic(self) -> bool:
        return self.state == "closed"

    def record_success(self) -> None:
        """A call succeeded. Only a closed circuit counts it: open or half-open, the probe
        decides (a task that started before the circuit opened proves little)."""
        if self.state == "closed":
            self.consecutive_failures = 0

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive_failures >= self._threshold
        ):
            self._open()

    def trial_due(self) -> bool:
        """True, and half-open from now on, when an open circuit has cooled down."""
        if self.state == "open" and self._clock.monotonic_s() - self._opened_at >= self._cooldown_s:
            self.state = "half_open"
            return True
        return self.state == "half_open"

    def trial_result(self, ok: bool) -> None:
        """The outcome of the half-open trial (a health probe)."""
        if self.state != "half_open":
            return
        if ok:
            self.state = "closed"
            self.consecutive_failures = 0
        else:
            self._open()

    def _open(self) -> None:
        self.state = "open"
        self._opened_at = self._clock.monotonic_s()
