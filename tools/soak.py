"""``xtask.py soak [--minutes N]``: mixed traffic with injected faults against a server process.

Six workers submit, stream, cancel, read and send bad input for N minutes (default 3) to
``python -m llorch serve`` with three pools (healthy, mid-stream resets, hangs); then every
accepted task must end. The report (JSON on stdout) counts lost tasks, 5xx answers and the
server's RSS by minute. Not part of ci.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools import server
from tools.common import UsageError, main, note, step

SOAK_WORKERS = 6
SOAK_DRAIN_TIMEOUT_S = 120.0
# JSON is YAML: the server reads this as its configuration file. Three pools: a healthy one, one
# whose second replica resets mid-stream, one whose second replica hangs (decode timeout).
SOAK_CONFIG: dict[str, object] = {
    "server": {"shutdown_grace_s": 5, "heartbeat_s": 1, "stream_max_lag_events": 512},
    "budgets": {"default": {"tokens": 100000000, "time_ms": 86400000, "cost": 100000}},
    "pools": [
        {
            "id": "steady",
            "model": "mock-small",
            "replicas": 2,
            "slots_per_replica": 4,
            "queue": {"capacity": 64, "policy": "reject"},
            "mock": {"ttft_ms": 5, "tokens_per_s": 400},
        },
        {
            "id": "flaky",
            "model": "mock-flaky",
            "replicas": 2,
            "slots_per_replica": 2,
            "queue": {"capacity": 32, "policy": "drop-lru"},
            "mock": {
                "ttft_ms": 5,
                "tokens_per_s": 400,
                "failure": {"mode": "mid_stream", "after_tokens": 3, "replicas": [1]},
            },
        },
        {
            "id": "stuck",
            "model": "mock-stuck",
            "replicas": 2,
            "slots_per_replica": 2,
            "decode_timeout_ms": 300,
            "queue": {"capacity": 32, "policy": "reject"},
            "mock": {
                "ttft_ms": 5,
                "tokens_per_s": 400,
                "failure": {"mode": "hang", "after_tokens": 2, "replicas": [1]},
            },
        },
    ],
    "auth": {
        "keys": [
            {"name": "soak", "key_env": "LLORCH_SOAK_KEY", "scopes": ["data", "control", "metrics"]}
        ]
    },
}
SOAK_MODELS = ("mock-small", "mock-small", "mock-flaky", "mock-stuck")


@dataclass
class SoakTally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)
    statuses: dict[str, int] = field(default_factory=dict)
    bad_input_5xx: list[str] = field(default_factory=list)
    good_5xx: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: int = 0

    def count(self, kind: str, status: int) -> None:
        with self.lock:
            self.requests += 1
            key = f"{kind} {status}"
            self.statuses[key] = self.statuses.get(key, 0) + 1


class SoakClient:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key

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
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            sent = {"Content-Type": "application/json"} if body is not None else {}
            if auth:
                sent["Authorization"] = f"Bearer {self.key}"
            sent.update(headers or {})
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read(read_limit) if read_limit is not None else response.read()
            return response.status, data
        finally:
            conn.close()


def _soak_task(**fields: object) -> bytes:
    return json.dumps({"model": "mock-small", "prompt": "p", "max_tokens": 4, **fields}).encode()


BadRequest = tuple[str, str, str, "bytes | None", dict[str, str], bool]


def _soak_bad_requests(task_id: str) -> list[BadRequest]:
    """(name, method, path, body, headers, auth): inputs a client gets wrong."""
    text = {"Content-Type": "text/plain"}
    return [
        ("malformed json", "POST", "/v1/tasks", b'{"model": ', {}, True),
        ("wrong type", "POST", "/v1/tasks", _soak_task(max_tokens="4"), {}, True),
        ("unknown field", "POST", "/v1/tasks", _soak_task(x=1), {}, True),
        ("bad utf-8", "POST", "/v1/tasks", b'{"model": "mock-small", "prompt": "\xff"}', {}, True),
        ("huge body", "POST", "/v1/tasks", _soak_task(prompt="x" * 1_100_000), {}, True),
        ("too long prompt", "POST", "/v1/tasks", _soak_task(prompt="y" * 100_001), {}, True),
        ("unknown model", "POST", "/v1/tasks", _soak_task(model="nope"), {}, True),
        ("unknown session", "POST", "/v1/tasks", _soak_task(session_id="s-nope"), {}, True),
        ("no key", "GET", "/v1/tasks", None, {}, False),
        ("bad key", "GET", "/v1/tasks", None, {"Authorization": "Bearer wrong"}, False),
        ("unknown task", "GET", "/v1/tasks/t-nope", None, {}, True),
        ("bad artifact id", "GET", "/v1/artifacts/sha256:xyz", None, {}, True),
        ("bad query", "GET", "/v1/tasks?limit=0&what=1", None, {}, True),
        ("wrong media type", "POST", "/v1/tasks", b"prompt", text, True),
        (
            "bad last-event-id",
            "GET",
            f"/v1/tasks/{task_id}/stream",
            None,
            {"Last-Event-ID": "x"},
            True,
        ),
        ("unknown route", "GET", "/v2/nothing", None, {}, True),
        # The attacks of issue 15 (docs/reliability.md): each answered 4xx, never 5xx.
        ("deep json", "POST", "/v1/tasks", b"[" * 100_000 + b"]" * 100_000, {}, True),
        ("huge integer", "POST", "/v1/tasks", _raw_task(b'"max_tokens": ' + b"9" * 5000), {}, True),
        ("nan temperature", "POST", "/v1/tasks", _raw_task(b'"temperature": NaN'), {}, True),
        ("nan budget", "POST", "/v1/sessions", b'{"budgets": {"tokens": NaN}}', {}, True),
        ("huge header", "GET", "/v1/tasks", None, {"X-Big": "x" * 70_000}, True),
        (
            "huge last-event-id",
            "GET",
            f"/v1/tasks/{task_id}/stream",
            None,
            {"Last-Event-ID": "9" * 20_000},
            True,
        ),
    ]


def _raw_task(field: bytes) -> bytes:
    """A task body with one more member written as raw JSON text (json.dumps cannot write it)."""
    return b'{"model": "mock-small", "prompt": "p", ' + field + b"}"


def _soak_worker(client: SoakClient, tally: SoakTally, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    last_task = "t-none"
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.55:  # a task, then one of the ways clients follow it
                body = {
                    "model": rng.choice(SOAK_MODELS),
                    "prompt": "soak " + str(rng.random()),
                    "max_tokens": rng.randint(1, 40),
                    "priority": rng.choice(["interactive", "batch"]),
                }
                status, data = client.call("POST", "/v1/tasks", json.dumps(body).encode())
                tally.count("submit", status)
                if status >= 500 and status != 503:
                    tally.good_5xx.append(f"submit {status} {data[:200]!r}")
                if status != 202:
                    continue
                last_task = json.loads(data)["task_id"]
                with tally.lock:
                    tally.accepted.add(last_task)
                follow = rng.random()
                if follow < 0.4:
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}/stream")
                    tally.count("stream", status)
                elif follow < 0.55:  # a reader that leaves early
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}/stream", read_limit=200)
                    tally.count("stream-partial", status)
                elif follow < 0.7:
                    status, _ = client.call("POST", f"/v1/tasks/{last_task}/cancel")
                    tally.count("cancel", status)
                else:
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}")
                    tally.count("get", status)
            elif roll < 0.65:
                content = json.dumps({"kind": "other", "content": "soak " + str(rng.random())})
                status, _ = client.call("POST", "/v1/artifacts", content.encode())
                tally.count("artifact", status)
            else:
                name, method, path, body_bytes, headers, auth = rng.choice(
                    _soak_bad_requests(last_task)
                )
                status, data = client.call(method, path, body_bytes, headers=headers, auth=auth)
                tally.count(f"bad:{name}", status)
                if status >= 500:
                    tally.bad_input_5xx.append(f"{name}: {status} {data[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            with tally.lock:
                tally.errors.append(f"{type(exc).__name__}: {exc}")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Rss:
    """The server's resident set in KiB: at the start, its peak, at the end, by minute."""

    start: int
    peak: int = 0
    end: int = 0
    by_minute: list[int] = field(default_factory=list)


