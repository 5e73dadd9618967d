"""Typed, frozen settings, defaulted in one place.

Settings are built from a mapping (the parsed configuration file, already validated against
``contracts/config.schema.json`` by :func:`llorch.contracts.load_config`) and from an injected
environment mapping. Nothing else in llorch reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

Profile = Literal["dev", "test", "prod"]
QueuePolicy = Literal["reject", "drop-lru"]
FlowKind = Literal["key", "session", "header"]
TieBreak = Literal["random", "replica_order"]
FailureMode = Literal["none", "before_first_token", "mid_stream", "hang", "down"]
EngineKind = Literal["mock", "llamacpp", "vllm", "tgi", "openai"]
HTTP_ENGINES: tuple[EngineKind, ...] = ("llamacpp", "vllm", "tgi", "openai")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    profile: Profile = "dev"
    data_dir: str = "var"
    max_body_bytes: int = 1_048_576
    # The connection guard (llorch.api.http): a request head above max_head_bytes is answered
    # 431; a head or body not received in time 408; max_connections 0 means the descriptor
    # limit less 256.
    max_head_bytes: int = 32_768
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 0
    # The listen queue of connections the kernel has completed and llorch not yet accepted
    # (uvicorn's default; the kernel caps it at net.core.somaxconn). A burst of connections
    # larger than this is dropped and retried by the clients after a second or more.
    backlog: int = 2048
    heartbeat_s: float = 15.0
    shutdown_grace_s: float = 10.0
    # Finished tasks whose full event buffer stays in memory for late attach, at most this many
    # and at most this many bytes of them (estimated); older ones are replayed from their trace
    # artifact, or only their terminal event, rebuilt from the database.
    streams_retained: int = 1000
    streams_retained_bytes: int = 32 * 1024 * 1024
    metrics_every_tokens: int = 16
    # How often the tokens of running tasks are checkpointed, so a restart charges a task it
    # cut short for what it produced (0: never).
    progress_interval_ms: int = 1000
    storage_busy_timeout_ms: int = 5000
    # A client that closes its stream cancels the task (off: the task runs on and can be
    # re-attached with Last-Event-ID).
    cancel_on_disconnect: bool = False
    # An SSE client that falls this many events behind the task, or whose socket accepts
    # nothing for stream_write_timeout_s, is disconnected (the task runs on).
    stream_max_lag_events: int = 4096
    stream_write_timeout_s: float = 30.0


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


Scope = Literal["data", "control", "metrics"]
SCOPES: tuple[Scope, ...] = ("data", "control", "metrics")


@dataclass(frozen=True)
class RateLimit:
    per_s: float
    burst: int


@dataclass(frozen=True)
class ApiKey:
    """One API key. The key itself is never configured in clear: ``sha256`` is the hex digest
    of it, or the key is read (and hashed at once) from the environment variable ``key_env`` or
    the file ``key_file`` by :meth:`Settings.with_overrides`."""

    name: str
    scopes: tuple[Scope, ...]
    sha256: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    rate_limit: RateLimit | None = None
    # Sessions created with this key never get more than this.
    budgets: Budget | None = None


@dataclass(frozen=True)
class AuthSettings:
    keys: tuple[ApiKey, ...] = ()
    # Whether /openapi.json and the Swagger UI are served without a key; None: only while
    # authentication is off.
    public_docs: bool | None = None

    @property
    def serves_docs(self) -> bool:
        return not self.keys if self.public_docs is None else self.public_docs


@dataclass(frozen=True)
class Price:
    input_per_1k: float
    output_per_1k: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """What ``tokens_in`` prompt and ``tokens_out`` generated tokens cost: the one formula
        for reservations (the worst case) and for charges (the usage)."""
        return round((tokens_in * self.input_per_1k + tokens_out * self.output_per_1k) / 1000, 9)


@dataclass(frozen=True)
class PricingSettings:
    currency: str = "USD"
    default: Price = Price(input_per_1k=0.0005, output_per_1k=0.0015)
    models: Mapping[str, Price] = field(default_factory=dict)

    def price_for(self, model: str) -> Price:
        return self.models.get(model, self.default)


@dataclass(frozen=True)
class DatabaseSettings:
    """Where tasks, sessions, budgets and artifact metadata live: a PostgreSQL ``url``
    (``postgresql://user@host:port/dbname``), or None for SQLite under ``server.data_dir``."""

    url: str | None = field(default=None, repr=False)
    # PostgreSQL only. The most one call to the database may take: connecting (libpq's
    # connect_timeout, whole seconds, at least 2), a statement (statement_timeout), a send the
    # server does not acknowledge (tcp_user_timeout), a silent connection (TCP keepalives) and
    # the wait for a pooled connection. Past it the call is refused STORAGE_UNAVAILABLE.
    timeout_ms: int = 5000
    # While the database cannot be reached: how often a new connection is tried (off the
    # event loop), and the Retry-After of what is refused meanwhile. While it can: how often
    # an idle server checks that it still can (so readiness notices with no traffic).
    retry_ms: int = 1000
    # PostgreSQL only. This instance's name among those on the database (default: the host
    # name and the port), and how long after its last heartbeat (every retry_ms) an instance
    # counts as gone: a start-up reconciles the tasks of gone instances and its own, never a
    # live instance's.
    instance_id: str | None = None
    instance_ttl_ms: int = 10_000
    # PostgreSQL only. How often a pool's dispatcher looks at the shared queue without being
    # woken by an admission of its own (tasks admitted elsewhere, slots freed elsewhere, wait
    # limits), and how often an instance looks for instances whose heartbeat expired, to end
    # their running tasks (ORCH-STATE-0030, ORCH-STATE-0035).
    poll_ms: int = 100
    sweep_ms: int = 1000

    @property
    def shown(self) -> str | None:
        """The URL without its password, for logs and messages."""
        return None if self.url is None else without_password(self.url)


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
class FairnessSettings:
    """Round-robin inside a priority band across flows: the API key (``key``), the session, or
    the value of ``header``; a flow gets ``weights[flow]`` dispatches a round (1 when absent)."""

    flow: FlowKind = "key"
    header: str | None = None
    weights: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueSettings:
    capacity: int = 100
    policy: QueuePolicy = "reject"
    # While interactive tasks wait, batch still gets at least this share of the dispatches.
    batch_min_share: float = 0.0
    fairness: FairnessSettings = FairnessSettings()
    # The longest a task may wait in the queue (None: no limit; a task may ask for less).
    max_wait_ms: int | None = None


@dataclass(frozen=True)
class PlacementSettings:
    """Cache-aware placement: prompts are hashed in blocks of ``prefix_block_chars``; the map of
    which replica served which prefix last holds at most ``prefix_map_bytes``."""

    prefix_block_chars: int = 256
    prefix_map_bytes: int = 4 * 1024 * 1024
    # Among equally loaded replicas: a random one (misses spread), or the first listed one
    # (reproducible placement).
    tie_break: TieBreak = "random"


@dataclass(frozen=True)
class TimeoutSettings:
    """Limits of one engine call; the silence allowed between chunks is ``decode_timeout_ms``."""

    connect_ms: int = 2_000
    first_token_ms: int = 30_000
    total_ms: int = 600_000


@dataclass(frozen=True)
class RetrySettings:
    """Retries before the first token only: ``attempts`` counts the first try. ``requeues``:
    how many times an engine's own 429/503 may send a task back to the queue (ORCH-ENG-0015)."""

    attempts: int = 2
    backoff_ms: int = 100
    max_backoff_ms: int = 2_000
    requeues: int = 3


@dataclass(frozen=True)
class BreakerSettings:
    """A replica's circuit opens after ``failure_threshold`` consecutive failed calls; after
    ``cooldown_ms`` one health probe decides whether it closes again."""

    failure_threshold: int = 3
    cooldown_ms: int = 5_000


@dataclass(frozen=True)
class PoolSettings:
    id: str = "default"
    engine: EngineKind = "mock"
    model: str = "mock-small"
    # Models a reload may switch the pool to (the pool's own model is always one).
    models: tuple[str, ...] = ()
    # Mock pools: how many replicas. HTTP engines: one replica per endpoint (base URL).
    replicas: int = 2
    endpoints: tuple[str, ...] = ()
    # The model name the engine serves (vLLM checks it); the pool's model when absent.
    served_model: str | None = None
    slots_per_replica: int = 2
    # HTTP engines that report their slots (llama.cpp /props) override slots_per_replica.
    discover_slots: bool = True
    # The name of the environment variable holding the engine's API key (never the key).
    api_key_env: str | None = None
    # Filled from the environment by Settings.with_overrides only.
    api_key: str | None = field(default=None, repr=False)
    # Fields sent as they are in every request to the engine (e.g. ignore_eos, top_k).
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    health_interval_ms: int = 1_000
    max_context: int = 8192
    max_tokens_out: int = 4096
    decode_timeout_ms: int = 30_000
    timeouts: TimeoutSettings = TimeoutSettings()
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    queue: QueueSettings = QueueSettings()
    placement: PlacementSettings = PlacementSettings()
    mock: MockSettings = MockSettings()

    @property
    def loadable_models(self) -> tuple[str, ...]:
        """The pool's own model first, then the others a reload may switch to."""
        return tuple(dict.fromkeys((self.model, *self.models)))

    @property
    def replica_count(self) -> int:
        return len(self.endpoints) if self.engine in HTTP_ENGINES else self.replicas


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    sessions: SessionSettings = SessionSettings()
    budgets: BudgetSettings = BudgetSettings()
    pricing: PricingSettings = PricingSettings()
    artifacts: ArtifactSettings = ArtifactSettings()
    pools: tuple[PoolSettings, ...] = (PoolSettings(),)
    auth: AuthSettings = AuthSettings()
    database: DatabaseSettings = DatabaseSettings()

    @property
    def database_path(self) -> Path:
        """One database file per profile, so profiles never share state."""
        return Path(self.server.data_dir) / f"llorch-{self.server.profile}.sqlite3"

    @property
    def instance_id(self) -> str:
        """This instance's name on a shared database: ``database.instance_id``, else the host
        name and the port (a restart on the same port is the same instance)."""
        return self.database.instance_id or f"{socket.gethostname()}:{self.server.port}"

    @property
    def storage_shown(self) -> str:
        """Where state lives, for logs: the database URL without its password, or the file."""
        return self.database.shown or str(self.database_path)

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
        auth_raw = raw.get("auth", {})
        auth = AuthSettings(
            keys=tuple(_api_key(k) for k in auth_raw.get("keys", [])),
            public_docs=auth_raw.get("public_docs"),
        )
        return cls(
            server=server,
            sessions=sessions,
            budgets=budgets,
            pricing=pricing,
            artifacts=artifacts,
            pools=pools,
            auth=auth,
            database=_database(raw.get("database", {})),
        )

    def with_overrides(self, environ: Mapping[str, str]) -> Settings:
        """Apply ``LLORCH_HOST``, ``LLORCH_PORT``, ``LLORCH_PROFILE``, ``LLORCH_DATA_DIR`` and
        ``LLORCH_DATABASE_URL`` (which may carry a password; empty: SQLite)."""
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
        keys = tuple(_resolve_key(k, environ) for k in self.auth.keys)
        pools = tuple(_with_engine_key(p, environ) for p in self.pools)
        return dataclasses.replace(
            self.with_server(**changes),
            auth=dataclasses.replace(self.auth, keys=keys),
            pools=pools,
            database=_database_from_env(environ, self.database),
        )

    def with_server(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, server=dataclasses.replace(self.server, **changes))

    def pool(self, pool_id: str) -> PoolSettings | None:
        return next((p for p in self.pools if p.id == pool_id), None)


_D = TypeVar("_D")


def _merge(base: _D, raw: Mapping[str, Any]) -> _D:
    return dataclasses.replace(base, **raw)  # type: ignore[type-var]


def _database(raw: Mapping[str, Any]) -> DatabaseSettings:
    """The file's database section; its URL must not carry a password (secrets live only in
    the environment)."""
    url = raw.get("url")
    if url is not None and _has_password(url):
        raise ValueError(
            "configuration key database.url: the URL carries a password; put the password in "
            "LLORCH_DATABASE_URL (or libpq's PGPASSWORD or ~/.pgpass), not in the file"
        )
    keys = ("timeout_ms", "retry_ms", "instance_ttl_ms", "poll_ms", "sweep_ms")
    timing = {k: int(raw[k]) for k in keys if k in raw}
    instance_id = raw.get("instance_id")
    return DatabaseSettings(
        url=url, instance_id=None if instance_id is None else str(instance_id), **timing
    )


def _database_from_env(environ: Mapping[str, str], current: DatabaseSettings) -> DatabaseSettings:
    if "LLORCH_DATABASE_URL" not in environ:
        return current
    url = environ["LLORCH_DATABASE_URL"]
    if not url:
        return dataclasses.replace(current, url=None)
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            f"LLORCH_DATABASE_URL: {without_password(url)!r} is not a postgresql:// URL"
        )
    return dataclasses.replace(current, url=url)


