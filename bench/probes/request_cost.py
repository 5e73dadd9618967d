"""Server CPU per request of a few read operations, under wrk.

    .venv/bin/python -m bench.probes.request_cost [--duration 5]

llorch with the mock pool (as ``bench/run.py`` starts it, pinned to core 0); one task is
submitted and left to finish, then wrk (``-t1 -c16``, on the other cores) asks for
``GET /v1/tasks/{id}``, ``GET /v1/capabilities`` and ``GET /healthz`` (an unknown route: the
404 path through the whole stack). Prints requests/s and µs of llorch's CPU per request, which
moves less than requests/s when the machine is shared. Nothing is recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (python3 xtask.py bench installs it: apt-get install wrk)")
    pool = bench.mock_pool(replicas=1, slots=4, ttft_ms=0, tokens_per_s=0)
    with (
        tempfile.TemporaryDirectory(prefix="llorch-request-cost-") as name,
        bench.llorch(Path(name), [pool]) as (url, pid),
    ):
        body = {"model": "mock-small", "prompt": "x", "max_tokens": 2}
        task_id = httpx.post(f"{url}/v1/tasks", json=body).json()["task_id"]
        time.sleep(0.5)  # it has ended
        for path in (f"/v1/tasks/{task_id}", "/v1/capabilities", "/healthz"):
            argv = ["wrk", "-t1", "-c16", f"-d{max(1, round(args.duration))}s", f"{url}{path}"]
            before, started = bench.cpu_s(pid), time.monotonic()
            out = bench.on_other_cores(argv, Path(name))
            cpu, wall = bench.cpu_s(pid) - before, time.monotonic() - started
            lines = out.stdout.splitlines()
            requests = int(next(line for line in lines if "requests in" in line).split()[0])
            report = {
                "path": path.replace(task_id, "{id}"),
                "requests_per_s": round(requests / wall),
                "us_cpu_per_request": round(1e6 * cpu / requests),
                "non_2xx": sum(int(line.split()[-1]) for line in lines if "Non-2xx" in line),
            }
            print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
