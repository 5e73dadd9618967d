"""Admission queues, dispatch, the task state machine and per-task event streams."""

from llorch.scheduler.caller import Caller
from llorch.scheduler.service import Admission, Scheduler

__all__ = ["Admission", "Caller", "Scheduler"]