def _traffic(client: SoakClient, tally: SoakTally, pid: int, minutes: float) -> Rss:
    """Run the workers for ``minutes``, sampling the server's RSS every second."""
    rss = Rss(start=_rss_kib(pid))
    rss.peak = rss.start
    deadline = time.monotonic() + minutes * 60
    workers = [
        threading.Thread(target=_soak_worker, args=(client, tally, deadline, seed))
        for seed in range(SOAK_WORKERS)
    ]
    for worker in workers:
        worker.start()
    # The RSS at the end of each minute: growth that stops after the warm-up, or not.
    started = time.monotonic()
    while any(w.is_alive() for w in workers):
        time.sleep(1)
        now = _rss_kib(pid)
        rss.peak = max(rss.peak, now)
        if time.monotonic() - started >= 60 * (len(rss.by_minute) + 1):
            rss.by_minute.append(now)
    rss.end = _rss_kib(pid)
    return rss


def _drain(client: SoakClient, accepted: set[str]) -> tuple[dict[str, dict[str, object]], set[str]]:
    """Poll every accepted task until it ends: (task id -> its final view, ids still pending)."""
    ends: dict[str, dict[str, object]] = {}
    drain_deadline = time.monotonic() + SOAK_DRAIN_TIMEOUT_S
    pending = set(accepted)
    while pending and time.monotonic() < drain_deadline:
        for task_id in list(pending):
            status, data = client.call("GET", f"/v1/tasks/{task_id}")
            task = json.loads(data) if status == 200 else {}
            if task.get("state") in ("succeeded", "failed", "canceled"):
                ends[task_id] = task
                pending.discard(task_id)
        if pending:
            time.sleep(0.5)
    return ends, pending


