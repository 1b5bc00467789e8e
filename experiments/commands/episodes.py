"""``flywheel episodes list|show``: browse the experience store."""

from __future__ import annotations

import uuid
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from experiments.commands.db import DbOption, open_store
from experiments.validation import UserError

app = typer.Typer(help="Browse stored episodes.", no_args_is_help=True)
console = Console()


@app.command(name="list")
def list_episodes(
    db: DbOption = None,
    task: Annotated[str | None, typer.Option(help="Only this task")] = None,
    outcome: Annotated[str | None, typer.Option(help="success, failure, truncated or error")] = None,
    policy_version: Annotated[str | None, typer.Option(help="Only episodes of this policy version")] = None,
    run_id: Annotated[str | None, typer.Option(help="Only episodes of this run")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (the newest)")] = 50,
) -> None:
    """A table of episodes matching the filters (newest last)."""
    from storage import Outcome

    store = open_store(db)
    total = store.count_episodes(task, outcome, policy_version, run_id)
    newest = store.list_episodes(task, outcome, policy_version, run_id, limit=limit, newest_first=True)
    summaries = newest[::-1]
    table = Table(title=f"{len(summaries)} of {total} episodes")
    table.add_column("uuid", no_wrap=True, min_width=36)
    for column in ("task", "outcome", "steps", "return", "human", "policy", "seed", "created (UTC)"):
        table.add_column(
            column, justify="right" if column in ("steps", "return", "human", "seed") else "left"
        )
    colors = {
        Outcome.SUCCESS: "green",
        Outcome.FAILURE: "red",
        Outcome.TRUNCATED: "yellow",
        Outcome.ERROR: "magenta",
    }
    for s in summaries:
        table.add_row(
            str(s.uuid),
            s.task,
            f"[{colors[s.outcome]}]{s.outcome.value}[/]",
            str(s.length),
            f"{s.total_reward:.1f}",
            str(s.human_steps),
            s.policy_version or "-",
            "-" if s.seed is None else str(s.seed),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@app.command()
def show(
    episode: Annotated[str, typer.Argument(help="Episode UUID")],
    db: DbOption = None,
) -> None:
    """One episode in detail: identity, outcome, provenance, interventions, chunks, cameras, per-step summary."""
    from storage import Outcome, StepSource

    try:
        episode_uuid = uuid.UUID(episode)
    except ValueError:
        raise UserError(
            f"episode {episode!r}: expected an episode UUID (as `flywheel episodes list` shows them)"
        ) from None
    record = open_store(db).load_episode(episode_uuid, images=True)
    info = Table(title=f"episode {record.uuid}", show_header=False)
    info.add_column("field")
    info.add_column("value")
    human = int(np.count_nonzero(record.sources == StepSource.HUMAN))
    versions = sorted({v for v in record.policy_versions if v is not None})
    rows = {
        "task": record.task,
        "env": record.env_id,
        "outcome": record.outcome.value if isinstance(record.outcome, Outcome) else str(record.outcome),
        "steps": str(record.length),
        "return": f"{float(record.rewards.sum()):.3f}",
        "terminated / truncated": f"{int(record.terminated.sum())} / {int(record.truncated.sum())}",
        "human steps": f"{human} ({human / max(record.length, 1):.0%})",
        "policy version": record.policy_version or "-",
        "versions on steps": ", ".join(versions) or "-",
        "seed": "-" if record.seed is None else str(record.seed),
        "run": record.run_id or "-",
        "state / action dims": f"{record.states.shape[1]} / {record.actions.shape[1]}",
        "chunks": f"{record.chunks.shape[0]} × H={record.chunks.shape[1]}",
        "mean latency (ms)": _mean_latency(record.latency_ms),
        "cameras": ", ".join(f"{c} {f.shape[1]}×{f.shape[2]}" for c, f in record.images.items()) or "-",
        "privileged state": "-" if record.privileged is None else f"{record.privileged.shape[1]}-D",
        "metadata": str(record.metadata),
        "error": record.error or "-",
    }
    for field, value in rows.items():
        info.add_row(field, value)
    console.print(info)
    if record.interventions:
        segments = Table(title="interventions")
        for column in ("start", "end", "steps", "trigger"):
            segments.add_column(column)
        for s in record.interventions:
            segments.add_row(str(s.t_start), str(s.t_end), str(s.t_end - s.t_start), s.trigger)
        console.print(segments)


def _mean_latency(latency_ms: np.ndarray) -> str:
    """Mean over steps that started a chunk (latency > 0)."""
    positive = latency_ms[latency_ms > 0]
    return f"{float(positive.mean()):.1f}" if positive.size else "-"
