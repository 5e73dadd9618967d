"""Typed, frozen settings, defaulted in one place.

Settings are built from a mapping (the parsed configuration file, already validated against
``contracts/config.schema.json`` by :func:`llorch.contracts.load_config`) and from an injected
environment mapping. Nothing else in llorch reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

Profile = Literal["dev", "test", "prod"]
QueuePolicy = Literal["reject", "drop-lru"]
FailureMode = Literal["none", "before_first_token", "mid_stream", "hang", "down"]


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    profile: Profile = "dev"
    data_dir: str = "var"
    max_body_bytes: int = 1_048_576
    heartbeat_s: float = 15.0
    shutdown_grace_s: float = 10.0
    # Finished tasks whose full event buffer stays in memory for late attach; older ones replay
    # only their terminal event, rebuilt from the database.
    streams_retained: int = 1000
    metrics_every_tokens: int = 16
    storage_busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class SessionSettings:
    ttl_ms: int = 600_000
    max_ttl_ms: int = 86_400_000
    max_turns: int = 1000


@dataclass(frozen=True)
class Budget:
    tokens: int
    time_ms: int
    cost: float


@dataclass(frozen=True)
class BudgetSettings:
    default: Budget = Budget(tokens=200_000, time_ms=3_600_000, cost=10.0)
    max: Budget = Budget(tokens=10_000_000, time_ms=86_400_000, cost=1000.0)


@dataclass(frozen=True)
class Price:
    input_per_1k: float
    output_per_1k: float


@dataclass(frozen=True)
class PricingSettings:
    currency: str = "USD"
    default: Price = Price(input_per_1k=0.0005, output_per_1k=0.0015)
    models: Mapping[str, Price] = field(default_factory=dict)

    def price_for(self, model: str) -> Price:
        return self.models.get(model, self.default)


@dataclass(frozen=True)
class ArtifactSettings:
    max_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class FailureSettings:
    mode: FailureMode = "none"
    after_tokens: int = 0
    # Replica indexes the failure applies to; empty means every replica.
    replicas: tuple[int, ...] = ()

    def applies_to(self, index: int) -> bool:
        return self.mode != "none" and (not self.replicas or index in self.replicas)


@dataclass(frozen=True)
class MockSettings:
    ttft_ms: float = 20.0
    tokens_per_s: float = 200.0
    # False runs every completion to max_tokens, like llama.cpp's ignore_eos.
    eos: bool = True
    # Models whose replicas fail their health check after a reload (failure injection).
    fail_load_models: tuple[str, ...] = ()
    failure: FailureSettings = FailureSettings()


@dataclass(frozen=True)
class QueueSettings:
    capacity: int = 100
    policy: QueuePolicy = "reject"


@dataclass(frozen=True)
class PoolSettings:
    id: str = "default"
    engine: Literal["mock"] = "mock"
    model: str = "mock-small"
    # Models a reload may switch the pool to (the pool's own model is always one).
    models: tuple[str, ...] = ()
    replicas: int = 2
    slots_per_replica: int = 2
    max_context: int = 8192
    max_tokens_out: int = 4096
    decode_timeout_ms: int = 30_000
    queue: QueueSettings = QueueSettings()
    mock: MockSettings = MockSettings()

    @property
    def loadable_models(self) -> tuple[str, ...]:
        """The pool's own model first, then the others a reload may switch to."""
        return tuple(dict.fromkeys((self.model, *self.models)))


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    sessions: SessionSettings = SessionSettings()
    budgets: BudgetSettings = BudgetSettings()
    pricing: PricingSettings = PricingSettings()
    artifacts: ArtifactSettings = ArtifactSettings()
    pools: tuple[PoolSettings, ...] = (PoolSettings(),)

    @property
    def database_path(self) -> Path:
        """One database file per profile, so profiles never share state."""
        return Path(self.server.data_dir) / f"llorch-{self.server.profile}.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        """Artifact bodies, named by digest; one directory per profile, like the database."""
        return Path(self.server.data_dir) / f"artifacts-{self.server.profile}"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Settings:
        """Build settings from a schema-valid mapping; absent keys keep their defaults."""
        server = _merge(ServerSettings(), raw.get("server", {}))
        sessions = _merge(SessionSettings(), raw.get("sessions", {}))
        budgets_raw = raw.get("budgets", {})
        budgets = BudgetSettings(
            default=_merge(BudgetSettings().default, budgets_raw.get("default", {})),
            max=_merge(BudgetSettings().max, budgets_raw.get("max", {})),
        )
        pricing_raw = raw.get("pricing", {})
        pricing = PricingSettings(
            currency=pricing_raw.get("currency", PricingSettings().currency),
            default=Price(**pricing_raw["default"])
            if "default" in pricing_raw
            else PricingSettings().default,
            models={str(name): Price(**p) for name, p in pricing_raw.get("models", {}).items()},
        )
        pools = tuple(_pool(p) for p in raw.get("pools", [{}]))
        artifacts = _merge(ArtifactSettings(), raw.get("artifacts", {}))
        return cls(
            server=server,
            sessions=sessions,
            budgets=budgets,
            pricing=pricing,
            artifacts=artifacts,
            pools=pools,
        )

    def with_overrides(self, environ: Mapping[str, str]) -> Settings:
        """Apply ``LLORCH_HOST``, ``LLORCH_PORT``, ``LLORCH_PROFILE`` and ``LLORCH_DATA_DIR``."""
        changes: dict[str, Any] = {}
        if "LLORCH_HOST" in environ:
            changes["host"] = environ["LLORCH_HOST"]
        if "LLORCH_PORT" in environ:
            port = environ["LLORCH_PORT"]
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"LLORCH_PORT: {port!r} is not a port number (0-65535)")
            changes["port"] = int(port)
        if "LLORCH_PROFILE" in environ:
            profile = environ["LLORCH_PROFILE"]
            if profile not in ("dev", "test", "prod"):
                raise ValueError(f"LLORCH_PROFILE: {profile!r} is not one of dev, test, prod")
            changes["profile"] = profile
        if "LLORCH_DATA_DIR" in environ:
            changes["data_dir"] = environ["LLORCH_DATA_DIR"]
        return self.with_server(**changes)

    def with_server(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, server=dataclasses.replace(self.server, **changes))

    def pool(self, pool_id: str) -> PoolSettings | None:
        return next((p for p in self.pools if p.id == pool_id), None)


_D = TypeVar("_D")


def _merge(base: _D, raw: Mapping[str, Any]) -> _D:
    return dataclasses.replace(base, **raw)  # type: ignore[type-var]


def _pool(raw: Mapping[str, Any]) -> PoolSettings:
    mock_raw = dict(raw.get("mock", {}))
    failure_raw = dict(mock_raw.pop("failure", {"mode": "none"}))
    failure_raw["replicas"] = tuple(failure_raw.get("replicas", ()))
    mock_raw["fail_load_models"] = tuple(mock_raw.get("fail_load_models", ()))
    mock = _merge(MockSettings(), mock_raw)
    mock = dataclasses.replace(mock, failure=FailureSettings(**failure_raw))
    queue = _merge(QueueSettings(), raw.get("queue", {}))
    flat = {k: v for k, v in raw.items() if k not in ("mock", "queue")}
    flat["models"] = tuple(raw.get("models", ()))
    return dataclasses.replace(PoolSettings(), **flat, queue=queue, mock=mock)