def _report(
    minutes: float,
    tally: SoakTally,
    rss: Rss | None,
    ends: dict[str, dict[str, object]],
    lost: int,
) -> dict[str, object]:
    """The soak's outcome; the server's RSS unless ``rss`` is None (several processes)."""
    by_outcome: dict[str, int] = {}
    for task in ends.values():
        error = task.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        outcome = f"failed {code}" if task["state"] == "failed" else str(task["state"])
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    report: dict[str, object] = {
        "minutes": minutes,
        "requests": tally.requests,
        "accepted": len(tally.accepted),
        "completed": len(ends),
        "outcomes": dict(sorted(by_outcome.items())),
        "lost": lost,
        "bad_input_5xx": len(tally.bad_input_5xx),
        "unexpected_5xx": len(tally.good_5xx),
        "client_errors": len(tally.errors),
        "statuses": dict(sorted(tally.statuses.items())),
    }
    if rss is not None:
        report["rss_kib"] = {
            "start": rss.start,
            "peak": rss.peak,
            "end": rss.end,
            "by_minute": rss.by_minute,
        }
        report["rss_growth_kib"] = rss.end - rss.start
    return report


def _soak(port: int, key: str, proc_pid: int, minutes: float) -> bool:
    client = SoakClient(port, key)
    tally = SoakTally()
    rss = _traffic(client, tally, proc_pid, minutes)
    step(f"traffic over: waiting for the {len(tally.accepted)} accepted tasks to end")
    ends, pending = _drain(client, tally.accepted)
    print(json.dumps(_report(minutes, tally, rss, ends, len(pending)), indent=2))
    for line in (tally.bad_input_5xx + tally.good_5xx + tally.errors)[:20]:
        note(line)
    return not (pending or tally.bad_input_5xx or tally.good_5xx)


def _options(args: list[str]) -> dict[str, float]:
    """``--minutes M``, ``--instances N``, ``--kill-every S``, in any order."""
    names = {"--minutes": "minutes", "--instances": "instances", "--kill-every": "kill_every"}
    options = {"minutes": 3.0, "instances": 1.0, "kill_every": 60.0}
    pairs = list(zip(args[::2], args[1::2], strict=False))
    if len(args) % 2 or any(flag not in names for flag, _ in pairs):
        raise UsageError("soak takes --minutes M, --instances N and --kill-every S")
    for flag, value in pairs:
        try:
            options[names[flag]] = float(value)
        except ValueError as exc:
            raise UsageError(f"soak: {flag} takes a number, not {value!r}") from exc
    return options


def cmd_soak(args: list[str]) -> int:
    options = _options(args)
    minutes = options["minutes"]
    if options["instances"] != 1:
        from tools.soak_cluster import cmd_soak_cluster

        return cmd_soak_cluster(int(options["instances"]), minutes, options["kill_every"])
    port = server.free_port()
    key = secrets.token_urlsafe(24)
    data_dir = Path(tempfile.mkdtemp(prefix="llorch-soak-"))
    config_path = data_dir / "soak.yaml"
    config_path.write_text(json.dumps(SOAK_CONFIG, indent=2), encoding="utf-8")
    log = data_dir / "server.log"
    step(f"soak: {minutes:g} min of mixed traffic against llorch on port {port} ({config_path})")
    argv = server.llorch_argv(port, config=config_path, data_dir=data_dir / "var")
    ok = False
    try:
        ready = f"http://127.0.0.1:{port}/readyz"
        env = dict(os.environ, LLORCH_SOAK_KEY=key)
        with server.running(argv, log=log, ready_url=ready, env=env) as proc:
            ok = _soak(port, key, proc.pid, minutes)
    except server.ServerError as exc:
        note(str(exc))
    finally:
        if not ok:
            print(server.log_tail(log), flush=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main("soak", cmd_soak))
