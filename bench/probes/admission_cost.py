"""CPU time the llorch process spends per ``POST /v1/tasks`` answered 202.

    .venv/bin/python -m bench.probes.admission_cost [--duration 10] [--rounds 1] [--ttft-ms 0]

The same processes and load as the admission profile of ``bench/run.py`` (llorch with the mock
pool, 4 x 64 slots, wrk -t1 -c32 on the other cores), but the result is llorch's user + system
CPU seconds over the run divided by the 202s, which hardly moves when other work shares the
machine. The CPU is read once the admitted tasks have all ended (the process idle again), so
the figure is the whole cost of a task. ``--ttft-ms`` large (e.g. 10000000) keeps every task
running: the request path and the start of a task only. Nothing is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository root, so that bench/run.py is the module bench.run (as mypy names it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import run as bench
from bench.probes.relay_cost import shares
from bench.run import cpu_s


def thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (the event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, *, quiet_s: float = 0.5, timeout_s: float = 60.0) -> None:
    """Until the process spends (almost) no CPU over ``quiet_s``: its backlog is done."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_s(pid)
        time.sleep(quiet_s)
        if cpu_s(pid) - before <= 0.02 * quiet_s:
            return


def start_py_spy(pid: int, out: Path, duration: float, *, gil: bool) -> subprocess.Popen[bytes]:
    """py-spy (`pip install py-spy`; not a project dependency) on the server process."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    argv = [py_spy, "record", "-p", str(pid), "-d", str(max(1, int(duration))), "-r", "200"]
    argv += ["--gil"] if gil else []
    argv += ["-f", "raw", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="measurements on one server")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="the mock engine's")
    parser.add_argument(
        "--profile",
        type=Path,
        help="also record llorch with py-spy (--gil, raw) into this file and print the shares",
    )
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="with --profile: sample every running thread, not only the GIL holder (SQLite's "
        "and the trace writer's time show)",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="run llorch from this copy of the repository (its src/ first on PYTHONPATH), "
        "e.g. `git archive HEAD src contracts | tar -x -C /tmp/base` for an A/B comparison",
    )
    args = parser.parse_args()
    if args.tree is not None:
        os.environ["PYTHONPATH"] = str((args.tree / "src").resolve())
    pool = bench.mock_pool(replicas=4, slots=64, ttft_ms=args.ttft_ms, tokens_per_s=0)
    with tempfile.TemporaryDirectory(prefix="llorch-admission-cost-") as name:
        tmp = Path(name)
        script = tmp / "admit.lua"
        script.write_text(bench.WRK_ADMIT)
        with bench.llorch(tmp, [pool]) as (url, pid):
            bench.wrk_admit(url, script, 2, tmp)  # warm up
            wait_idle(pid)
            for round_ in range(args.rounds):
                spy = None
                if args.profile is not None and round_ == 0:
                    spy = start_py_spy(pid, args.profile, args.duration, gil=not args.all_threads)
                cpu_before, loop_before = cpu_s(pid), thread_cpu_s(pid)
                counts = bench.wrk_admit(url, script, args.duration, tmp)
                cpu_at_end = cpu_s(pid)
                if args.ttft_ms == 0:
                    wait_idle(pid)
                cpu_used = cpu_s(pid) - cpu_before
                loop_used = thread_cpu_s(pid) - loop_before
                if spy is not None:
                    spy.wait(timeout=60)
                seconds = counts["duration_us"] / 1e6
                accepted = counts["accepted"]
                report = {
                    "accepted_per_s": round(accepted / seconds, 1),
                    "refused": counts["refused"],
                    "socket_errors": counts["socket_errors"],
                    "cpu_share_during_wrk": round((cpu_at_end - cpu_before) / seconds, 3),
                    "us_cpu_per_202": round(1e6 * cpu_used / accepted, 1) if accepted else None,
                    "us_loop_cpu_per_202": round(1e6 * loop_used / accepted, 1)
                    if accepted
                    else None,
                }
                print(json.dumps(report), flush=True)
    if args.profile is not None:
        for share, where in shares(args.profile):
            print(f"{share:5.1f}%  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
