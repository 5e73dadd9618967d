"""`python -m llorch serve` on a database file that is empty or corrupt: refused at start-up."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, serve_process, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

DB_NAME = "llorch-dev.sqlite3"  # the dev profile's file under the data dir


def serve_once(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run `serve` to its end (it is expected to refuse to start, so it ends by itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    argv = [sys.executable, "-m", "llorch", "serve", "--port", str(free_port())]
    return subprocess.run(
        [*argv, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def assert_refused(result: subprocess.CompletedProcess[str], db: Path, problem: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llorch: ") and str(db) in lines[0] and problem in lines[0]
    assert "Traceback" not in result.stderr


def database_after_a_normal_run(data_dir: Path) -> Path:
    """The database of a server that ran one task and stopped on SIGTERM (WAL checkpointed)."""
    with serve_process(data_dir=data_dir) as (url, proc, _log):
        with httpx.Client(base_url=url, timeout=30) as client:
            task_id = submit_to(client, max_tokens=2)["task_id"]
            wait_until(lambda: task_of(client, task_id)["state"] == "succeeded", "task ends")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    db = data_dir / DB_NAME
    assert not (data_dir / f"{DB_NAME}-wal").exists()  # everything is in the main file
    return db


@pytest.mark.req("ORCH-STATE-0003")
def test_a_zero_byte_database_file_is_refused_not_started_empty(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / DB_NAME
    db.touch()
    result = serve_once(data_dir)
    assert_refused(result, db, "empty file (0 bytes)")
    assert db.stat().st_size == 0  # not turned into a new database


@pytest.mark.req("ORCH-STATE-0003")
@pytest.mark.parametrize("where", ["header", "middle"])
def test_a_database_with_garbage_pages_is_refused(tmp_path: Path, where: str) -> None:
    data_dir = tmp_path / "data"
    db = database_after_a_normal_run(data_dir)
    content = bytearray(db.read_bytes())
    size = len(content)
    start, end = (0, 100) if where == "header" else (size // 4, 3 * size // 4)
    content[start:end] = random.Random(15).randbytes(end - start)
    db.write_bytes(bytes(content))

    result = serve_once(data_dir)

    assert_refused(result, db, "is corrupt")
    assert db.read_bytes() == bytes(content)  # neither repaired, replaced nor written
