"""`llorch sessions`, `llorch artifacts`, `llorch pools` and `llorch caps`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llorch.cli.context import JsonOption, session
from llorch.cli.output import EXIT_INVALID, Output
from llorch.client import Artifact, PoolHealth, Session

sessions = typer.Typer(help="Open, inspect and end sessions.", no_args_is_help=True)
artifacts = typer.Typer(help="Store and read content-addressed artifacts.", no_args_is_help=True)
pools = typer.Typer(help="Pool health and operations.", no_args_is_help=True)


def _session_fields(s: Session) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "ttl left (ms)": s.ttl_ms_remaining,
        "turns": f"{s.turns}/{s.max_turns}",
        "kv warm": s.kv_warmth,
        "tokens left": s.budgets.tokens,
        "time left (ms)": s.budgets.time_ms,
        "cost left": s.budgets.cost,
    }


@sessions.command("new")
def session_new(
    ctx: typer.Context,
    ttl_ms: Annotated[int | None, typer.Option(min=1000)] = None,
    max_turns: Annotated[int | None, typer.Option(min=1)] = None,
    tokens: Annotated[int | None, typer.Option(min=0, help="Token budget.")] = None,
    time_ms: Annotated[int | None, typer.Option(min=0, help="Engine-time budget.")] = None,
    cost: Annotated[float | None, typer.Option(min=0, help="Cost budget.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Open a session (budgets are capped by the server's policy)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        s = client.create_session(
            ttl_ms=ttl_ms, max_turns=max_turns, tokens=tokens, time_ms=time_ms, cost=cost
        )
        output.record(f"session {s.session_id}", _session_fields(s), s.raw)


@sessions.command("show")
def session_show(ctx: typer.Context, session_id: str, json_out: JsonOption = False) -> None:
    """A session's TTL, turns and remaining budgets."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        s = client.get_session(session_id)
        output.record(f"session {s.session_id}", _session_fields(s), s.raw)


@sessions.command("rm")
def session_rm(ctx: typer.Context, session_id: str, json_out: JsonOption = False) -> None:
    """End a session."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        client.delete_session(session_id)
        output.done(f"deleted {session_id}", {"session_id": session_id, "deleted": True})


def _artifact_fields(a: Artifact) -> dict[str, Any]:
    return {
        "id": a.id,
        "kind": a.kind,
        "size (bytes)": a.size_bytes,
        "tags": list(a.tags),
        "task": a.raw.get("task_id"),
    }


@artifacts.command("put")
def artifact_put(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="A UTF-8 text file, or - for stdin.")],
    kind: Annotated[str, typer.Option(help="prompt, trace, transcript, document, other")] = (
        "document"
    ),
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeatable).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Store a file; its id is the sha256 of its content (storing it twice changes nothing)."""
    output = Output(json=json_out)
    try:
        content = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        output.stderr.print(f"error: cannot read {file}: {exc}", markup=False)
        raise typer.Exit(EXIT_INVALID) from None
    with session(ctx, output) as client:
        a = client.create_artifact(kind=kind, content=content, tags=tag or None)
        output.record(f"artifact {a.id}", _artifact_fields(a), a.raw)


@artifacts.command("get")
def artifact_get(ctx: typer.Context, artifact_id: str, json_out: JsonOption = False) -> None:
    """An artifact and its content (verified against its digest by the server)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        a = client.get_artifact(artifact_id)
        output.record(f"artifact {a.id}", _artifact_fields(a), a.raw)
        if not json_out:
            output.stdout.print(a.content or "", markup=False, highlight=False)


@artifacts.command("ls")
def artifact_ls(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option()] = None,
    tag: Annotated[str | None, typer.Option()] = None,
    task_id: Annotated[str | None, typer.Option("--task")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=200)] = None,
    cursor: Annotated[str | None, typer.Option()] = None,
    json_out: JsonOption = False,
) -> None:
    """A page of artifacts, newest first."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        page = client.list_artifacts(
            kind=kind, tag=tag, task_id=task_id, limit=limit, cursor=cursor
        )
        raw = {"items": [a.raw for a in page.items], "next_cursor": page.next_cursor}
        rows = [(a.id, a.kind, a.size_bytes, list(a.tags)) for a in page.items]
        output.table(["id", "kind", "bytes", "tags"], rows, raw)


