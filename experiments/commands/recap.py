"""``flywheel recap``: relabel stored experience with advantages and run RECAP improvement iterations."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from experiments.commands.db import DbOption
from experiments.paths import checkpoints_dir, default_store_url

app = typer.Typer(
    help="RECAP: advantage relabeling and advantage-conditioned policy improvement.", no_args_is_help=True
)
console = Console()


@app.command("iterate")
def iterate(
    task: Annotated[
        str, typer.Option(help="Meta-World task or gymnasium env (Reacher-v5, module:EnvId, module:Class)")
    ],
    policy: Annotated[str, typer.Option(help="Current policy: registered version or checkpoint directory")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to collect with the simulated human")] = 50,
    steps: Annotated[int, typer.Option(min=1, help="Policy training steps")] = 2000,
    eval_episodes: Annotated[int, typer.Option(min=0, help="Evaluation episodes before and after")] = 50,
    image_size: Annotated[
        int | None, typer.Option(min=16, help="Image side in px (default: the VLA's, else 64)")
    ] = None,
    cameras: Annotated[
        str | None, typer.Option(help="Comma-separated camera names (default: the VLA's, else corner2)")
    ] = None,
    cfg_beta: Annotated[
        float, typer.Option(min=0.0, help="Classifier-free guidance β (1 = plain conditioning)")
    ] = 1.0,
    retrain_from: Annotated[
        str | None,
        typer.Option(
            help="Pretrained checkpoint (registered version or directory) π is retrained from, as the recipe "
            "does every iteration; default: a fresh model"
        ),
    ] = None,
    value_steps: Annotated[int, typer.Option(min=1, help="Value-model training steps per fold")] = 1500,
    max_episode_steps: Annotated[
        int | None, typer.Option(min=1, help="Episode limit (default: the task's)")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[
        str, typer.Option(help="Where the value model and π train: cpu, cuda, mps or auto (recorded)")
    ] = "auto",
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast for π's training where supported")] = False,
    train_workers: Annotated[
        int, typer.Option(min=1, help="Data-parallel Ray Train workers for π's retraining")
    ] = 1,
    env_file: Annotated[
        str | None,
        typer.Option(
            "--env",
            help="YAML file of env settings for a gymnasium env (docs/envs.md: kwargs, declared success, …)",
        ),
    ] = None,
    db: DbOption = None,
) -> None:
    """Collect with interventions → train V and relabel (cross-fitted) → retrain π conditioned → evaluate →
    gate: one iteration of the pipeline's stages (nothing is deployed).

    A gymnasium env has no simulated human (Meta-World's scripted expert): its iteration collects without one.
    """
    from envs import EnvSettings, is_metaworld_task
    from experiments.policy_loader import PolicySpecError, checkpoint_directory, vla_image_layout
    from experiments.recap_iteration import RecapIterationConfig, run_recap_iteration
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from experiments.training import BCConfig
    from policies.device import DeviceError, resolve_device
    from recap import RecapInputError, RelabelConfig, ValueConfig
    from storage import ExperienceStore

    try:
        resolve_device(device)
    except DeviceError as error:
        _fail(f"--device: {error}")
    store_url = db or default_store_url()
    store = ExperienceStore(store_url)
    try:
        pretrained = checkpoint_directory(retrain_from, store) if retrain_from else None
    except PolicySpecError as error:
        _fail(f"--retrain-from: {error}")
    layout = vla_image_layout(policy, store) or (
        vla_image_layout(str(pretrained), store) if pretrained else None
    )
    try:
        settings = EnvSettings.from_file(env_file) if env_file else EnvSettings()
        settings = settings.for_model(*layout) if layout else settings
        update = {"cameras": tuple(c.strip() for c in cameras.split(",") if c.strip())} if cameras else {}
        update |= {"image_size": image_size} if image_size else {}
        update |= {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
        settings = settings.model_copy(update=update)
    except ValueError as error:
        _fail(str(error))
    config = RecapIterationConfig(
        task=task,
        policy=policy,
        store_url=store_url,
        **({} if is_metaworld_task(task) else {"human": None}),
        collect_episodes=episodes,
        relabel=RelabelConfig(value=ValueConfig(train_steps=value_steps, device=device)),
        bc=BCConfig(
            env=settings,
            steps=steps,
            condition_dropout=0.3,
            seed=seed,
            device=device,
            bf16=bf16,
            train_workers=train_workers,
        ),
        cfg_beta=cfg_beta,
        retrain_from=pretrained,
        eval_episodes=eval_episodes,
        seed=seed,
    )
    try:
        result = run_recap_iteration(config, checkpoints_dir())
    except RecapInputError as error:
        _fail(str(error))
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
    if result.gate is not None:
        console.print(f"gate: {result.gate.reason}")
    metrics = {"collect_success_rate": result.collection.success_rate}
    for name, evaluation in (("before", result.before), ("after", result.after)):
        if evaluation is not None:
            metrics |= {f"{name}/{key}": value for key, value in evaluation.as_metrics().items()}
    log_command_run(
        "recap-iterate",
        config.model_dump(mode="json"),
        metrics,
        {POLICY_VERSION_TAG: result.trained.version, "relabel_id": str(result.relabel.relabel_id)},
    )


def _fail(message: str) -> NoReturn:
    """Print one ``error: …`` line and exit 2 (bad input)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(2)


@app.command("relabels")
def relabels(db: Annotated[str | None, typer.Option(help="Store URL")] = None) -> None:
    """List stored relabel versions with their label-quality diagnostics."""
    from storage import ExperienceStore

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
    """The figures a person checks first: positive rate on success vs failure steps, how V ranks steps within
    episodes, label AUC against injected ground truth (when there is any), sanity."""
    pooled = diagnostics.get("all", {})
    keys = (
        "p_positive_given_success",
        "p_positive_given_failure",
        "value_episode_rank",
        "label_auc",
        "p_positive_injected",
        "p_positive_clean",
    )
    parts = [f"{key}={pooled[key]:.2f}" for key in keys if isinstance(pooled.get(key), float)]
    parts.append("sanity ok" if diagnostics.get("sanity_ok", True) else "[red]SANITY FLOOR FAILED[/red]")
    return ", ".join(parts)
