"""``xtask.py soak --instances N [--minutes M] [--kill-every S]``: the soak's mixed traffic
against N llorch instances on one private PostgreSQL cluster, with one instance killed
(SIGKILL) and restarted every S seconds (default 60).

The workers play a load balancer: each request goes to an instance chosen at random, and to
the next one when the chosen one refuses the connection (it is down). After the traffic every
accepted task must end, read through any instance; the report (JSON on stdout) counts lost
tasks, unexpected 5xx answers, the kills and what the clients saw of them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools import server
from tools.common import ROOT, UsageError, note, step
from tools.postgres import private_cluster
from tools.soak import (
    SOAK_CONFIG,
    SOAK_WORKERS,
    SoakClient,
    SoakTally,
    _drain,
    _report,
    _soak_worker,
)


class ClusterClient(SoakClient):
    """A client in front of several instances: a random one per request, the next on a refused
    connection (what a load balancer's health check does, at once)."""

    def __init__(self, ports: list[int], key: str) -> None:
        super().__init__(ports[0], key)
        self.ports = ports
        self.failovers = 0
        self._rng = random.Random(7)
        self._lock = threading.Lock()

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        read_limit: int | None = None,
    ) -> tuple[int, bytes]:
        with self._lock:
            first = self._rng.randrange(len(self.ports))
        for step_ in range(len(self.ports)):
            port = self.ports[(first + step_) % len(self.ports)]
            try:
                one = SoakClient(port, self.key)
                return one.call(
                    method, path, body, headers=headers, auth=auth, read_limit=read_limit
                )
            except ConnectionRefusedError:
                with self._lock:
                    self.failovers += 1
        raise ConnectionRefusedError("every instance refused the connection")


@dataclass
class Instance:
    port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/readyz"

    def start(self, env: dict[str, str]) -> None:
        # The log is appended to: each restart's output follows the last one's.
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        server.wait_ready(self.proc, self.ready_url)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Chaos:
    kills: list[dict[str, object]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _chaos(
    instances: list[Instance], env: dict[str, str], deadline: float, every_s: float, out: Chaos
) -> None:
    """Kill a random instance every ``every_s`` seconds and start it again on its port (the
    same instance id: its start-up reconciles what it left)."""
    rng = random.Random(11)
    next_kill = time.monotonic() + every_s
    while next_kill < deadline:
        time.sleep(max(0.0, next_kill - time.monotonic()))
        victim = rng.randrange(len(instances))
        killed_at = time.monotonic()
        instances[victim].kill()
        try:
            instances[victim].start(env)
        except server.ServerError as exc:
            out.failures.append(f"instance {victim} did not come back: {exc}")
            return
        out.kills.append({"instance": victim, "down_s": round(time.monotonic() - killed_at, 2)})
        next_kill += every_s


def _cluster_soak(
    instances: list[Instance], key: str, env: dict[str, str], minutes: float, every_s: float
) -> bool:
    client = ClusterClient([i.port for i in instances], key)
    tally = SoakTally()
    deadline = time.monotonic() + minutes * 60
    chaos = Chaos()
    threads = [
        threading.Thread(target=_soak_worker, args=(client, tally, deadline, seed))
        for seed in range(SOAK_WORKERS)
    ]
    threads.append(threading.Thread(target=_chaos, args=(instances, env, deadline, every_s, chaos)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    step(f"traffic over: waiting for the {len(tally.accepted)} accepted tasks to end")
    ends, pending = _drain(client, tally.accepted)
    report = _report(minutes, tally, None, ends, len(pending)) | {
        "instances": len(instances),
        "kills": chaos.kills,
        "failovers": client.failovers,
        "restart_failures": chaos.failures,
    }
    print(json.dumps(report, indent=2))
    for line in (tally.bad_input_5xx + tally.good_5xx + tally.errors + chaos.failures)[:20]:
        note(line)
    for task_id in list(pending)[:5]:
        note(f"task {task_id}, last read: {client.call('GET', f'/v1/tasks/{task_id}')}")
        _tell_history(instances, task_id)
    return not (pending or tally.bad_input_5xx or tally.good_5xx or chaos.failures)


def _tell_history(instances: list[Instance], task_id: str) -> None:
    """What every instance logged about a task that never ended (its reads left out)."""
    note(f"task {task_id} never ended; what the instances logged about it:")
    for n, instance in enumerate(instances):
        if not instance.log.exists():
            continue
        for line in instance.log.read_text(encoding="utf-8", errors="replace").splitlines():
            if task_id in line and '"GET /v1/tasks/' not in line and "getTask" not in line:
                print(f"  server{n}: {line[:600]}", flush=True)


def cmd_soak_cluster(count: int, minutes: float, every_s: float) -> int:
    if count < 2:
        raise UsageError("soak --instances takes a number of at least 2")
    key = secrets.token_urlsafe(24)
    root = Path(tempfile.mkdtemp(prefix="llorch-soak-cluster-"))
    config_path = root / "soak.yaml"
    config_path.write_text(json.dumps(SOAK_CONFIG, indent=2), encoding="utf-8")
    instances = [
        Instance(
            port=(port := server.free_port()),
            argv=server.llorch_argv(port, config=config_path, data_dir=root / f"var{n}"),
            log=root / f"server{n}.log",
        )
        for n in range(count)
    ]
    ok = False
    try:
        with private_cluster() as pg:
            url = pg.create_database("llorch_soak")
            env = dict(os.environ, LLORCH_SOAK_KEY=key, LLORCH_DATABASE_URL=url)
            step(
                f"soak: {minutes:g} min against {count} instances on {url}, one killed "
                f"every {every_s:g} s ({root})"
            )
            try:
                for instance in instances:
                    instance.start(env)
                ok = _cluster_soak(instances, key, env, minutes, every_s)
            finally:
                for instance in instances:
                    if instance.proc is not None:
                        server.stop(instance.proc)
    except server.ServerError as exc:
        note(str(exc))
    finally:
        if not ok:
            for instance in instances:
                if instance.log.exists():
                    print(server.log_tail(instance.log, 30), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


__all__ = ["cmd_soak_cluster"]