def _has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or "password" in parse_qs(parts.query)


def without_password(url: str) -> str:
    """``url`` with the password of its user part and of its query replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(
        f"{name}=***" if name == "password" else f"{name}={value}"
        for name, values in parse_qs(parts.query, keep_blank_values=True).items()
        for value in values
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def _with_engine_key(pool: PoolSettings, environ: Mapping[str, str]) -> PoolSettings:
    """The pool with its engine API key read from the variable ``api_key_env`` names."""
    if pool.api_key_env is None:
        return pool
    secret = environ.get(pool.api_key_env, "")
    if not secret:
        raise ValueError(f"pool {pool.id!r}: environment variable {pool.api_key_env} is unset")
    return dataclasses.replace(pool, api_key=secret)


def _pool(raw: Mapping[str, Any]) -> PoolSettings:
    mock_raw = dict(raw.get("mock", {}))
    failure_raw = dict(mock_raw.pop("failure", {"mode": "none"}))
    failure_raw["replicas"] = tuple(failure_raw.get("replicas", ()))
    mock_raw["fail_load_models"] = tuple(mock_raw.get("fail_load_models", ()))
    mock = _merge(MockSettings(), mock_raw)
    mock = dataclasses.replace(mock, failure=FailureSettings(**failure_raw))
    queue_raw = dict(raw.get("queue", {}))
    fairness = _merge(FairnessSettings(), queue_raw.pop("fairness", {}))
    queue = _merge(QueueSettings(), queue_raw)
    queue = dataclasses.replace(queue, fairness=fairness)
    nested: dict[str, Any] = {
        "timeouts": _merge(TimeoutSettings(), raw.get("timeouts", {})),
        "retry": _merge(RetrySettings(), raw.get("retry", {})),
        "breaker": _merge(BreakerSettings(), raw.get("breaker", {})),
        "placement": _merge(PlacementSettings(), raw.get("placement", {})),
    }
    flat = {k: v for k, v in raw.items() if k not in ("mock", "queue", *nested)}
    flat["models"] = tuple(raw.get("models", ()))
    flat["endpoints"] = tuple(str(url).rstrip("/") for url in raw.get("endpoints", ()))
    return dataclasses.replace(PoolSettings(), **flat, **nested, queue=queue, mock=mock)


def _api_key(raw: Mapping[str, Any]) -> ApiKey:
    rate = raw.get("rate_limit")
    budgets = raw.get("budgets")
    return ApiKey(
        name=raw["name"],
        scopes=tuple(raw["scopes"]),
        sha256=raw.get("sha256"),
        key_env=raw.get("key_env"),
        key_file=raw.get("key_file"),
        rate_limit=RateLimit(per_s=rate["per_s"], burst=rate.get("burst", 1)) if rate else None,
        budgets=_merge(BudgetSettings().max, budgets) if budgets is not None else None,
    )


def _resolve_key(key: ApiKey, environ: Mapping[str, str]) -> ApiKey:
    """The key with its secret read from the environment or its file and kept only hashed."""
    if key.sha256 is not None:
        return key
    if key.key_env is not None:
        secret = environ.get(key.key_env, "")
        if not secret:
            raise ValueError(f"auth key {key.name!r}: environment variable {key.key_env} is unset")
    else:
        assert key.key_file is not None  # the schema requires one of the three
        try:
            secret = Path(key.key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"auth key {key.name!r}: cannot read {key.key_file}: {exc}") from exc
        if not secret:
            raise ValueError(f"auth key {key.name!r}: {key.key_file} is empty")
    digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
    return dataclasses.replace(key, sha256=digest)
