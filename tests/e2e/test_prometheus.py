"""The Grafana dashboards against a real Prometheus scraping a real `llorch serve`.

Every panel expression of ci/dashboards/*.json must return data once llorch has served some
traffic: the dashboards query metrics that exist, with the labels they really carry.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import free_port, parse_sse, serve_process, submit_to, task_of, wait_until
from tools import server

pytestmark = pytest.mark.wire

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "ci" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
# A busy pool's first token never comes during the test.
BUSY = {"ttft_ms": 60_000, "tokens_per_s": 0}
QUERY_DEADLINE_S = 20.0


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel target, with the Grafana variables substituted."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels: list[dict[str, Any]] = list(dashboard["panels"])
        while panels:
            panel = panels.pop(0)
            panels.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = re.sub(r"\$\{?__(?:rate_)?interval\}?", "30s", target["expr"])
                expr = re.sub(r"\$\{?pool_id\}?", ".*", expr)
                found.append((f"{path.name}: {panel['title']} {target['refId']}", expr))
    return found


def write_config(path: Path) -> Path:
    def mock_pool(pool_id: str, model: str, **extra: Any) -> dict[str, Any]:
        return {"id": pool_id, "model": model, "replicas": 1, "slots_per_replica": 2, **extra}

    config = {
        "server": {"shutdown_grace_s": 0},
        "pools": [
            mock_pool(
                "default",
                "mock-small",
                models=["mock-large"],
                mock={"ttft_ms": 1, "tokens_per_s": 0, "eos": False},
            ),
            mock_pool("busy", "slow", slots_per_replica=1, mock=BUSY, queue={"capacity": 1}),
            mock_pool("broken", "broken", mock={"failure": {"mode": "mid_stream"}}),
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def prometheus(target: str | list[str], tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping `target` (host:port, or several) every second; yields its
    URL."""
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "llorch",
                        "static_configs": [
                            {"targets": [target] if isinstance(target, str) else target}
                        ],
                    }
                ],
            }
        )
    )
    argv = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with server.running(argv, log=log, ready_url=f"{url}/-/ready", ready_timeout_s=20):
        yield url


def traffic(client: httpx.Client) -> None:
    """Successes, a failing replica, streams, a 429 from a full queue, a budget 429, a cancel,
    and a reload."""
    bodies: list[dict[str, Any]] = [{}, {}, {"priority": "batch"}, {"model": "broken"}]
    for body in bodies:
        task_id = submit_to(client, max_tokens=5, **body)["task_id"]
        events = parse_sse(client.get(f"/v1/tasks/{task_id}/stream").text)
        assert events[-1].event in ("end", "error"), events
    running = submit_to(client, model="slow", max_tokens=5)["task_id"]
    wait_until(lambda: task_of(client, running)["state"] == "running", "the busy pool's task runs")
    queued = submit_to(client, model="slow", max_tokens=5)["task_id"]
    submit_to(client, 429, model="slow", max_tokens=5)
    session = client.post("/v1/sessions", json={"budgets": {"tokens": 1}}).json()
    submit_to(client, 429, session_id=session["session_id"], max_tokens=5)
    assert client.post(f"/v1/tasks/{running}/cancel").status_code < 300
    wait_until(lambda: task_of(client, running)["state"] == "canceled", "the cancel")
    wait_until(lambda: task_of(client, queued)["state"] == "running", "the queued task runs")
    assert client.post("/v1/pools/default/reload", json={"model": "mock-large"}).status_code == 202
    wait_until(
        lambda: not client.get("/v1/pools/default/health").json()["reloading"], "the reload ends"
    )


def query(client: httpx.Client, expr: str) -> list[Any]:
    response = client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


@pytest.mark.req("ORCH-MET-0001", "ORCH-MET-0003")
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not on PATH (xtask ci installs it)")
def test_every_dashboard_panel_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(DASHBOARDS) >= 2 and exprs
    config = write_config(tmp_path / "llorch.yaml")
    with serve_process("--config", str(config), data_dir=tmp_path / "data") as (url, _proc, _log):
        target = url.removeprefix("http://")
        with (
            prometheus(target, tmp_path) as prom_url,
            httpx.Client(base_url=url, timeout=30) as client,
            httpx.Client(base_url=prom_url, timeout=10) as prom,
        ):
            traffic(client)
            pending = dict(exprs)
            deadline = time.monotonic() + QUERY_DEADLINE_S
            while pending and time.monotonic() < deadline:
                for where, expr in list(pending.items()):
                    if query(prom, expr):
                        del pending[where]
                if pending:
                    time.sleep(0.25)
            up = query(prom, 'up{job="llorch"}')
            assert not pending, (
                f"{len(pending)} of {len(exprs)} panel expressions returned no data "
                f"within {QUERY_DEADLINE_S:.0f} s (up: {up}):\n"
                + "\n".join(f"  {where}: {expr}" for where, expr in pending.items())
            )
