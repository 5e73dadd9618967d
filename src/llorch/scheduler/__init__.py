"""Admission queues, dispatch, the task state machine and per-task event streams."""

from llorch.scheduler.service import Admission, Caller, Scheduler

__all__ = ["Admission", "Caller", "Scheduler"]
