"""Loading the contracts: the OpenAPI documents and the configuration schema.

In a source checkout they are read from the repository's ``contracts/``; an installed wheel
carries a copy as ``llorch/contract_files``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from llorch.config import Settings


class ConfigError(ValueError):
    """The configuration file is unreadable or does not match contracts/config.schema.json."""


def contracts_dir() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "contract_files"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "contracts"


@functools.cache
def openapi(name: str) -> Mapping[str, Any]:
    """The parsed OpenAPI document ``name`` (``data`` or ``control``); read once."""
    with (contracts_dir() / "openapi" / f"{name}.yaml").open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


def merged_openapi() -> dict[str, Any]:
    """Both planes as one document (for a stateful run across them): the union of their paths
    and components; where both name a component, the data plane's is kept (the shared ones are
    the same schemas, at most described differently)."""
    data, control = openapi("data"), openapi("control")
    merged = dict(data)
    merged["info"] = dict(data["info"], title="llorch (data and control planes)")
    merged["paths"] = {**control["paths"], **data["paths"]}
    merged["components"] = {
        section: {**control["components"].get(section, {}), **items}
        for section, items in data["components"].items()
    } | {k: v for k, v in control["components"].items() if k not in data["components"]}
    merged["tags"] = [*data.get("tags", []), *control.get("tags", [])]
    return merged


@functools.cache
def metrics_contract() -> Mapping[str, Any]:
    """The parsed metrics contract (``contracts/metrics.yaml``)."""
    with (contracts_dir() / "metrics.yaml").open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


@functools.cache
def config_schema() -> Mapping[str, Any]:
    with (contracts_dir() / "config.schema.json").open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def validate_config(raw: Any) -> None:
    """Raise ConfigError naming the key and the problem of the first violation."""
    validator = jsonschema.Draft7Validator(config_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(top level)"
        raise ConfigError(f"configuration key {where}: {first.message}")


def load_config(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    validate_config(raw)
    settings = Settings.from_mapping(raw)
    ids = [p.id for p in settings.pools]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"configuration key pools: duplicate pool ids {duplicates}")
    return settings
