"""``flywheel db upgrade|stats``: create or migrate the experience store's schema, and summarize its contents."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from experiments.paths import default_store_url

if TYPE_CHECKING:
    from storage import ExperienceStore

app = typer.Typer(help="The experience store: schema migrations and statistics.", no_args_is_help=True)
console = Console()

DbOption = Annotated[str | None, typer.Option(help="Store URL (default: the embedded SQLite store)")]


def open_store(db: str | None) -> ExperienceStore:
    """The store at ``db`` (or the embedded default); a bad or unreachable one is a ``StoreError``, which the
    CLI reports in one line."""
    from storage import ExperienceStore

    return ExperienceStore(db or default_store_url())


@app.command()
def upgrade(
    db: DbOption = None, revision: Annotated[str, typer.Option(help="Target revision")] = "head"
) -> None:
    """Create the schema or migrate it to the newest revision (safe to repeat)."""
    store = open_store(db)
    before = store.schema_revision()
    store.upgrade(revision)
    after = store.schema_revision()
    verb = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    console.print(f"store {store.dialect} {verb} revision [bold]{after}[/bold]")


@app.command()
def stats(
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw numbers as JSON")] = False,
) -> None:
    """Counts of episodes (by task and outcome), steps, images, relabels, evaluations."""
    numbers = open_store(db).stats()
    if as_json:
        typer.echo(json.dumps(numbers, indent=2, sort_keys=True))
        return
    totals = Table(title=f"experience store ({numbers['backend']}, revision {numbers['schema_revision']})")
    totals.add_column("what")
    totals.add_column("count", justify="right")
    for key in ("episodes", "steps", "human_steps", "chunks", "interventions", "images", "image_bytes"):
        totals.add_row(key.replace("_", " "), f"{numbers[key]:,}")
    for key in ("policy_versions", "runs", "relabels", "evaluations"):
        totals.add_row(key.replace("_", " "), f"{numbers[key]:,}")
    console.print(totals)
    by_task = numbers["episodes_by_task"]
    if by_task:
        outcomes = ("success", "failure", "truncated", "error")
        table = Table(title="episodes by task")
        table.add_column("task")
        for outcome in outcomes:
            table.add_column(outcome, justify="right")
        for task, counts in by_task.items():
            table.add_row(task, *(str(counts.get(outcome, 0)) for outcome in outcomes))
        console.print(table)
