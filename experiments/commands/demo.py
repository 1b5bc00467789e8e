"""``flywheel demo``: demos → VLA prior → one RECAP iteration → table of the prior, RECAP and filtered BC on the same
data (see experiments/demo.py)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer()
console = Console()


@app.command(name="demo")
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A few-minute version (CI smoke run)")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars")] = True,
) -> None:
    """The whole flywheel on the embedded defaults (≤ 15 min on 2 CPU cores; --quick: a few minutes)."""
    from experiments.demo import comparison, demo_home_note, mlflow_hint, run_demo

    started = time.monotonic()
    console.print(f"[bold]flywheel demo[/bold]{' --quick' if quick else ''}: data in {demo_home_note()}")
    pipeline, state = run_demo(quick=quick, progress=progress, on_step=console.print)
    table = Table("policy", "version", "task", "success", "95% CI", "mean length", "successes/h")
    for row in comparison(state):
        table.add_row(
            row["policy"],
            row["version"],
            row["task"],
            f"{row['success_rate']:.0%} ({row['successes']:.0f}/{row['n']:.0f})",
            f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]",
            f"{row['mean_length']:.1f}",
            f"{row['successes_per_hour']:.0f}",
        )
    console.print(table)
    console.print(
        "versions: " + ", ".join(f"{row['policy']} = {row['version']}" for row in comparison(state))
    )
    console.print(f"gate: {state.outputs['gate'].reason}")
    console.print(mlflow_hint(pipeline))
    console.print(f"wall time {time.monotonic() - started:.0f} s")
