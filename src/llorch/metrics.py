"""Prometheus objects. For now the process collectors and ``llorch_build_info``; the metrics
contract (``contracts/metrics.yaml``) and the task metrics built from it come with issue 6."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from llorch import __version__


class Metrics:
    """One registry per app, so that apps in one process (tests) do not share series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("llorch_build", "llorch build information", registry=self.registry).info(
            {"version": __version__}
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
