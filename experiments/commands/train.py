"""``flywheel train``: train policies from the experience store."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from experiments.paths import checkpoints_dir, default_store_url
from experiments.training import BCConfig, EpisodeFilter, train_vla
from experiments.validation import first_error
from storage import ExperienceStore

app = typer.Typer(help="Train policies from stored episodes.", no_args_is_help=True)
console = Console()


@app.command("bc")
def bc(
    task: Annotated[list[str], typer.Option(help="Task(s) to train on; repeat for a multi-task model")],
    episodes: Annotated[int | None, typer.Option(min=1, help="At most this many episodes per task")] = None,
    run_id: Annotated[list[str] | None, typer.Option(help="Only episodes of these runs (repeatable)")] = None,
    successes_only: Annotated[bool, typer.Option(help="Only successful episodes")] = False,
    size: Annotated[str, typer.Option(help="Model size: tiny or small")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="Gradient steps")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    image_size: Annotated[int, typer.Option(min=16, help="Must match the stored images")] = 64,
    cameras: Annotated[str, typer.Option(help="Comma-separated camera names (as stored)")] = "corner2",
    knowledge_insulation: Annotated[
        bool, typer.Option(help="FAST loss on the backbone, stop-gradient from the expert")
    ] = False,
    eval_episodes: Annotated[
        int, typer.Option(min=0, help="Evaluation episodes per task after training")
    ] = 20,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    db: Annotated[str | None, typer.Option(help="Store URL (default: the embedded SQLite store)")] = None,
) -> None:
    """Behaviour-clone the built-in VLA on stored episodes; the checkpoint is registered as a policy version."""
    try:
        selection = EpisodeFilter(
            tasks=task,
            run_ids=run_id,
            outcomes=["success"] if successes_only else None,
            max_episodes_per_task=episodes,
        )
        config = BCConfig(
            size=size,
            cameras=tuple(c.strip() for c in cameras.split(",") if c.strip()),
            image_size=image_size,
            knowledge_insulation=knowledge_insulation,
            steps=steps,
            batch_size=batch_size,
            eval_episodes=eval_episodes,
            seed=seed,
        )
    except ValidationError as error:
        raise typer.BadParameter(first_error(error)) from error
    store = ExperienceStore(db or default_store_url())
    store.upgrade()
    trained = train_vla(store, selection, config, checkpoints_dir())
    console.print(
        f"trained on {trained.episodes_used} episodes → [bold]{trained.version}[/bold] at {trained.checkpoint}"
    )
    if trained.evaluations:
        table = Table("task", "success", "95% CI", "mean length")
        for result in trained.evaluations:
            table.add_row(
                result.task,
                f"{result.successes}/{result.n} ({result.success_rate:.0%})",
                f"[{result.ci_low:.2f}, {result.ci_high:.2f}]",
                f"{result.mean_length:.0f}",
            )
        console.print(table)
