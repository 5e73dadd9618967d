"""Configuration: a YAML file validated by contracts/config.schema.json, then typed settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from llorch.config import (
    Budget,
    FailureSettings,
    MockSettings,
    PoolSettings,
    Price,
    QueueSettings,
    ServerSettings,
    Settings,
)
from llorch.contracts import ConfigError, load_config, validate_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llorch.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.req("ORCH-DATA-0093")
def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, ""))

    assert settings == Settings()
    assert settings.server == ServerSettings()
    assert settings.pools == (PoolSettings(),)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)


@pytest.mark.req("ORCH-DATA-0093")
def test_absent_keys_keep_their_defaults(tmp_path: Path) -> None:
    settings = load_config(
        write(
            tmp_path,
            """
server: {port: 9000}
budgets:
  default: {tokens: 50}
pricing:
  models:
    big: {input_per_1k: 0.01, output_per_1k: 0.03}
pools:
  - id: fast
    model: m
    queue: {capacity: 4}
    mock:
      ttft_ms: 5
      failure: {mode: mid_stream, after_tokens: 3, replicas: [1]}
""",
        ),
    )

    assert settings.server == ServerSettings(port=9000)
    assert settings.budgets.default == Budget(tokens=50, time_ms=3_600_000, cost=10.0)
    assert settings.budgets.max == Settings().budgets.max
    assert settings.pricing.price_for("big") == Price(0.01, 0.03)
    assert settings.pricing.price_for("other") == Settings().pricing.default
    (pool,) = settings.pools
    assert pool == PoolSettings(
        id="fast",
        model="m",
        queue=QueueSettings(capacity=4, policy="reject"),
        mock=MockSettings(
            ttft_ms=5,
            tokens_per_s=200.0,
            failure=FailureSettings(mode="mid_stream", after_tokens=3, replicas=(1,)),
        ),
    )
    assert settings.pool("fast") is pool
    assert settings.pool("slow") is None


@pytest.mark.req("ORCH-DATA-0093")
@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("pools: [{id: a, model: m, queue: {policy: fifo}}]", "pools.0.queue.policy", "fifo"),
        ("server: {port: eighty}", "server.port", "not of type 'integer'"),
        ("server: {hots: x}", "server", "'hots' was unexpected"),
        ("colour: blue", "(top level)", "'colour' was unexpected"),
        ("pools: [{id: a}]", "pools.0", "'model' is a required property"),
        ("pools: []", "pools", "should be non-empty"),
        ("sessions: {ttl_ms: 5}", "sessions.ttl_ms", "less than the minimum of 1000"),
        ("server: {backlog: 0}", "server.backlog", "less than the minimum of 1"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key_and_the_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))

    message = str(caught.value)
    assert f"configuration key {key}:" in message
    assert problem in message


@pytest.mark.req("ORCH-DATA-0093")
def test_several_problems_are_reported_from_the_first_key(tmp_path: Path) -> None:
    text = "pools: [{id: a, model: m, replicas: 0}, {id: b, model: m, replicas: -1}]"

    with pytest.raises(ConfigError, match=r"configuration key pools\.0\.replicas:"):
        load_config(write(tmp_path, text))


@pytest.mark.req("ORCH-DATA-0093")
def test_problems_under_keys_of_mixed_types_are_still_a_config_error(tmp_path: Path) -> None:
    # YAML reads the key 1 as an integer and the key a as a string: both prices are bad.
    text = """
pricing:
  models:
    1: {input_per_1k: -1, output_per_1k: 0}
    a: {input_per_1k: -1, output_per_1k: 0}