def _pool_fields(p: PoolHealth) -> dict[str, Any]:
    busy = sum(int(r.get("slots_busy", 0)) for r in p.replicas)
    total = sum(int(r.get("slots_total", 0)) for r in p.replicas)
    return {
        "pool": p.pool_id,
        "engine": p.engine,
        "model": p.model,
        "ready": p.ready,
        "draining": p.draining,
        "reloading": p.reloading,
        "slots busy": f"{busy}/{total}",
        "queue depth": p.queue_depth,
        "replicas": [f"{r.get('id')}:{r.get('state')}" for r in p.replicas],
    }


@pools.command("ls")
def pool_ls(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """Every pool with its state."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        found = client.list_pools()
        rows = [
            (p.pool_id, p.model, p.ready, p.draining, p.reloading, p.queue_depth) for p in found
        ]
        raw = {"items": [p.raw for p in found]}
        output.table(["pool", "model", "ready", "draining", "reloading", "queued"], rows, raw)


@pools.command("health")
def pool_health(ctx: typer.Context, pool_id: str, json_out: JsonOption = False) -> None:
    """One pool's readiness, replicas, slots and queue depth."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        p = client.get_pool_health(pool_id)
        output.record(f"pool {p.pool_id}", _pool_fields(p), p.raw)


@pools.command("drain")
def pool_drain(
    ctx: typer.Context,
    pool_id: str,
    deadline_ms: Annotated[int, typer.Option(min=0, help="Cancel what is left after this.")] = (
        30_000
    ),
    json_out: JsonOption = False,
) -> None:
    """Stop admitting to a pool; what still runs at the deadline is canceled."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        p = client.drain_pool(pool_id, deadline_ms=deadline_ms)
        output.record(f"pool {p.pool_id} draining", _pool_fields(p), p.raw)


@pools.command("resume")
def pool_resume(ctx: typer.Context, pool_id: str, json_out: JsonOption = False) -> None:
    """A drained pool admits again."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        p = client.resume_pool(pool_id)
        output.record(f"pool {p.pool_id} resumed", _pool_fields(p), p.raw)


@pools.command("reload")
def pool_reload(
    ctx: typer.Context,
    pool_id: str,
    model: Annotated[str, typer.Option(help="The model to switch to.")],
    json_out: JsonOption = False,
) -> None:
    """Switch a pool to another model (rolled back if the new one fails)."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        p = client.reload_pool(pool_id, model=model)
        output.record(f"pool {p.pool_id} reloading", _pool_fields(p), p.raw)


def caps(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """What the server can do now: pools, models, limits, budgets, pricing."""
    output = Output(json=json_out)
    with session(ctx, output) as client:
        found = client.get_capabilities()
        if json_out:
            output.emit_json(found)
            return
        output.stdout.print(f"api {found.get('api_version')}", markup=False)
        rows = [
            (
                p["pool_id"],
                p["engine"],
                list(p["models"]),
                p["max_tokens_out"],
                f"{p['slots_free']}/{p['slots_total']}",
                f"{p['queue_policy']} ({p['queue_capacity']})",
                p["ready"],
            )
            for p in found.get("pools", [])
        ]
        output.table(
            ["pool", "engine", "models", "max tokens", "slots free", "queue", "ready"], rows, found
        )
        budgets = found.get("budgets", {})
        output.stdout.print(
            f"default budget: {budgets.get('default_tokens')} tokens, "
            f"{budgets.get('default_time_ms')} ms, cost {budgets.get('default_cost')}",
            markup=False,
        )
