"""``flywheel export``: stored episodes → a LeRobot (v2.1 parquet) or Minari (HDF5) dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from experiments.paths import default_store_url
from experiments.validation import first_error

app = typer.Typer()


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


@app.command(name="export")
def export(
    format: Annotated[str, typer.Option("--format", help="lerobot or minari")],
    output: Annotated[Path, typer.Option(help="Destination folder (must be empty or absent)")],
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all)")] = None,
    runs: Annotated[str | None, typer.Option(help="Comma-separated run ids (default: all)")] = None,
    outcome: Annotated[str | None, typer.Option(help="success, failure or truncated")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many episodes")] = None,
    relabel: Annotated[str | None, typer.Option(help="Relabel id whose values/advantages to include")] = None,
    dataset_id: Annotated[str, typer.Option(help="Minari dataset id")] = "flywheel/export-v0",
    db: Annotated[str | None, typer.Option(help="Store URL (default: the embedded SQLite store)")] = None,
) -> None:
    """Export selected episodes (images, actions, interventions, relabels) for other ecosystems' loaders."""
    from experiments.export import ExportConfig, ExportError, export_episodes

    try:
        config = ExportConfig(
            store_url=db or default_store_url(),
            output=output,
            format=format,
            tasks=_split(tasks),
            run_ids=_split(runs),
            outcome=outcome,
            limit=limit,
            relabel_id=relabel,
            dataset_id=dataset_id,
        )
        summary = export_episodes(config)
    except ValidationError as error:
        typer.echo(f"error: {first_error(error)}", err=True)
        raise typer.Exit(code=2) from error
    except (ExportError, LookupError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(
        f"exported {summary['episodes']} episodes ({summary['frames']} frames) as {summary['format']} to {summary['path']}"
    )
