"""The one way to start a server process, wait until it answers and stop it.

xtask's commands (contract, pact-verify, soak), ``bench/`` (llorch, the mock engine, LiteLLM)
and the end-to-end tests all run their servers through :func:`running`::

    with running(llorch_argv(port, config=path, data_dir=tmp), log=tmp / "server.log",
                 ready_url=f"http://127.0.0.1:{port}/readyz") as proc:
        ...  # the server answers 200 on ready_url

The process runs in its own process group (``start_new_session``), so stopping it also ends
anything it started. Its output goes to ``log``, which callers read when something fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tools.common import ROOT

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

# The servers are on the loopback interface: never go through a proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(Exception):
    """The server exited or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llorch_argv(
    port: int,
    *,
    config: str | Path | None = None,
    data_dir: str | Path | None = None,
    profile: str | None = "test",
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m llorch serve`` on 127.0.0.1:``port`` (test profile unless told otherwise)."""
    argv = [python, "-m", "llorch", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if config is not None:
        argv += ["--config", str(config)]
    if profile is not None:
        argv += ["--profile", profile]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    return [*argv, *extra]


def start(
    argv: Sequence[str],
    *,
    log: Path | None,
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, its output in ``log`` (None: discarded),
    pinned to ``cpus``."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    with contextlib.ExitStack() as stack:
        out = subprocess.DEVNULL if log is None else stack.enter_context(log.open("wb"))
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
            preexec_fn=pin,
        )


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; raise ServerError if the process exits first."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        time.sleep(0.05)
    raise ServerError(f"the server was not ready within {timeout_s:.0f} s ({url}: {last_error})")


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def stop(
    proc: subprocess.Popen[bytes],
    *,
    signum: int = signal.SIGTERM,
    timeout_s: float = STOP_TIMEOUT_S,
) -> int:
    """Send ``signum`` to the server's group, wait up to ``timeout_s``, then SIGKILL the group.

    Returns the server's exit status; anything it left behind in its group goes too.
    """
    if proc.poll() is None:
        _signal_group(proc, signum)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(
                f"xtask: the server ignored signal {signum} for {timeout_s:.0f} s: killing it",
                file=sys.stderr,
                flush=True,
            )
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _signal_group(proc, signal.SIGKILL)
    return proc.returncode


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    log: Path | None,
    ready_url: str | None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    cwd: Path = ROOT,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``, wait until ``ready_url`` answers 200 (if given), stop it at the end."""
    proc = start(argv, log=log, env=env, cpus=cpus, cwd=cwd)
    try:
        if ready_url is not None:
            wait_ready(proc, ready_url, ready_timeout_s)
        yield proc
    finally:
        stop(proc, signum=stop_signal)


def log_tail(log: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a server log, framed for a failure report ("" if none)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    head = f"---- last {len(tail)} lines of the server log ({log.name}) ----"
    return "\n".join([head, *tail, "---- end of server log ----"])
