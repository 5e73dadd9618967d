"""CPU time a llorch process on PostgreSQL spends per relayed token and per streamed task.

    .venv/bin/python -m bench.probes.cluster_relay_cost [--src DIR] [--concurrency 16]
        [--max-tokens 256] [--duration 10]

As ``bench/probes/relay_cost.py`` (the mock OpenAI engine with no delay, llorch pinned to its own
core, the load generator in llorch mode), but llorch keeps its state in a private PostgreSQL
cluster (``database.url``): in this tree that is cluster mode, every frame also written to the
durable transcript. The PostgreSQL cluster's CPU (its postmaster and every backend) is reported
beside llorch's, per task and per token. ``--src`` runs the llorch package of another checkout
(its ``src`` directory, e.g. one made with ``git archive``) for a before/after comparison on the
same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench
from bench.cluster import CpuMeter, _postmaster
from tools.postgres import private_cluster
from tools.server import free_port, llorch_argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "src")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    options = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "warmup": 0}
    with (
        tempfile.TemporaryDirectory(prefix="llorch-cluster-cost-") as name,
        private_cluster() as pg,
    ):
        tmp = Path(name)
        with bench.engine(tmp, ttft_ms=0, tokens_per_s=0) as engine_url:
            config = bench.llorch_config([bench.openai_pool(engine_url, slots=64)])
            config["database"] = {"url": pg.create_database("bench"), "instance_id": "bench"}
            path = tmp / "llorch.yaml"
            path.write_text(yaml.safe_dump(config))
            port = free_port()
            argv = llorch_argv(port, config=path, data_dir=tmp / "data", python=bench.PY)
            mine, _ = bench.cores()
            with bench.process(
                argv,
                cpus=mine,
                log=tmp / "llorch.log",
                ready_url=f"http://127.0.0.1:{port}/readyz",
                env={"PYTHONPATH": f"{args.src}{os.pathsep}{bench.ROOT}"},
            ) as proc:
                url = f"http://127.0.0.1:{port}"
                bench.load("llorch", url, bench.ENGINE_MODEL, duration=3, **options)  # warm up
                cpu_before, wall_before = bench.cpu_s(proc.pid), time.monotonic()
                pg_meter = CpuMeter({}, {"postgres": _postmaster(pg.root)})
                result = bench.load(
                    "llorch", url, bench.ENGINE_MODEL, duration=args.duration, **options
                )
                cpu_used = bench.cpu_s(proc.pid) - cpu_before
                wall = time.monotonic() - wall_before
                pg_used = pg_meter.shares()["postgres_cpu_share"] * wall
    tokens = result["tokens_per_s"] * result["duration_s"]
    tasks = result["per_s"] * result["duration_s"]
    print(
        json.dumps(
            {
                "src": str(args.src),
                "tasks_per_s": round(result["per_s"], 1),
                "tokens_per_s": round(result["tokens_per_s"]),
                "llorch_cpu_share": round(cpu_used / wall, 3),
                "us_cpu_per_token": round(1e6 * cpu_used / tokens, 1) if tokens else None,
                "ms_cpu_per_task": round(1e3 * cpu_used / tasks, 2) if tasks else None,
                "postgres_cpu_share": round(pg_used / wall, 3),
                "us_postgres_cpu_per_token": round(1e6 * pg_used / tokens, 1) if tokens else None,
                "ms_postgres_cpu_per_task": round(1e3 * pg_used / tasks, 2) if tasks else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
