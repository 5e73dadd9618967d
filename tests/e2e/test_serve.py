"""`python -m llorch serve` as a user runs it: a real process on 127.0.0.1."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llorch.config import Settings
from tests.support import parse_sse, serve_process

pytestmark = pytest.mark.wire


@pytest.mark.req("ORCH-DATA-0092")
def test_defaults_are_the_embedded_mock_pool_on_loopback() -> None:
    settings = Settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.data_dir == "var"
    assert [(p.engine, p.model) for p in settings.pools] == [("mock", "mock-small")]


@pytest.mark.req("ORCH-DATA-0092", "ORCH-DATA-0094")
def test_serve_without_configuration_submits_and_streams(tmp_path: Path) -> None:
    with serve_process(data_dir=tmp_path / "data") as (url, proc, log):
        with httpx.Client(base_url=url, timeout=30) as client:
            accepted = client.post(
                "/v1/tasks", json={"model": "mock-small", "prompt": "hello", "max_tokens": 4}
            )
            assert accepted.status_code == 202, accepted.text
            stream = client.get(f"/v1/tasks/{accepted.json()['task_id']}/stream")
            events = parse_sse(stream.text)
            assert events[0].event == "started" and events[-1].event in ("end", "error")
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown has completed.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text(encoding="utf-8")
    # The dev profile's own database file, under the data dir.
    assert (tmp_path / "data" / "llorch-dev.sqlite3").is_file()


@pytest.mark.req("ORCH-SEC-0063")
def test_serve_raises_its_open_file_limit_to_the_hard_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the child inherits it
    try:
        with serve_process(data_dir=tmp_path / "data") as (_url, proc, _log):
            limits = Path(f"/proc/{proc.pid}/limits").read_text(encoding="utf-8")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    child_soft, child_hard = line.split()[3:5]
    assert child_soft == child_hard != "256"


@pytest.mark.req("ORCH-DATA-0074")
def test_serve_listens_with_the_configured_backlog(tmp_path: Path) -> None:
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("iproute2's ss, which shows a listener's backlog, is not installed")
    config = tmp_path / "llorch.yaml"
    config.write_text("server: {backlog: 37}\n", encoding="utf-8")
    with serve_process("--config", str(config), data_dir=tmp_path / "data") as (url, _p, _log):
        port = urlsplit(url).port
        listing = subprocess.run(
            [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
    # A listening socket's Send-Q column is its backlog.
    (line,) = listing.splitlines()
    assert line.split()[2] == "37"


@pytest.mark.req("ORCH-DATA-0093")
def test_a_bad_configuration_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("pools:\n  - id: a\n    model: m\n    queue: {capacity: 0}\n")
    result = subprocess.run(
        [sys.executable, "-m", "llorch", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pools.0.queue.capacity" in result.stderr
    assert "Traceback" not in result.stderr
