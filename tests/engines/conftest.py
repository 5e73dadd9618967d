from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.engines.smollm2 import fetch_smollm2
from tests.engines.tiny_gguf import write_tiny_llama


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "llamacpp: runs a real llama.cpp server (xllamacpp) in a subprocess"
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 0.4 MB random-weight model: thousands of tokens per second on one thread."""
    yield write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A wider variant (~40 MB) that generates slowly enough to act on a running stream."""
    path = tmp_path_factory.mktemp("gguf") / "slow.gguf"
    yield write_tiny_llama(path, width=512, layers=4, heads=8)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (98 MB), downloaded once per machine into a cache outside git.

    A failed download is an error of the tests that use it, not a skip.
    """
    return fetch_smollm2()
