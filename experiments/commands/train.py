"""``flywheel train``: train policies from the experience store, and evaluate them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from experiments.commands.db import DbOption
from experiments.paths import checkpoints_dir, default_store_url

if TYPE_CHECKING:
    from envs import EnvSettings
    from experiments.evaluation import EvalResult

app = typer.Typer(help="Train policies from stored episodes, and evaluate them.", no_args_is_help=True)
console = Console()

#: ``--env`` of ``train bc`` and ``train eval``: the env settings file their evaluations run with.
EnvOption = Annotated[
    str | None,
    typer.Option(
        help="YAML file of env settings for a gymnasium env's evaluations (docs/envs.md: kwargs, declared "
        "success, Dict-observation keys)"
    ),
]


@app.command("bc")
def bc(
    task: Annotated[
        list[str],
        typer.Option(
            help="Task(s) to train on (Meta-World tasks or gymnasium env names, as stored); repeat for a "
            "multi-task model"
        ),
    ],
    env: EnvOption = None,
    episodes: Annotated[int | None, typer.Option(min=1, help="At most this many episodes per task")] = None,
    run_id: Annotated[list[str] | None, typer.Option(help="Only episodes of these runs (repeatable)")] = None,
    successes_only: Annotated[bool, typer.Option(help="Only successful episodes")] = False,
    size: Annotated[str, typer.Option(help="Model size: tiny or small")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="Gradient steps")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    image_size: Annotated[
        int | None,
        typer.Option(min=16, help="Image side in px (default: the stored images'; must match them)"),
    ] = None,
    cameras: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated camera names, a subset of the stored ones (default: every stored one; "
            "none, or episodes stored without images: the state-input model, no camera)"
        ),
    ] = None,
    knowledge_insulation: Annotated[
        bool, typer.Option(help="FAST loss on the backbone, stop-gradient from the expert")
    ] = False,
    metadata: Annotated[
        bool,
        typer.Option(
            help="π0.7 metadata prompts: train with each episode's 'quality: …, speed: …, mistakes: …' on the "
            "prompt; the policy is then queried with --ask"
        ),
    ] = False,
    ask: Annotated[
        str | None,
        typer.Option(
            help="With --metadata: the description asked for at inference (default: the best behaviour, "
            "'quality: high, speed: fast, mistakes: none')"
        ),
    ] = None,
    subtasks: Annotated[
        bool,
        typer.Option(
            help="Hi-Robot/π0.5 hierarchy: a VLA conditioned on 'subtask: <name>' (stored labels, else the "
            "scripted expert's phases) plus a high-level model that names the subtask"
        ),
    ] = False,
    subtask_steps: Annotated[
        int, typer.Option(min=1, help="With --subtasks: gradient steps of the high-level model")
    ] = 500,
    condition_dropout: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="With --metadata/--subtasks: fraction of samples trained without the condition",
        ),
    ] = 0.3,
    eval_episodes: Annotated[
        int, typer.Option(min=0, help="Evaluation episodes per task (at the end and every --eval-every)")
    ] = 20,
    eval_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also evaluate in the env every this many steps (0 = only at the end); the curve is saved in the version's metadata",
        ),
    ] = 0,
    max_episode_steps: Annotated[
        int | None, typer.Option(min=1, help="Episode limit of the evaluations (default: task's)")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, cuda, mps or auto (the accelerator if there is one; recorded in the version)"
        ),
    ] = "auto",
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast where the device supports it")] = False,
    train_workers: Annotated[
        int,
        typer.Option(min=1, help="Data-parallel Ray Train workers (the global batch is split among them)"),
    ] = 1,
    checkpoint_every: Annotated[
        int, typer.Option(min=0, help="Write the resumable training state every this many steps (0 = never)")
    ] = 200,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted run of the same training from its last state (--no-resume: start over)"
        ),
    ] = True,
    db: DbOption = None,
) -> None:
    """Behaviour-clone the built-in VLA on stored episodes; the checkpoint is registered as a policy version.

    Plain BC by default; --metadata conditions on episode metadata, --subtasks trains a two-level policy.
    """
    from experiments.context import (
        DESIRED_METADATA,
        SubtaskTrainConfig,
        train_hierarchical,
        train_metadata_conditioned,
    )
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from experiments.training import BCConfig, stored_image_layout, train_vla
    from policies.device import DeviceError, resolve_device
    from storage import EpisodeQuery, ExperienceStore

    if metadata and subtasks:
        raise typer.BadParameter("--metadata and --subtasks: choose one condition per policy")
    if subtasks and eval_every:
        raise typer.BadParameter(
            "--eval-every: not with --subtasks (the two-level policy is evaluated at the end)"
        )
    try:
        selection = EpisodeQuery(
            tasks=task,
            run_ids=run_id,
            outcomes=["success"] if successes_only else None,
            max_per_task=episodes,
        )
        store = ExperienceStore(db or default_store_url())
        store.upgrade()
        settings = _env_settings(env, max_episode_steps)
        camera_names, side = stored_image_layout(
            store, selection, _camera_names(cameras) if cameras is not None else None, image_size
        )
        config = BCConfig(
            size=size,
            env=settings.for_model(camera_names, side),
            knowledge_insulation=knowledge_insulation,
            steps=steps,
            batch_size=batch_size,
            condition_dropout=condition_dropout if metadata or subtasks else 0.0,
            eval_episodes=eval_episodes,
            eval_every=eval_every,
            seed=seed,
            device=device,
            bf16=bf16,
            train_workers=train_workers,
            checkpoint_every=checkpoint_every,
        )
        resolve_device(config.device)
        subtask_config = SubtaskTrainConfig(steps=subtask_steps)
    except (DeviceError, ValueError) as error:
        if isinstance(error, ValidationError):  # a config model's: the CLI reports every field it names
            raise
        raise typer.BadParameter(str(error)) from error
    try:
        if subtasks:
            trained = train_hierarchical(store, selection, config, checkpoints_dir(), subtask=subtask_config)
            used, version, checkpoint = trained.low_level.episodes_used, trained.version, trained.checkpoint
            curve = []
            console.print(f"subtasks: {', '.join(trained.subtasks)}")
        else:
            trained = (
                train_metadata_conditioned(
                    store, selection, config, checkpoints_dir(), desired=ask or DESIRED_METADATA
                )
                if metadata
                else train_vla(store, selection, config, checkpoints_dir(), resume=resume)
            )
            used, version, checkpoint = trained.episodes_used, trained.version, trained.checkpoint
            curve = trained.evaluation_curve
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    console.print(f"trained on {used} episodes → [bold]{version}[/bold] at {checkpoint}")
    if not subtasks:
        resumed = trained.train.resumed_from
        console.print(
            f"device: {trained.train.device}" + (f"; resumed from step {resumed}" if resumed else "")
        )
    if len(curve) > len(trained.evaluations):
        console.print(_results_table([result for _, result in curve], [step for step, _ in curve]))
    elif trained.evaluations:
        console.print(_results_table(trained.evaluations))
    log_command_run(
        "train-bc",
        {"selection": selection.as_dict(), "bc": config.model_dump(mode="json")}
        | {"condition": "subtasks" if subtasks else "metadata" if metadata else "none"},
        {"episodes_used": used} | _evaluation_metrics(trained.evaluations),
        {POLICY_VERSION_TAG: version, "checkpoint": str(checkpoint)},
    )


@app.command("eval")
def eval_policy(
    policy: Annotated[
        str, typer.Option(help="A checkpoint dir (VLA or hierarchical) or a registered version")
    ],
    task: Annotated[
        str,
        typer.Option(
            help="Meta-World task (pick-place-v3) or gymnasium env (Reacher-v5, module:EnvId, module:Class)"
        ),
    ],
    env: EnvOption = None,
    episodes: Annotated[int, typer.Option(min=1, help="Fresh evaluation episodes")] = 20,
    ask: Annotated[
        str | None,
        typer.Option(help="Condition text for a flat VLA (e.g. the desired metadata); default: as trained"),
    ] = None,
    max_episode_steps: Annotated[
        int | None, typer.Option(min=1, help="Episode limit (default: task's)")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the evaluation episodes")] = 10_000,
    db: DbOption = None,
) -> None:
    """Evaluate a trained policy on fresh episodes: success (Wilson 95% CI), length, and where failures end.

    Cameras and image size come from the checkpoint. Failures are described by the scripted expert's phases
    (furthest phase reached, phase at the last step) and, for a hierarchical policy, the subtask it named last.
    The result is recorded in the store's evaluations.
    """
    from envs import is_metaworld_task
    from experiments.context import phase_outcomes
    from experiments.evaluation import evaluate
    from experiments.policy_loader import PolicySpecError, load, register, resolve
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from policies.checkpoint import CheckpointError
    from storage import ExperienceStore

    store = ExperienceStore(db or default_store_url())
    store.upgrade()
    try:
        source = resolve(policy, store)
        loaded = load(source, task=task, store=store)
    except (PolicySpecError, CheckpointError) as error:
        raise typer.BadParameter(str(error)) from error
    vla = getattr(loaded, "low_level", loaded)
    if not hasattr(vla, "config"):
        raise typer.BadParameter(
            f"policy {policy!r}: only built-in VLA or hierarchical checkpoints are evaluated"
        )
    if ask is not None:
        vla.conditions = ask
    try:
        settings = _env_settings(env, max_episode_steps)
        env_config = settings.for_model(tuple(vla.config.cameras), vla.config.image_size).env(task)
    except ValueError as error:
        if isinstance(error, ValidationError):  # a config model's: the CLI reports every field it names
            raise
        raise typer.BadParameter(str(error)) from error
    result, records = evaluate(loaded, env_config, episodes, seed=seed)
    register(store, source, loaded.version)
    store.write_evaluation(loaded.version, task, result.n, result.successes, metrics=result.as_metrics())
    log_command_run(
        "train-eval",
        {"policy": policy, "task": task, "episodes": episodes, "seed": seed, "ask": ask}
        | {"env": env_config.model_dump(mode="json")},
        _evaluation_metrics([result]),
        {POLICY_VERSION_TAG: loaded.version},
    )
    console.print(_results_table([result]))
    if not is_metaworld_task(task):
        return
    where = phase_outcomes(records, task)
    console.print(
        f"failures {where['failures']}: furthest expert phase {where['furthest_phase']}, "
        f"phase at the end {where['final_phase']}"
    )
    if where["subtask_agreement"] is not None:
        console.print(
            f"subtask named at the end of failures {where['final_named_subtask']}; named subtask = expert phase "
            f"on {where['subtask_agreement']:.0%} of steps"
        )


def _evaluation_metrics(results: list[EvalResult]) -> dict[str, float]:
    """``<task>/<figure>`` of each evaluation (success rate, successes, n, mean length, …)."""
    return {f"{result.task}/{key}": value for result in results for key, value in result.as_metrics().items()}


def _env_settings(path: str | None, max_episode_steps: int | None) -> EnvSettings:
    """The ``--env`` file's env settings (plain ones without it), with ``--max-episode-steps`` if given."""
    from envs import EnvSettings

    settings = EnvSettings.from_file(path) if path else EnvSettings()
    return (
        settings.model_copy(update={"max_episode_steps": max_episode_steps})
        if max_episode_steps
        else settings
    )


def _camera_names(cameras: str) -> tuple[str, ...]:
    """``a, b`` → ``("a", "b")``; ``none`` → ``()`` (the state-input model); an empty list is bad input."""
    if cameras.strip().lower() == "none":
        return ()
    names = tuple(c.strip() for c in cameras.split(",") if c.strip())
    if not names:
        raise typer.BadParameter("--cameras: expected comma-separated camera names, got none")
    return names


def _results_table(results: list[EvalResult], steps: list[int] | None = None) -> Table:
    """One row per evaluation; with ``steps``, a first column names the training step it was taken at."""
    table = Table(
        *(["step"] if steps else []), "task", "policy", "success", "95% CI", "mean length", "mean return"
    )
    for index, result in enumerate(results):
        table.add_row(
            *([str(steps[index])] if steps else []),
            result.task,
            result.policy_version,
            f"{result.successes}/{result.n} ({result.success_rate:.0%})",
            f"[{result.ci_low:.2f}, {result.ci_high:.2f}]",
            f"{result.mean_length:.0f}",
            f"{result.mean_return:.2f}",
        )
    return table
