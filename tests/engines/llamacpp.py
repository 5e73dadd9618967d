"""Run a real llama.cpp server (xllamacpp's embedded llama-server) as a child process.

``python -m tests.engines.llamacpp MODEL PORT N_PARALLEL N_CTX [THREADS]`` serves until SIGTERM;
:class:`LlamaServer` starts that in a subprocess on a free port and waits for ``/health`` to
answer 200 (the server answers 503 while the model loads).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from tests.support import free_port

from tools import server

ROOT = Path(__file__).resolve().parents[2]


def serve(model: Path, port: int, n_parallel: int, n_ctx: int, threads: int = 1) -> None:
    import xllamacpp  # type: ignore[import-untyped]  # ships no type information

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = n_ctx  # the total, split over the slots
    params.n_parallel = n_parallel
    params.port = port
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.endpoint_slots = True
    params.endpoint_props = True
    params.endpoint_metrics = True
    params.warmup = False
    server = xllamacpp.Server(params)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server


class LlamaServer:
    """One llama.cpp server process; ``start()`` may be called again after ``kill()``."""

    def __init__(
        self,
        model: Path,
        *,
        n_parallel: int = 2,
        n_ctx: int = 1024,
        port: int | None = None,
        threads: int = 1,
    ) -> None:
        self.model = model
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx
        # One thread is fastest for the tiny random models; a real model wants the cores.
        self.threads = threads
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> LlamaServer:
        cmd = [
            sys.executable,
            "-m",
            "tests.engines.llamacpp",
            str(self.model),
            str(self.port),
            str(self.n_parallel),
            str(self.n_ctx),
            str(self.threads),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._proc = server.start(cmd, log=None, env=env, cwd=ROOT)
        try:
            server.wait_ready(self._proc, f"{self.url}/health", timeout_s)
        except server.ServerError as exc:
            self.stop()
            raise RuntimeError(f"llama.cpp server: {exc}") from exc
        return self

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as a crashed engine would."""
        if self._proc is not None:
            server.stop(self._proc, signum=signal.SIGKILL)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            server.stop(self._proc, timeout_s=10)
            self._proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), threads)
