"""``flywheel recap``: relabel stored experience with advantages and run RECAP improvement iterations."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from envs import EnvConfig
from experiments.paths import checkpoints_dir, default_store_url
from experiments.recap_iteration import RecapIterationConfig, run_recap_iteration
from experiments.training import BCConfig
from storage import ExperienceStore

app = typer.Typer(
    help="RECAP: advantage relabeling and advantage-conditioned policy improvement.", no_args_is_help=True
)
console = Console()


@app.command("iterate")
def iterate(
    task: Annotated[str, typer.Option(help="Meta-World task")],
    policy: Annotated[str, typer.Option(help="Current policy: registered version or checkpoint directory")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to collect with the simulated human")] = 50,
    steps: Annotated[int, typer.Option(min=1, help="Policy training steps")] = 2000,
    eval_episodes: Annotated[int, typer.Option(min=0, help="Evaluation episodes before and after")] = 50,
    image_size: Annotated[int, typer.Option(min=16)] = 64,
    cameras: Annotated[str, typer.Option(help="Comma-separated camera names")] = "corner2",
    cfg_beta: Annotated[
        float, typer.Option(min=0.0, help="Classifier-free guidance β (1 = plain conditioning)")
    ] = 1.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    db: Annotated[str | None, typer.Option(help="Store URL (default: the embedded SQLite store)")] = None,
) -> None:
    """Collect with interventions → train V and relabel (cross-fitted) → retrain π conditioned → evaluate."""
    camera_names = tuple(c.strip() for c in cameras.split(",") if c.strip())
    config = RecapIterationConfig(
        task=task,
        policy=policy,
        store_url=db or default_store_url(),
        env=EnvConfig(task=task, cameras=camera_names, width=image_size, height=image_size, seed=seed),
        collect_episodes=episodes,
        bc=BCConfig(
            cameras=camera_names, image_size=image_size, steps=steps, condition_dropout=0.3, seed=seed
        ),
        cfg_beta=cfg_beta,
        eval_episodes=eval_episodes,
        seed=seed,
    )
    result = run_recap_iteration(config, checkpoints_dir())
    diagnostics = result.relabel.diagnostics
    console.print(f"relabel [bold]{result.relabel.relabel_id}[/bold]  diagnostics: {_headline(diagnostics)}")
    table = Table("policy", "version", "success", "95% CI", "mean length", "successes/h")
    for name, evaluation in (("before", result.before), ("after", result.after)):
        if evaluation is not None:
            table.add_row(
                name,
                evaluation.policy_version,
                f"{evaluation.success_rate:.0%}",
                f"[{evaluation.ci_low:.2f}, {evaluation.ci_high:.2f}]",
                f"{evaluation.mean_length:.0f}",
                f"{evaluation.successes_per_hour:.0f}",
            )
    console.print(table)


@app.command("relabels")
def relabels(db: Annotated[str | None, typer.Option(help="Store URL")] = None) -> None:
    """List stored relabel versions with their label-quality diagnostics."""
    store = ExperienceStore(db or default_store_url())
    table = Table("relabel", "parent", "value model", "episodes", "diagnostics")
    for record in store.list_relabels(method="recap"):
        table.add_row(
            str(record.relabel_id),
            str(record.parent_id or "—"),
            str(record.value_model_version or "—")[:40],
            str(len(record.labels)),
            _headline(record.diagnostics),
        )
    console.print(table)


def _headline(diagnostics: dict) -> str:
    """The figures a person checks first: positive rate on success vs failure steps, value AUC, sanity."""
    pooled = diagnostics.get("all", {})
    keys = (
        "p_positive_given_success",
        "p_positive_given_failure",
        "first_step_value_auc",
        "value_return_correlation",
    )
    parts = [f"{key}={pooled[key]:.2f}" for key in keys if isinstance(pooled.get(key), float)]
    parts.append("sanity ok" if diagnostics.get("sanity_ok", True) else "[red]SANITY FLOOR FAILED[/red]")
    return ", ".join(parts)
