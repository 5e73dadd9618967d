"""`llorch submit` and `llorch tasks show|cancel|ls|tail`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.live import Live
from rich.text import Text

from llorch.cli.context import JsonOption, session
from llorch.cli.output import EXIT_INTERRUPTED, Output
from llorch.client import Client, Event, StreamFailed, Task, TaskAccepted

app = typer.Typer(help="Inspect, follow and cancel tasks.", no_args_is_help=True)


@dataclass
class Progress:
    """The status line of a running submission: queue position, then tokens and tokens/s."""

    task_id: str
    queue_position: int
    text: str = ""
    tokens: int = 0
    started_at: float | None = None
    state: str = "queued"

    def on(self, event: Event) -> None:
        if event.event == "started":
            self.state = f"running on {event.data.get('replica_id', '?')}"
            self.started_at = time.monotonic()
        elif event.event == "token":
            self.text += str(event.data.get("t", ""))
            self.tokens += 1
        elif event.event == "end":
            self.state = f"done ({event.data.get('finish_reason')})"
        elif event.event == "error":
            self.state = f"failed ({event.data.get('code')})"

    def status(self) -> str:
        if self.started_at is None:
            return f"{self.task_id} · queued at position {self.queue_position}"
        elapsed = max(time.monotonic() - self.started_at, 1e-6)
        rate = self.tokens / elapsed
        return f"{self.task_id} · {self.state} · {self.tokens} tokens · {rate:.1f} tokens/s"

    def render(self) -> Text:
        return Text.assemble(self.text, "\n", (self.status(), "dim"))


def follow(
    client: Client,
    output: Output,
    task_id: str,
    queue_position: int,
    *,
    last_event_id: int | None = None,
    cancel_on_interrupt: bool,
) -> None:
    """Print a task's events until its terminal frame. Ctrl-C cancels the task on the server
    when ``cancel_on_interrupt`` (submit), else it only detaches (tail)."""
    progress = Progress(task_id, queue_position)
    events = client.events(task_id, last_event_id=last_event_id)
    try:
        if output.json:
            for event in events:
                output.emit_json({"id": event.id, "event": event.event, "data": event.data})
                progress.on(event)
                _raise_if_failed(event)
        elif output.stdout.is_terminal:
            with Live(
                progress.render(), console=output.stdout, vertical_overflow="visible"
            ) as live:
                for event in events:
                    progress.on(event)
                    live.update(progress.render())
                    _raise_if_failed(event)
        else:
            _plain(output, progress, events)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            client.cancel_task(task_id)
            output.stderr.print(f"interrupted: canceled task {task_id}", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _plain(output: Output, progress: Progress, events: Iterator[Event]) -> None:
    """Not a terminal: the tokens on stdout as they come, the summary on stderr."""
    for event in events:
        progress.on(event)
        if event.event == "token":
            output.stdout.file.write(str(event.data.get("t", "")))
            output.stdout.file.flush()
        elif event.terminal:
            output.stdout.file.write("\n")
            output.stdout.file.flush()
            output.stderr.print(progress.status(), markup=False)
        _raise_if_failed(event)


def _raise_if_failed(event: Event) -> None:
    if event.event == "error":
        data = event.data
        raise StreamFailed(
            str(data.get("code", "UNKNOWN")),
            str(data.get("message", "")),
            retriable=bool(data.get("retriable", False)),
            retry_after_ms=data.get("retry_after_ms"),
        )


def show_accepted(output: Output, accepted: TaskAccepted) -> None:
    fields = {
        "task_id": accepted.task_id,
        "session_id": accepted.session_id,
        "state": accepted.state,
        "pool": accepted.pool_id,
        "queue_position": accepted.queue_position,
    }
    if accepted.budgets is not None:
        fields["tokens left"] = accepted.budgets.tokens
        fields["cost left"] = accepted.budgets.cost
    output.record("accepted", fields, accepted.raw)


def submit(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    model: Annotated[str, typer.Option(help="The model to run.")] = "mock-small",
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    priority: Annotated[str | None, typer.Option(help="interactive or batch.")] = None,
    session_id: Annotated[
        str | None, typer.Option("--session", help="Run in this session (its budgets).")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    deadline_ms: Annotated[int | None, typer.Option(min=1, help="End within this many ms.")] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the admission and return.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Submit a task and stream its tokens live (Ctrl-C cancels it on the server)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        accepted = client.create_task(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            priority=priority,
            session_id=session_id,
            seed=seed,
            deadline_ms=deadline_ms,
        )
        if no_stream:
            show_accepted(output, accepted)
            return
        if json_out:
            output.emit_json({"event": "accepted", "data": accepted.raw})
        follow(client, output, accepted.task_id, accepted.queue_position, cancel_on_interrupt=True)


def _task_fields(task: Task) -> dict[str, object]:
    return {
        "task_id": task.task_id,
        "state": task.state,
        "model": task.model,
        "priority": task.priority,
        "session": task.session_id,
        "pool": task.pool_id,
        "replica": task.replica_id,
        "queue_position": task.queue_position,
        "finish_reason": task.finish_reason,
        "tokens in/out": f"{task.tokens_in}/{task.tokens_out}",
        "cost": task.cost,
        "error": task.error_code,
        "trace": task.trace_artifact_id,
    }


@app.command("show")
def show(ctx: typer.Context, task_id: str, json_out: JsonOption = False) -> None:
    """A task's state, placement, usage and error."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        task = client.get_task(task_id)
        output.record(f"task {task.task_id}", _task_fields(task), task.raw)


@app.command("cancel")
def cancel(ctx: typer.Context, task_id: str, json_out: JsonOption = False) -> None:
    """Cancel a task (idempotent: canceling an ended task changes nothing)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        client.cancel_task(task_id)
        output.done(f"canceled {task_id}", {"task_id": task_id, "canceled": True})


@app.command("ls")
def ls(
    ctx: typer.Context,
    session_id: Annotated[str | None, typer.Option("--session")] = None,
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=200)] = None,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    json_out: JsonOption = False,
) -> None:
    """A page of tasks, newest first."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        page = client.list_tasks(session_id=session_id, state=state, limit=limit, cursor=cursor)
        raw = {"items": [t.raw for t in page.items], "next_cursor": page.next_cursor}
        rows = [(t.task_id, t.state, t.model, t.pool_id, t.tokens_out) for t in page.items]
        output.table(["task", "state", "model", "pool", "tokens out"], rows, raw)
        if page.next_cursor and not json_out:
            output.stderr.print(f"more: --cursor {page.next_cursor}", markup=False)


@app.command("tail")
def tail(
    ctx: typer.Context,
    task_id: str,
    last_event_id: Annotated[
        int | None, typer.Option("--last-event-id", min=0, help="Resume after this frame.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Attach to a task's stream and replay it (from the start, or after --last-event-id)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        task = client.get_task(task_id)
        follow(
            client,
            output,
            task_id,
            task.queue_position or 0,
            last_event_id=last_event_id,
            cancel_on_interrupt=False,
        )