"""

    with pytest.raises(
        ConfigError, match=r"configuration key pricing\.models\.(1|a)\.input_per_1k"
    ):
        load_config(write(tmp_path, text))


@pytest.mark.req("ORCH-DATA-0093")
def test_duplicate_pool_ids_are_refused(tmp_path: Path) -> None:
    text = "pools: [{id: a, model: m}, {id: b, model: m}, {id: a, model: n}]"

    with pytest.raises(ConfigError, match=r"pools: duplicate pool ids \['a'\]"):
        load_config(write(tmp_path, text))


@pytest.mark.req("ORCH-DATA-0093")
def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(write(tmp_path, "pools: [\n"))


@pytest.mark.req("ORCH-DATA-0094")
def test_each_profile_has_its_own_database_file(tmp_path: Path) -> None:
    base = Settings().with_server(data_dir=str(tmp_path))

    paths = {base.with_server(profile=p).database_path for p in ("dev", "test", "prod")}

    assert len(paths) == 3
    assert base.database_path == tmp_path / "llorch-dev.sqlite3"
    assert all(p.parent == tmp_path for p in paths)


@pytest.mark.req("ORCH-DATA-0094")
def test_overrides_come_from_an_injected_environment() -> None:
    environ = {
        "LLORCH_HOST": "0.0.0.0",
        "LLORCH_PORT": "9090",
        "LLORCH_PROFILE": "prod",
        "LLORCH_DATA_DIR": "/srv/llorch",
        "HOME": "/root",
    }

    settings = Settings().with_overrides(environ)

    assert settings.server == ServerSettings(
        host="0.0.0.0", port=9090, profile="prod", data_dir="/srv/llorch"
    )
    assert settings.database_path == Path("/srv/llorch/llorch-prod.sqlite3")
    assert Settings().with_overrides({}) == Settings()


@pytest.mark.req("ORCH-STATE-0007")
def test_the_database_url_comes_from_the_file_and_the_environment_overrides_it(
    tmp_path: Path,
) -> None:
    assert Settings().database.url is None  # SQLite under data_dir
    assert Settings().storage_shown == str(Settings().database_path)
    from_file = load_config(write(tmp_path, "database: {url: 'postgresql://llorch@db:5432/a'}"))
    assert from_file.database.url == "postgresql://llorch@db:5432/a"

    env_url = "postgresql://llorch:s3cret@db:5432/b?sslmode=require"
    overridden = from_file.with_overrides({"LLORCH_DATABASE_URL": env_url})
    assert overridden.database.url == env_url
    assert overridden.storage_shown == "postgresql://llorch:***@db:5432/b?sslmode=require"
    assert "s3cret" not in repr(overridden)
    assert from_file.with_overrides({}).database == from_file.database
    assert from_file.with_overrides({"LLORCH_DATABASE_URL": ""}).database.url is None
    with pytest.raises(ValueError, match="LLORCH_DATABASE_URL: 'mysql://u:\\*\\*\\*@h/d'"):
        Settings().with_overrides({"LLORCH_DATABASE_URL": "mysql://u:pw@h/d"})


@pytest.mark.req("ORCH-STATE-0008")
@pytest.mark.parametrize(
    "url", ["postgresql://llorch:pw@db/a", "postgresql://llorch@db/a?password=pw"]
)
def test_a_password_in_the_file_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match=r"database\.url: the URL carries a password") as caught:
        load_config(write(tmp_path, f"database: {{url: '{url}'}}"))
    assert "pw" not in str(caught.value).replace("password", "")


@pytest.mark.req("ORCH-DATA-0093")
def test_a_database_url_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration key database\.url:"):
        load_config(write(tmp_path, "database: {url: 'sqlite:///x'}"))


def test_an_unknown_profile_override_is_refused() -> None:
    with pytest.raises(ValueError, match="LLORCH_PROFILE"):
        Settings().with_overrides({"LLORCH_PROFILE": "staging"})


@pytest.mark.req("ORCH-DATA-0026", "ORCH-DATA-0028")
def test_queue_fairness_and_placement_settings_are_read_and_checked() -> None:
    queue = {
        "batch_min_share": 0.2,
        "fairness": {"flow": "header", "header": "X-Tenant", "weights": {"acme": 3}},
    }
    raw = {
        "pools": [{"id": "p", "model": "m", "queue": queue, "placement": {"tie_break": "random"}}]
    }
    validate_config(raw)
    (pool,) = Settings.from_mapping(raw).pools
    assert (pool.queue.batch_min_share, pool.queue.capacity) == (0.2, 100)
    fairness = pool.queue.fairness
    assert (fairness.flow, fairness.header, dict(fairness.weights)) == (
        "header",
        "X-Tenant",
        {"acme": 3},
    )
    assert pool.placement.prefix_block_chars == 256

    refused = [
        {"fairness": {"flow": "header"}},  # which header?
        {"fairness": {"weights": {"acme": 0}}},
        {"batch_min_share": 0.6},
        {"fairness": {"flow": "tenant"}},
    ]
    for bad in refused:
        with pytest.raises(ConfigError):
            validate_config({"pools": [{"id": "p", "model": "m", "queue": bad}]})
