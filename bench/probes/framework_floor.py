"""What the web stack alone costs per ``POST /v1/tasks``: the floor under the admission target.

    .venv/bin/python -m bench.probes.framework_floor [--duration 8]

Serves ``POST /v1/tasks`` with a handler that does nothing (a constant 202 ``TaskAccepted``), under
uvicorn (uvloop, httptools) pinned to core 0, and loads it with wrk (``-t1 -c32``, as the admission
profile of ``bench/run.py``) on the other cores. Three stacks:

- ``starlette``: one Starlette route that parses the JSON body, no validation;
- ``connexion``: connexion 3 out of the box, with the contract's ``TaskRequest`` and
  ``TaskAccepted`` schemas, request and response validation on (strict);
- ``connexion+llorch-validators``: the same with llorch's compiled validators
  (``llorch.api.validation.validator_map``).

Prints, for each, 202 answers per second and the server's CPU per request. Nothing is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench
from tools.server import free_port

STACKS = ("starlette", "connexion", "connexion+llorch-validators")
ACCEPTED: dict[str, Any] = {
    "task_id": "t-1",
    "session_id": "s-1",
    "state": "queued",
    "pool_id": "default",
    "queue_position": 0,
    "predicted_start_ms": 1,
    "backoff_ms": 0,
    "streams": {"sse": "/v1/tasks/t-1/stream"},
}
WRK_POST = """
wrk.method = "POST"
wrk.body = '{"model": "mock-small", "prompt": "Once upon a time", "max_tokens": 1}'
wrk.headers["Content-Type"] = "application/json"
"""


def document() -> dict[str, Any]:
    """One operation, createTask's body and 202, with the data plane's schemas."""
    from llorch.contracts import openapi

    data = dict(openapi("data"))
    return {
        "openapi": "3.0.3",
        "info": {"title": "floor", "version": "1"},
        "paths": {
            "/v1/tasks": {
                "post": {
                    "operationId": "createTask",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/TaskRequest"}
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "accepted",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/TaskAccepted"}
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {"schemas": data["components"]["schemas"]},
    }


async def create_task(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    return ACCEPTED, 202


def app(stack: str) -> Any:
    """The ASGI app of one stack (``uvicorn --factory`` calls it through the env var)."""
    if stack == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def endpoint(request: Request) -> JSONResponse:
            await request.json()
            return JSONResponse(ACCEPTED, status_code=202)

        return Starlette(routes=[Route("/v1/tasks", endpoint, methods=["POST"])])
    from connexion import AsyncApp
    from connexion.resolver import Resolver

    options: dict[str, Any] = {}
    if stack == "connexion+llorch-validators":
        from llorch.api.validation import validator_map

        options["validator_map"] = validator_map()
    connexion_app = AsyncApp(__name__)
    connexion_app.add_api(
        document(),
        resolver=Resolver(function_resolver=lambda _: create_task),
        strict_validation=True,
        validate_responses=True,
        **options,
    )
    return connexion_app


def factory() -> Any:
    return app(os.environ["FLOOR_STACK"])


def measure(tmp: Path, stack: str, duration: float) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [bench.PY, "-m", "uvicorn", "--factory", "bench.framework_floor:factory"]
    argv += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    mine, others = bench.cores()
    script = tmp / "post.lua"
    script.write_text(WRK_POST)
    env = {"FLOOR_STACK": stack, "PYTHONPATH": str(bench.ROOT)}
    log = tmp / f"{stack}.log"
    with bench.process(argv, cpus=mine, log=log, ready_url=None, env=env) as proc:
        deadline = time.monotonic() + 30
        while True:  # no GET route to wait on: wait for the port
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{stack} did not start; see {log}") from None
                time.sleep(0.1)
        target = f"{url}/v1/tasks"
        wrk = ["wrk", "-t1", "-c32", f"-d{max(1, round(duration))}s", "-s", str(script), target]
        subprocess.run([*wrk[:-1], "-d1s", target], capture_output=True, check=False)  # warm up
        before, started = bench.cpu_s(proc.pid), time.monotonic()
        out = subprocess.run(
            wrk,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=lambda: os.sched_setaffinity(0, others),
        )
        cpu, wall = bench.cpu_s(proc.pid) - before, time.monotonic() - started
    lines = out.stdout.splitlines()
    requests = int(next(line for line in lines if "requests in" in line).split()[0])
    non_2xx = [line for line in lines if "Non-2xx" in line]
    return {
        "stack": stack,
        "requests_per_s": round(requests / wall),
        "us_cpu_per_request": round(1e6 * cpu / requests),
        "server_cpu_share": round(cpu / wall, 3),
        "non_2xx": int(non_2xx[0].split()[-1]) if non_2xx else 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--stack", choices=STACKS, action="append")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (python3 xtask.py bench installs it: apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="llorch-floor-") as name:
        for stack in args.stack or STACKS:
            print(json.dumps(measure(Path(name), stack, args.duration)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
