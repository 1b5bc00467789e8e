"""``flywheel collect``: fill the experience store with episodes of a policy, optionally with a simulated human."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from experiments.commands.db import DbOption
from experiments.paths import default_store_url

if TYPE_CHECKING:
    from envs import EnvSettings
    from experiments.collection import CollectConfig

app = typer.Typer()
console = Console()


@app.command(name="collect")
def collect(
    task: Annotated[
        str,
        typer.Option(
            help="Meta-World task (pick-place-v3) or any gymnasium env: a registered id (Reacher-v5), "
            "module:EnvId or module:Class"
        ),
    ] = "pick-place-v3",
    env: Annotated[
        str | None,
        typer.Option(
            help="YAML file of env settings (docs/envs.md): constructor kwargs, success_key/success_threshold, "
            "state_keys/image_keys of a Dict observation, prompt, cameras, image_size, max_episode_steps"
        ),
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            help="'scripted', a checkpoint dir, a registered version, openpi:ws://… or python:<module>:<class>"
        ),
    ] = "scripted",
    episodes: Annotated[int | None, typer.Option(min=1, help="Episodes to commit (default 20)")] = None,
    env_steps: Annotated[
        int | None, typer.Option(min=1, help="Instead of --episodes: commit at least this many env steps")
    ] = None,
    noise: Annotated[float, typer.Option(min=0.0, help="Action noise std of the scripted policy")] = 0.0,
    interventions: Annotated[
        bool, typer.Option(help="A simulated human (the scripted expert) watches and takes over")
    ] = False,
    no_progress_steps: Annotated[
        int, typer.Option(help="Human takes over after this many steps without progress")
    ] = 30,
    random_rate: Annotated[float, typer.Option(help="Per-step probability of a spontaneous takeover")] = 0.0,
    takeover_steps: Annotated[int, typer.Option(help="Steps the human acts once it takes over")] = 20,
    deviation_threshold: Annotated[
        float | None,
        typer.Option(help="Human takes over when the policy's action is this far (L2) from the expert's"),
    ] = None,
    human_noise: Annotated[float, typer.Option(help="Action noise std of the simulated human")] = 0.0,
    late_distance: Annotated[
        float | None,
        typer.Option(
            help="Phase gate: the human watches only while the object (reach: hand) is this near the goal"
        ),
    ] = None,
    late_after_step: Annotated[
        int | None, typer.Option(help="Phase gate: the human watches only from this step on")
    ] = None,
    release_grip: Annotated[
        bool, typer.Option(help="The human opens the gripper where the expert applies no grip (to regrasp)")
    ] = False,
    inject: Annotated[
        str | None,
        typer.Option(
            help="Inject bad segments into the rollouts (ground truth in steps.injected): comma-separated kinds "
            "of detour, random, pause"
        ),
    ] = None,
    inject_rate: Annotated[float, typer.Option(help="Per-step probability that a bad segment starts")] = 0.02,
    inject_length: Annotated[int, typer.Option(help="Steps of one bad segment")] = 15,
    workers: Annotated[int, typer.Option(min=0, help="Ray rollout actors (0: in this process)")] = 0,
    envs_per_worker: Annotated[int, typer.Option(min=1, help="Envs stepped by each worker")] = 1,
    inference: Annotated[
        str, typer.Option(help="'local' (a policy copy per worker) or 'batched' (one server)")
    ] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Existing Ray cluster address")] = None,
    on_worker_death: Annotated[
        str, typer.Option(help="A killed worker's open episodes: 'discard' or 'record' (as error episodes)")
    ] = "discard",
    image_size: Annotated[
        int | None,
        typer.Option(min=16, help="Camera image width and height (default: a VLA policy's, else 96)"),
    ] = None,
    cameras: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated camera names (default: a VLA policy's, else corner2 / a gym env's main)"
        ),
    ] = None,
    no_images: Annotated[
        bool, typer.Option("--no-images", help="Skip rendering (state-only episodes)")
    ] = False,
    execution: Annotated[str, typer.Option(help="Chunk execution: sync, naive_async or rtc")] = "sync",
    delay: Annotated[int, typer.Option(min=0, help="Simulated inference delay d in steps")] = 0,
    execute_horizon: Annotated[int | None, typer.Option(min=1, help="Actions s executed per chunk")] = None,
    subtask_labels: Annotated[
        bool, typer.Option(help="Label steps with the scripted expert's phase")
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Run seed: each episode's env seed derives from it and the episode's index in the run. "
            "Default: a fresh random seed for a new run (recorded in the run and printed at the start); "
            "a resumed run reuses its recorded seed",
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            help="Resume/extend this run (printed at the start of every collection): it is topped up to the "
            "target with new episodes, never repeating one"
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where a VLA policy infers: cpu, cuda, mps or auto (the accelerator if there is one; with "
            "--workers, the batched server's; recorded in the run)"
        ),
    ] = "auto",
    db: DbOption = None,
) -> None:
    """Collect episodes into the experience store, with a progress bar and a summary."""
    from actors.execution import ExecutionConfig
    from envs import SimulatedHumanConfig
    from experiments.collection import CollectConfig, run_collection
    from experiments.policy_loader import vla_image_layout
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from storage import ExperienceStore

    store_url = db or default_store_url()
    layout = None if image_size and cameras else vla_image_layout(policy, ExperienceStore(store_url))
    try:
        settings = _env_settings(env, layout, cameras, image_size)
        config = CollectConfig(
            env=settings.env(task, seed or 0, render=not no_images),
            policy=policy,
            noise=noise,
            episodes=20 if episodes is None and env_steps is None else episodes,
            env_steps=env_steps,
            human=SimulatedHumanConfig(
                no_progress_steps=no_progress_steps,
                random_rate=random_rate,
                takeover_steps=takeover_steps,
                deviation_threshold=deviation_threshold,
                noise_std=human_noise,
                seed=seed or 0,
                late_distance=late_distance,
                late_after_step=late_after_step,
                release_grip=release_grip,
            )
            if interventions
            else None,
            inject={  # validated as CollectConfig.inject: an error names inject.<field>
                "kinds": tuple(k.strip() for k in inject.split(",") if k.strip()),
                "rate": inject_rate,
                "length": inject_length,
                "seed": seed or 0,
            }
            if inject
            else None,
            workers=workers,
            envs_per_worker=envs_per_worker,
            inference=inference,
            ray_address=ray_address,
            on_worker_death=on_worker_death,
            store_url=store_url,
            run_id=run_id,
            seed=seed,
            record_images=not no_images,
            subtask_labels=subtask_labels,
            execution=ExecutionConfig(mode=execution, delay=delay, execute_horizon=execute_horizon),
            device=device,
        )
    except ValueError as error:
        if isinstance(error, ValidationError):  # a config model's: the CLI reports every field it names
            raise
        raise typer.BadParameter(str(error)) from error
    report = run_collection(config, on_start=_announce)
    console.print(
        f"[bold]run[/bold] {report.run_id}  [bold]seed[/bold] {report.seed}  "
        f"[bold]policy[/bold] {report.policy_version}  [bold]device[/bold] {report.device}\n"
        f"episodes {report.episodes} ({report.committed_env_steps} steps)  success {report.success_rate:.0%}"
        f"  env steps {report.env_steps}"
        f"  human steps {report.human_steps}  ({report.env_steps / max(report.seconds, 1e-9):.0f} steps/s)"
        f"\nstore {config.store_url}"
    )
    log_command_run(
        "collect",
        config.model_dump(mode="json")
        | {"run_id": report.run_id, "seed": report.seed, "device": report.device},
        {"success_rate": report.success_rate, "episodes": report.episodes}
        | {"env_steps": report.env_steps, "human_steps": report.human_steps},
        {POLICY_VERSION_TAG: report.policy_version, "run_id": report.run_id},
    )


def _env_settings(
    path: str | None, layout: tuple[tuple[str, ...], int] | None, cameras: str | None, image_size: int | None
) -> EnvSettings:
    """The env settings of a collection: the ``--env`` file's (96 px unless it says), a VLA policy's cameras and
    image size, then ``--cameras`` / ``--image-size``."""
    from envs import EnvSettings

    settings = EnvSettings.from_file(path) if path else EnvSettings()
    if "image_size" not in settings.model_fields_set:
        settings = settings.model_copy(update={"image_size": 96})
    if layout is not None:
        settings = settings.for_model(*layout)
    if cameras:
        names = tuple(c.strip() for c in cameras.split(",") if c.strip())
        settings = settings.model_copy(update={"cameras": names})
    if image_size:
        settings = settings.model_copy(update={"image_size": image_size})
    return settings


def _announce(config: CollectConfig) -> None:
    """The run id and seed, before the first episode: a killed collection is resumed with ``--run-id``."""
    console.print(
        f"[bold]run[/bold] {config.run_id}  [bold]seed[/bold] {config.seed}  "
        f"(resume or extend it with --run-id {config.run_id})",
        soft_wrap=True,
    )
