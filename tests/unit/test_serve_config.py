"""What `llorch serve` hands uvicorn: the listen backlog (ORCH-DATA-0074)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llorch.__main__ import uvicorn_config
from llorch.api.http import listen_backlog
from llorch.contracts import load_config


async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    raise AssertionError("uvicorn_config only builds the settings")


@pytest.mark.req("ORCH-DATA-0074")
def test_the_configured_backlog_reaches_uvicorn(tmp_path: Path) -> None:
    path = tmp_path / "llorch.yaml"
    path.write_text("server: {backlog: 16384}\n", encoding="utf-8")

    assert uvicorn_config(app, load_config(path)).backlog == 16384
    path.write_text("", encoding="utf-8")
    assert uvicorn_config(app, load_config(path)).backlog == 2048


@pytest.mark.req("ORCH-DATA-0074")
def test_a_backlog_above_the_kernel_cap_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("4096\n", encoding="ascii")
    with caplog.at_level(logging.WARNING, logger="llorch.http"):
        assert listen_backlog(4096, somaxconn) == 4096
        assert not caplog.records
        assert listen_backlog(10_000, somaxconn) == 10_000
    (record,) = caplog.records
    assert "10000" in record.getMessage() and "4096" in record.getMessage()


@pytest.mark.req("ORCH-DATA-0074")
def test_without_a_kernel_cap_to_read_the_backlog_is_used_as_it_is(tmp_path: Path) -> None:
    assert listen_backlog(10_000, tmp_path / "absent") == 10_000
