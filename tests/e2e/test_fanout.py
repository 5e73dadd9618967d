"""Two llorch processes on one PostgreSQL database: a task running on A is streamed, resumed and
cancelled on B, through the durable transcript and LISTEN/NOTIFY."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.test_instances import write_config
from tests.support import Sse, parse_sse, serve_process, submit_to, task_of, wait_until
from tools.postgres import private_cluster

pytestmark = pytest.mark.wire

TERMINAL = ("end", "error")


def frames(response: httpx.Response) -> Iterator[Sse]:
    """The SSE frames of a streamed response, each as soon as it arrives (heartbeats skipped)."""
    parsed: list[Sse] = []
    for _ in _lines_with_frames(response, parsed):
        if parsed:
            yield parsed.pop()


@contextmanager
def two_instances(
    tmp_path: Path, url: str, slots: int | None = None
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    config_a = write_config(tmp_path / "a.yaml", url, "a")
    config_b = write_config(tmp_path / "b.yaml", url, "b")
    if slots is not None:
        for path in (config_a, config_b):
            raw = yaml.safe_load(path.read_text())
            raw["pools"][0]["slots_per_replica"] = slots
            path.write_text(yaml.safe_dump(raw))
    with (
        serve_process("--config", str(config_a), data_dir=tmp_path / "a") as (url_a, _, _),
        serve_process("--config", str(config_b), data_dir=tmp_path / "b") as (url_b, _, _),
        httpx.Client(base_url=url_a, timeout=30) as a,
        httpx.Client(base_url=url_b, timeout=30) as b,
    ):
        yield a, b


def ids(events: list[Sse]) -> list[int]:
    return [e.id for e in events]


@pytest.mark.req("ORCH-STATE-0041", "ORCH-STATE-0042")
def test_a_client_on_b_gets_the_tokens_of_a_task_running_on_a_as_they_come(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(tmp_path, postgres_url) as (a, b):
        # 40 tokens at 20 tokens/s: two seconds of streaming on A.
        task_id = submit_to(a, max_tokens=40)["task_id"]
        seen: list[Sse] = []
        state_at_first_token: str | None = None
        with b.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
            assert response.status_code == 200
            for frame in frames(response):
                seen.append(frame)
                if frame.event == "token" and state_at_first_token is None:
                    state_at_first_token = task_of(a, task_id)["state"]
        on_a = parse_sse(a.get(f"/v1/tasks/{task_id}/stream").text)
        ended = task_of(b, task_id)

    assert state_at_first_token == "running"  # B's client had a token while A still ran it
    assert ids(seen) == ids(on_a) == list(range(len(on_a)))
    assert [(e.event, e.data) for e in seen] == [(e.event, e.data) for e in on_a]
    assert [e.event for e in seen if e.event in TERMINAL] == ["end"]
    assert [e.event for e in seen].count("token") == 40
    assert ended["state"] == "succeeded"


@pytest.mark.req("ORCH-STATE-0042")
def test_a_stream_read_partly_on_a_resumes_on_b_without_gap_or_duplicate(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(tmp_path, postgres_url) as (a, b):
        task_id = submit_to(a, max_tokens=40)["task_id"]
        first: list[Sse] = []
        with a.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
            for frame in frames(response):
                first.append(frame)
                if len(first) == 6:
                    break
        last = str(first[-1].id)
        rest = parse_sse(b.get(f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": last}).text)
        whole = parse_sse(a.get(f"/v1/tasks/{task_id}/stream").text)
        again = parse_sse(
            b.get(f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": "999"}).text
        )

    assert ids(first + rest) == ids(whole) == list(range(len(whole))), (ids(first), ids(rest))
    assert [e.event for e in rest if e.event in TERMINAL] == ["end"]
    # A resume past the end of an ended task gets its terminal frame again, as on A.
    assert [(e.id, e.event) for e in again] == [(whole[-1].id, "end")]


@pytest.mark.req("ORCH-STATE-0043")
def test_a_cancel_on_b_stops_the_engine_call_on_a(tmp_path: Path, postgres_url: str) -> None:
    with two_instances(tmp_path, postgres_url) as (a, b):
        # 200 tokens at 20 tokens/s: ten seconds, unless the cancel stops it.
        task_id = submit_to(a, max_tokens=200)["task_id"]
        seen: list[Sse] = []
        with b.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
            for frame in frames(response):
                seen.append(frame)
                if frame.event == "token" and len(seen) == 4:
                    canceled = b.post(f"/v1/tasks/{task_id}/cancel")
                    assert canceled.status_code == 204, canceled.text
        ended = wait_until(
            lambda: (t := task_of(a, task_id))["state"] not in ("queued", "running") and t,
            "the task ended on A",
        )
        on_a = parse_sse(a.get(f"/v1/tasks/{task_id}/stream").text)
        again = b.post(f"/v1/tasks/{task_id}/cancel")

    assert ended["state"] == "canceled", ended
    assert ended["usage"]["tokens_out"] < 100, ended  # stopped well before its 200 tokens
    assert [e.event for e in seen if e.event in TERMINAL] == ["end"]
    assert seen[-1].data["finish_reason"] == "canceled"
    assert ids(seen) == ids(on_a)
    assert [e.event for e in on_a if e.event in TERMINAL] == ["end"]
    assert again.status_code == 204  # idempotent once it ended


def _config(tmp_path: Path, url: str, name: str) -> list[str]:
    return ["--config", str(write_config(tmp_path / f"{name}.yaml", url, name))]


@pytest.mark.req("ORCH-STATE-0044")
def test_after_a_dies_its_client_resumes_on_b_and_gets_the_terminal_frame(
    tmp_path: Path, postgres_url: str
) -> None:
    config_a, config_b = _config(tmp_path, postgres_url, "a"), _config(tmp_path, postgres_url, "b")
    with contextlib.ExitStack() as later:
        with (
            serve_process(*config_a, data_dir=tmp_path / "a") as (url_a, proc, _),
            httpx.Client(base_url=url_a, timeout=30) as a,
        ):
            # A runs the task (B, which could claim it from the shared queue, starts after).
            task_id = submit_to(a, max_tokens=400)["task_id"]
            first: list[Sse] = []
            with a.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
                for frame in frames(response):
                    first.append(frame)
                    if len(first) == 6:
                        break
            url_b, _, _ = later.enter_context(serve_process(*config_b, data_dir=tmp_path / "b"))
            b = later.enter_context(httpx.Client(base_url=url_b, timeout=30))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        # A comes back (the same instance): its start-up ends the task it was running.
        with serve_process(*config_a, data_dir=tmp_path / "a"):
            ended = task_of(b, task_id)
            rest = parse_sse(
                b.get(
                    f"/v1/tasks/{task_id}/stream", headers={"Last-Event-ID": str(first[-1].id)}
                ).text
            )

    assert ended["state"] == "failed" and ended["error"]["code"] == "WORKER_RESET", ended
    seen = ids(first + rest)
    assert seen == sorted(set(seen))  # no duplicate, in order
    assert [e.event for e in rest if e.event in TERMINAL] == ["error"]
    assert rest[-1].data["code"] == "WORKER_RESET"
    # The frames A wrote before it died come first, without a gap.
    tokens = [e.id for e in rest if e.event != "error"]
    assert tokens == list(range(first[-1].id + 1, first[-1].id + 1 + len(tokens)))


@pytest.mark.req("ORCH-STATE-0042", "ORCH-STATE-0040", "ORCH-STATE-0041")
def test_a_remote_stream_heartbeats_through_a_database_outage_and_goes_on(
    tmp_path: Path,
) -> None:
    with private_cluster() as pg:
        url = pg.create_database("fanout")
        configs = []
        for name in ("a", "b"):
            path = write_config(tmp_path / f"{name}.yaml", url, name)
            raw = yaml.safe_load(path.read_text())
            raw["server"]["heartbeat_s"] = 0.2
            raw["database"] |= {"timeout_ms": 2000, "retry_ms": 200, "instance_ttl_ms": 60_000}
            path.write_text(yaml.safe_dump(raw))
            configs.append(["--config", str(path)])
        with (
            serve_process(*configs[0], data_dir=tmp_path / "a") as (url_a, _, _),
            serve_process(*configs[1], data_dir=tmp_path / "b") as (url_b, _, _),
            httpx.Client(base_url=url_a, timeout=30) as a,
            httpx.Client(base_url=url_b, timeout=30) as b,
        ):
            # 120 tokens at 20 tokens/s: six seconds, an outage of about two in the middle.
            task_id = submit_to(a, max_tokens=120)["task_id"]
            seen: list[Sse] = []
            beats_while_down = 0
            down = False
            with b.stream("GET", f"/v1/tasks/{task_id}/stream") as response:
                for line in _lines_with_frames(response, seen):
                    if not down and len(seen) == 5:
                        pg.stop(mode="immediate")
                        down = True
                    elif down and line == ": heartbeat" and not pg.running():
                        beats_while_down += 1
                        if beats_while_down == 3:
                            pg.start()
            ended = task_of(a, task_id)

    assert beats_while_down >= 3  # the response stayed open while the database was away
    assert ids(seen) == list(range(len(seen)))  # no gap: A's frames waited, then came
    assert [e.event for e in seen].count("token") == 120
    assert [e.event for e in seen if e.event in TERMINAL] == ["end"]
    assert ended["state"] == "succeeded"


def _lines_with_frames(response: httpx.Response, into: list[Sse]) -> Iterator[str]:
    """Every line of the response, the frames parsed into ``into`` as they complete."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in fields:
                into.append(Sse(int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        yield line


@pytest.mark.req("ORCH-STATE-0043")
def test_a_cancel_on_b_of_a_task_queued_on_a_ends_it_before_it_runs(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_instances(tmp_path, postgres_url, slots=1) as (a, b):
        # One slot on A: the first task holds it for ten seconds, the second waits.
        running = submit_to(a, max_tokens=200)["task_id"]
        queued = submit_to(a, max_tokens=5)["task_id"]
        assert task_of(b, queued)["state"] == "queued"
        canceled = b.post(f"/v1/tasks/{queued}/cancel")
        assert canceled.status_code == 204, canceled.text
        ended = wait_until(
            lambda: (t := task_of(b, queued))["state"] not in ("queued", "running") and t,
            "the queued task ended",
        )
        events = parse_sse(b.get(f"/v1/tasks/{queued}/stream").text)
        b.post(f"/v1/tasks/{running}/cancel")

    assert ended["state"] == "canceled", ended
    assert ended["usage"]["tokens_out"] == 0
    assert [e.event for e in events] == ["end"]
    assert events[0].data["finish_reason"] == "canceled"


@pytest.mark.req("ORCH-STATE-0043")
def test_a_cancel_recorded_while_its_instance_was_down_is_kept_when_it_restarts(
    tmp_path: Path, postgres_url: str
) -> None:
    configs = {}
    for name in ("a", "b"):
        path = write_config(tmp_path / f"{name}.yaml", postgres_url, name)
        raw = yaml.safe_load(path.read_text())
        raw["pools"][0]["slots_per_replica"] = 1
        path.write_text(yaml.safe_dump(raw))
        configs[name] = ["--config", str(path)]
    with (
        serve_process(*configs["b"], data_dir=tmp_path / "b") as (url_b, _, _),
        httpx.Client(base_url=url_b, timeout=30) as b,
    ):
        with (
            serve_process(*configs["a"], data_dir=tmp_path / "a") as (url_a, proc, _),
            httpx.Client(base_url=url_a, timeout=30) as a,
        ):
            submit_to(a, max_tokens=200)  # holds A's one slot
            queued = submit_to(a, max_tokens=5)["task_id"]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        # Nobody hears the notification; the row keeps the cancel.
        canceled = b.post(f"/v1/tasks/{queued}/cancel")
        assert canceled.status_code == 204, canceled.text
        with serve_process(*configs["a"], data_dir=tmp_path / "a"):
            ended = wait_until(
                lambda: (t := task_of(b, queued))["state"] not in ("queued", "running") and t,
                "the queued task ended",
            )

    assert ended["state"] == "canceled", ended
    assert ended["usage"]["tokens_out"] == 0
