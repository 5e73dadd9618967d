"""Prometheus collectors, built from the metrics contract (``contracts/metrics.yaml``) and from
nowhere else. Callers record by name where the event happens; a label value outside its allowed
values, or past its label's cardinality budget, is recorded as ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from llorch import __version__

OTHER = "other"
# Resolved children per (metric, label values as given); past this many, resolve every time.
_MAX_CACHED_CHILDREN = 4096


class Metrics:
    """One registry per app, so that apps in one process (tests) do not share series."""

    def __init__(self, contract: Mapping[str, Any]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("llorch_build", "llorch build information", registry=self.registry).info(
            {"version": __version__}
        )
        self._label_rules: Mapping[str, Mapping[str, Any]] = contract["labels"]
        self._seen: dict[str, set[str]] = {name: set() for name in self._label_rules}
        self._labels: dict[str, tuple[str, ...]] = {}
        self._collectors: dict[str, Counter | Gauge | Histogram] = {}
        # Folding is stable (a value once seen stays seen, a value folded into `other` stays
        # there), so the child a set of label values resolves to never changes: resolving it
        # costs more than the record itself, hence the cache.
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        for spec in contract["metrics"]:
            name, labels = spec["name"], tuple(spec["labels"])
            unknown = set(labels) - set(self._label_rules)
            if unknown:
                raise ValueError(f"metric {name}: labels {sorted(unknown)} are not in the contract")
            self._labels[name] = labels
            kind = spec["type"]
            # prometheus_client appends _total to counters itself.
            if kind == "counter":
                self._collectors[name] = Counter(
                    name.removesuffix("_total"), spec["help"], labels, registry=self.registry
                )
            elif kind == "gauge":
                self._collectors[name] = Gauge(name, spec["help"], labels, registry=self.registry)
            elif kind == "histogram":
                self._collectors[name] = Histogram(
                    name, spec["help"], labels, buckets=spec["buckets"], registry=self.registry
                )
            else:
                raise ValueError(f"metric {name}: unknown type {kind!r}")

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._child(name, labels).inc(amount)

    def dec(self, name: str, amount: float = 1, **labels: str) -> None:
        self._child(name, labels).dec(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).observe(value)

    def setter(self, name: str, **labels: str) -> Callable[[float], None]:
        """``set`` of one gauge series, resolved now, for a caller that sets it again and
        again: the series a set of label values resolves to never changes."""
        setter: Callable[[float], None] = self._child(name, labels).set
        return setter

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _child(self, name: str, labels: Mapping[str, str]) -> Any:
        key = (name, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            child = self._resolve(name, labels)
            if len(self._children) < _MAX_CACHED_CHILDREN:
                self._children[key] = child
        return child

    def _resolve(self, name: str, labels: Mapping[str, str]) -> Any:
        collector = self._collectors[name]
        wanted = self._labels[name]
        if set(labels) != set(wanted):
            raise ValueError(f"metric {name} takes labels {list(wanted)}, got {sorted(labels)}")
        if not wanted:
            return collector
        return collector.labels(**{k: self._fold(k, str(v)) for k, v in labels.items()})

    def _fold(self, label: str, value: str) -> str:
        rule = self._label_rules[label]
        if "values" in rule:
            return value if value in rule["values"] else OTHER
        seen = self._seen[label]
        if value in seen:
            return value
        if len(seen) >= rule["budget"]:
            return OTHER
        seen.add(value)
        return value
