"""CPU time the llorch process spends per relayed token, under the saturation engine.

    .venv/bin/python -m bench.probes.relay_cost [--concurrency 16] [--max-tokens 256]
        [--duration 10]

Unlike tasks/s, CPU seconds per token hardly move when other work shares the machine, so this is
what the optimisations in bench/NOTES.md were measured with. Running it with two --max-tokens
values separates the cost per task from the cost per token (cost = per_task + n * per_token).
It starts the same processes as ``bench/run.py``: the mock OpenAI engine with no delay, llorch
with one ``openai`` pool in front of it, and the load generator in llorch mode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository root, so that bench/run.py is the module bench.run (as mypy names it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="the engine's (0: no delay)")
    parser.add_argument(
        "--tokens-per-s", type=float, default=0.0, help="the engine's (0: no delay)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="also record llorch with py-spy (--gil, raw) into this file and print the shares",
    )
    args = parser.parse_args()
    options = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "warmup": 0}
    with tempfile.TemporaryDirectory(prefix="llorch-relay-cost-") as name:
        tmp = Path(name)
        with (
            bench.engine(tmp, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s) as engine_url,
            bench.llorch(tmp, [bench.openai_pool(engine_url, slots=64)]) as (url, pid),
        ):
            bench.load("llorch", url, bench.ENGINE_MODEL, duration=3, **options)  # warm up
            spy = None if args.profile is None else start_py_spy(pid, args.profile, args.duration)
            cpu_before, wall_before = bench.cpu_s(pid), time.monotonic()
            result = bench.load(
                "llorch", url, bench.ENGINE_MODEL, duration=args.duration, **options
            )
            cpu_used, wall = bench.cpu_s(pid) - cpu_before, time.monotonic() - wall_before
            if spy is not None:
                spy.wait(timeout=60)
    tokens = result["tokens_per_s"] * result["duration_s"]
    report = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "tasks_per_s": round(result["per_s"], 1),
        "tokens_per_s": round(result["tokens_per_s"]),
        "llorch_cpu_share": round(cpu_used / wall, 3),
        "us_cpu_per_token": round(1e6 * cpu_used / tokens, 1) if tokens else None,
    }
    print(json.dumps(report))
    if args.profile is not None:
        for share, where in shares(args.profile):
            print(f"{share:5.1f}%  {where}")
    return 0


def start_py_spy(pid: int, out: Path, duration: float) -> subprocess.Popen[bytes]:
    """py-spy (`pip install py-spy`; not a project dependency) on the server process."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    argv = [py_spy, "record", "-p", str(pid), "-d", str(max(1, int(duration))), "-r", "200"]
    argv += ["--gil", "-f", "raw", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shares(raw: Path, top: int = 40) -> list[tuple[float, str]]:
    """Inclusive share of the main thread's samples per function, from py-spy's raw output."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "_run_module_as_main" not in stack:
            continue  # another thread
        total += int(n)
        for frame in {f.split(" (")[0] for f in stack.split(";")}:
            counts[frame] = counts.get(frame, 0) + int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(100 * n / max(1, total), where) for where, n in ranked]


if __name__ == "__main__":
    sys.exit(main())
