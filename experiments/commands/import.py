"""``flywheel import``: a LeRobot dataset folder (v2.0, v2.1 or v3.0) → stored demonstrations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.commands.db import DbOption
from experiments.paths import default_store_url

app = typer.Typer()


@app.command(name="import")
def import_dataset(
    source: Annotated[Path, typer.Argument(help="LeRobot dataset folder (with meta/info.json)")],
    task: Annotated[
        str | None,
        typer.Option(
            help="Store task name to file the episodes under, e.g. the env they were recorded in "
            "(default: a flywheel export's own, else the folder name)"
        ),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Run of the imported episodes (default: import-<folder>)")
    ] = None,
    repo_id: Annotated[
        str | None, typer.Option(help="The dataset's Hub id (e.g. lerobot/pusht), recorded as provenance")
    ] = None,
    outcome: Annotated[
        str, typer.Option(help="Outcome of episodes whose dataset records none: success, failure, truncated")
    ] = "success",
    state_key: Annotated[str, typer.Option(help="Feature holding the state vector")] = "observation.state",
    action_key: Annotated[str, typer.Option(help="Feature holding the action")] = "action",
    image_size: Annotated[
        int | None,
        typer.Option(min=16, help="Resize camera frames to this square side (default: keep their size)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many episodes")] = None,
    db: DbOption = None,
) -> None:
    """Import a LeRobot dataset's episodes as demonstrations (human steps, with their task text and provenance);
    importing the same data again stores nothing new. Then: flywheel train bc --task <task> --run-id <run>."""
    from experiments.lerobot_import import ImportConfig, import_lerobot

    config = ImportConfig(
        store_url=db or default_store_url(),
        source=source,
        repo_id=repo_id,
        task=task,
        run_id=run_id,
        outcome=outcome,
        state_key=state_key,
        action_key=action_key,
        image_size=image_size,
        limit=limit,
    )
    summary = import_lerobot(config)
    typer.echo(
        f"imported {summary['episodes']} episodes ({summary['frames']} frames, {summary['duplicates']} already "
        f"stored) from LeRobot {summary['version']} dataset {source} as task {', '.join(summary['tasks'])}, "
        f"run {summary['run_id']}"
    )
