"""``flywheel iterate``: run improvement iterations of a pipeline config, once (cron) or on a schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from experiments.stages import StageOutput

app = typer.Typer()
console = Console(stderr=True)


@app.command(name="iterate")
def iterate(
    config: Annotated[str, typer.Option(help="Pipeline config (YAML), e.g. configs/reach-recap.yaml")],
    once: Annotated[bool, typer.Option("--once", help="Run (or resume) one iteration and exit")] = False,
    every: Annotated[str | None, typer.Option(help="Run an iteration every interval, e.g. 6h, 30m")] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="With --every: stop after this many iterations")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars")] = True,
) -> None:
    """Collect → relabel → train → evaluate → gate → register → deploy. Rerun after a crash to resume."""
    from experiments.pipeline import Pipeline
    from experiments.pipeline_config import PipelineConfigError, load_pipeline_config
    from experiments.schedule import ScheduleError, parse_interval, run_every, run_once

    if once == (every is not None):
        raise typer.BadParameter("pass exactly one of --once or --every <interval>")
    try:
        pipeline_config = load_pipeline_config(config)
        interval = parse_interval(every) if every is not None else None
        pipeline = Pipeline(pipeline_config, progress=progress, on_stage=_print_stage)
        if interval is None:
            _print_iteration(run_once(pipeline).outputs)
        else:
            run_every(
                pipeline, interval, iterations, on_iteration=lambda state: _print_iteration(state.outputs)
            )
    except (PipelineConfigError, ScheduleError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error


def _print_stage(iteration: int, stage: str, output: StageOutput) -> None:
    console.print(f"[bold]iteration {iteration}[/bold] {stage} done")


def _print_iteration(outputs: dict[str, StageOutput]) -> None:
    table = Table("role", "version", "success", "95% CI", "successes/h")
    evaluation = outputs["evaluate"]
    for role in ("deployed", "candidate"):
        for task, figures in getattr(evaluation, role).items():
            table.add_row(
                f"{role} ({task})",
                evaluation.versions[role],
                f"{figures['success_rate']:.0%}",
                f"[{figures['ci_low']:.2f}, {figures['ci_high']:.2f}]",
                f"{figures['successes_per_hour']:.0f}",
            )
    console.print(table)
    console.print(f"gate: {outputs['gate'].reason}\ndeployed: {outputs['deploy'].deployed}")
