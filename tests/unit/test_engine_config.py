"""The pool/engine part of the configuration: engine types, endpoints, timeouts, keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llorch.config import BreakerSettings, RetrySettings, Settings, TimeoutSettings
from llorch.contracts import ConfigError, load_config, validate_config
from llorch.engines import build_engines
from llorch.engines.openai_http import OpenAIHttpEngine

LLAMA = """
pools:
  - id: local
    engine: llamacpp
    model: qwen2.5-0.5b
    endpoints: [http://127.0.0.1:8081/, http://127.0.0.1:8082]
    api_key_env: LOCAL_ENGINE_KEY
    timeouts: {connect_ms: 500, first_token_ms: 20000}
    retry: {attempts: 3}
    breaker: {failure_threshold: 2, cooldown_ms: 1000}
    extra_body: {ignore_eos: true}
"""


@pytest.mark.req("ORCH-ENG-0030")
def test_an_http_pool_is_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "llorch.yaml"
    path.write_text(LLAMA, encoding="utf-8")
    (pool,) = load_config(path).pools

    assert pool.engine == "llamacpp"
    assert pool.endpoints == ("http://127.0.0.1:8081", "http://127.0.0.1:8082")
    assert pool.replica_count == 2
    assert pool.timeouts == TimeoutSettings(connect_ms=500, first_token_ms=20000)
    assert pool.retry == RetrySettings(attempts=3)
    assert pool.breaker == BreakerSettings(failure_threshold=2, cooldown_ms=1000)
    assert pool.extra_body == {"ignore_eos": True}
    assert pool.api_key is None  # only the environment provides it

    engines = build_engines(pool)
    assert [e.replica_id for e in engines] == ["local-0", "local-1"]
    assert all(isinstance(e, OpenAIHttpEngine) and e.engine == "llamacpp" for e in engines)


@pytest.mark.req("ORCH-ENG-0007")
def test_the_engine_key_comes_from_the_named_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "llorch.yaml"
    path.write_text(LLAMA, encoding="utf-8")
    settings = load_config(path)

    keyed = settings.with_overrides({"LOCAL_ENGINE_KEY": "k-123"})
    assert keyed.pools[0].api_key == "k-123"
    assert "k-123" not in repr(keyed.pools[0])
    with pytest.raises(ValueError, match="LOCAL_ENGINE_KEY"):
        settings.with_overrides({})


@pytest.mark.req("ORCH-ENG-0030")
@pytest.mark.parametrize(
    "pool",
    [
        {"id": "p", "model": "m", "engine": "vllm"},  # an HTTP engine needs endpoints
        {"id": "p", "model": "m", "engine": "sglang", "endpoints": ["http://h:1"]},
        {"id": "p", "model": "m", "engine": "tgi", "endpoints": ["ftp://h:1"]},
        {"id": "p", "model": "m", "engine": "openai", "endpoints": ["http://h:1"], "api_key": "x"},
    ],
    ids=["no-endpoints", "unknown-engine", "not-http", "key-in-clear"],
)
def test_the_schema_refuses_bad_engine_pools(pool: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        validate_config({"pools": [pool]})


def test_a_mock_pool_keeps_its_replica_count() -> None:
    settings = Settings.from_mapping({"pools": [{"id": "m", "model": "x", "replicas": 3}]})

    assert settings.pools[0].replica_count == 3
    assert settings.pools[0].engine == "mock"


@pytest.mark.req("ORCH-ENG-0030")
def test_the_examples_of_the_configuration_reference_are_valid() -> None:
    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]

    assert len(blocks) == 5
    for block in blocks:
        raw = yaml.safe_load(block)
        validate_config(raw)
        settings = Settings.from_mapping(raw)
        if "pools" not in raw:  # the database section's example
            assert settings.database.url is not None
            continue
        (pool,) = settings.pools
        assert pool.engine != "mock"
        assert pool.replica_count == len(pool.endpoints) >= 1
