"""``flywheel export``: stored episodes → a LeRobot (v3.0) or Minari (HDF5) dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.commands.db import DbOption
from experiments.paths import default_store_url

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
    fps: Annotated[
        int | None, typer.Option(min=1, help="LeRobot frame rate (default: the rate the episodes record)")
    ] = None,
    video: Annotated[
        bool, typer.Option(help="LeRobot: cameras as mp4 videos (H.264) instead of PNG images in the data")
    ] = False,
    split: Annotated[
        bool,
        typer.Option(help="LeRobot: write one dataset per camera/image-size set into --output/<set>"),
    ] = False,
    db: DbOption = None,
) -> None:
    """Export selected episodes (images, actions, interventions, relabels) for other ecosystems' loaders."""
    from experiments.export import ExportConfig, export_episodes

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
        fps=fps,
        video=video,
        split=split,
    )
    try:
        summary = export_episodes(config)
    except LookupError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    for dataset in summary.get("datasets", [summary]):
        typer.echo(
            f"exported {dataset['episodes']} episodes ({dataset['frames']} frames) as {summary['format']} to {dataset['path']}"
        )
