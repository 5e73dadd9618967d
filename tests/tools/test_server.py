"""tools.server: the one way the tools, bench/ and the e2e tests start, await and stop servers."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tools import server

# Ignores SIGTERM, starts a child in its own process group, then serves HTTP.
STUBBORN = """
import http.server, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler
                       ).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    return "State:\tZ" not in status


def test_running_waits_until_ready_then_stops_the_server(tmp_path: Path) -> None:
    port = server.free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with server.running(argv, log=tmp_path / "log", ready_url=url, cwd=tmp_path) as proc:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        assert proc.poll() is None
    assert proc.returncode is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_a_server_that_exits_before_it_is_ready_is_an_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{server.free_port()}/"
    with (
        pytest.raises(server.ServerError, match="exited with 3"),
        server.running(argv, log=log, ready_url=url),
    ):
        pass
    assert "bad config" in server.log_tail(log)


def test_a_server_ignoring_sigterm_is_killed_with_what_it_started(tmp_path: Path) -> None:
    port = server.free_port()
    log = tmp_path / "server.log"
    proc = server.start([sys.executable, "-c", STUBBORN, str(port)], log=log)
    server.wait_ready(proc, f"http://127.0.0.1:{port}/", timeout_s=30)
    child = int(log.read_text(encoding="utf-8").split()[1])

    assert _alive(child)
    assert server.stop(proc, timeout_s=0.5) == -signal.SIGKILL
    # The child was in the server's process group: it went too (the kernel delivers SIGKILL
    # before killpg returns; reaping it is its new parent's business).
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the server's child outlived the stop"
        time.sleep(0.05)


def test_llorch_argv_is_the_loopback_test_profile_unless_told() -> None:
    argv = server.llorch_argv(8123, config="c.yaml", data_dir="d", python="py")
    assert argv == [
        *("py", "-m", "llorch", "serve", "--host", "127.0.0.1", "--port", "8123"),
        *("--config", "c.yaml", "--profile", "test", "--data-dir", "d"),
    ]
    assert "--profile" not in server.llorch_argv(1, profile=None)
