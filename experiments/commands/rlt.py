"""``flywheel rlt``: refine a frozen prior with RLT online on a Meta-World task, committing every episode."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from envs import EnvConfig, MetaWorldEnv
from experiments.evaluation import wilson_interval
from experiments.paths import checkpoints_dir, default_store_url
from experiments.policy_loader import PolicySpecError, load_policy
from experiments.validation import first_error
from policies.base import Policy, stack_observations
from policies.checkpoint import CheckpointError
from policies.scripted import scripted_version
from rlt.checkpoint import save_rlt_checkpoint
from rlt.deployment import PriorSpec, RLTDeployment
from rlt.errors import CriticDivergedError, RLTInputError
from rlt.online import EpisodeStats, OnlineConfig, OnlineRLT
from rlt.phase import METAWORLD_PAIRS, metaworld_switch
from rlt.rl_token import RLToken
from rlt.state import token_config_for
from rlt.td3 import LearnerConfig
from storage import ExperienceStore, StoreError

app = typer.Typer(help="RLT: online RL on top of a frozen prior.", no_args_is_help=True)
console = Console()

Z_DIM = 32  # width of the RL token bottleneck z_rl


@app.command("rlt")
def rlt(
    task: Annotated[str, typer.Option(help="Meta-World task, e.g. peg-insert-side-v3")],
    prior: Annotated[
        str,
        typer.Option(
            help="The frozen prior: 'scripted' (noisy expert; embeddings = fixed projection of the simulator "
            "state), a registered policy version, a VLA checkpoint directory or openpi:ws://host:port"
        ),
    ] = "scripted",
    env_steps: Annotated[int, typer.Option(min=1, help="Online env-step budget after warm-up")] = 20_000,
    store: Annotated[
        str | None, typer.Option(help="Experience store URL (default: the embedded SQLite store)")
    ] = None,
    stored_episodes: Annotated[
        int, typer.Option(min=0, help="Warm up on at most this many stored episodes of the task too")
    ] = 50,
    warmup_episodes: Annotated[int, typer.Option(min=0, help="Fresh prior-only warm-up episodes")] = 10,
    prior_noise: Annotated[float, typer.Option(min=0.0, help="Action noise of the scripted prior")] = 0.3,
    handoff: Annotated[
        str, typer.Option(help=f"Distance that hands off to RLT: {' or '.join(sorted(METAWORLD_PAIRS))}")
    ] = "hand-object",
    handoff_distance: Annotated[
        float, typer.Option(help="Hand off once that distance is below this (≤ 0: RLT acts from the start)")
    ] = 0.05,
    chunk_size: Annotated[int, typer.Option(min=1, help="Action chunk length C")] = 10,
    token_steps: Annotated[int, typer.Option(min=1, help="Gradient steps fitting the RL token")] = 2000,
    learning_starts: Annotated[
        int,
        typer.Option(min=1, help="Chunk transitions in replay before the first update (RLT acts after it)"),
    ] = 256,
    episode_steps: Annotated[
        int | None, typer.Option(min=1, help="Episode limit (default: the task's)")
    ] = 200,
    eval_episodes: Annotated[
        int, typer.Option(min=1, help="Evaluation episodes of the prior and of RLT at the end")
    ] = 20,
    success_tolerance: Annotated[
        float | None,
        typer.Option(help="Harder-tolerance variant: success within this distance (reach/push/pick-place)"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Checkpoint directory to create (default: under the data folder)")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Run RLT online: warm up (stored + fresh prior episodes), fit the RL token, then learn online.

    Every episode — warm-up, online and evaluation — is committed to the store with per-step policy versions
    (the prior before the hand-off, this run's RLT version after it, none on human steps) and the per-step
    critical-phase flag. The actor/critic and the RL token are saved as a checkpoint directory registered as
    a policy version; the prior and RLT are evaluated on the same episode seeds.
    """
    try:
        env_config = EnvConfig(
            task=task,
            render=False,
            reward="sparse",
            terminate_on_success=True,
            max_episode_steps=episode_steps,
            seed=seed,
            success_tolerance=success_tolerance,
        )
        switch = metaworld_switch(handoff, handoff_distance)
        learner_config = LearnerConfig(chunk_size=chunk_size, learning_starts=learning_starts, seed=seed)
    except ValidationError as error:
        cause = error.errors()[0].get("ctx", {}).get("error")  # our validators' messages name the field
        _fail(str(cause) if cause else first_error(error))
    except RLTInputError as error:
        _fail(str(error))
    experience = _open_store(store)
    prior_spec, policy, env_config = _load_prior(prior, env_config, experience, prior_noise, chunk_size, seed)
    env = MetaWorldEnv(env_config)
    rl_version = f"rlt-{env_config.task}-{uuid.uuid4().hex[:8]}"
    directory = output or checkpoints_dir() / rl_version
    if directory.exists():
        _fail(f"--output {directory}: already exists")
    experience.register_policy_version(
        rl_version, kind="rlt", uri=str(directory.resolve()), parent=policy.version
    )
    token = RLToken(token_config_for(policy, env.reset(seed=seed)[0], z_dim=Z_DIM))
    records = list(
        experience.iter_episodes(task=env_config.task, limit=stored_episodes, images=env_config.render)
    )
    config = OnlineConfig(
        task=env_config.task,
        env_id=f"metaworld/{env_config.task}",
        warmup_episodes=warmup_episodes,
        total_env_steps=env_steps,
        token_steps=token_steps,
        record_images=env_config.render,
        rl_version=rl_version,
        seed=seed,
    )
    loop = OnlineRLT(env, policy, switch, token, config, learner_config, on_episode=experience.write_episode)
    try:
        prior_rate, rlt_rate = _train_and_evaluate(loop, records, env_steps, eval_episodes, progress)
        manifest = {
            "rl_version": rl_version,
            "env_steps": loop.env_steps,
            "stored_episodes": len(records),
            "env": env_config.model_dump(mode="json"),
            "eval": {"episodes": eval_episodes, "prior_success": prior_rate, "rlt_success": rlt_rate},
        }
        deployment = RLTDeployment.with_handoff(env_config.task, prior_spec, handoff, handoff_distance)
        save_rlt_checkpoint(directory, loop.learner, loop.token, deployment, manifest)
    except (RLTInputError, CriticDivergedError) as error:
        _fail(f"{error} (no checkpoint written)", code=1)
    successes = round(rlt_rate * eval_episodes)
    experience.write_evaluation(rl_version, env_config.task, eval_episodes, successes)
    _report(rl_version, policy.version, directory, loop, len(records), eval_episodes, prior_rate, rlt_rate)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print one ``error: …`` line and exit (2: bad input, 1: the run failed)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _open_store(url: str | None) -> ExperienceStore:
    try:
        experience = ExperienceStore(url or default_store_url())
        experience.upgrade()
    except (ValueError, ImportError, StoreError) as error:
        _fail(f"--store: {error}")
    return experience


def _load_prior(
    spec: str, env_config: EnvConfig, store: ExperienceStore, noise: float, chunk_size: int, seed: int
) -> tuple[PriorSpec, Policy, EnvConfig]:
    """The prior as saved in the deployment block, the prior itself (with embeddings) and the env config it
    needs (cameras for a VLA). A scripted prior is built by ``PriorSpec.load``, as it is rebuilt at deployment."""

    def load_version(version: str) -> Policy:
        return load_policy(version, task=env_config.task, store=store, seed=seed)

    if spec == "scripted":
        prior = PriorSpec(scripted_version(noise), noise, seed)
        store.register_policy_version(prior.version, kind="scripted", metadata={"noise_std": noise})
        return prior, prior.load(env_config.task, chunk_size, load_version), env_config
    try:
        policy = load_version(spec)
    except (PolicySpecError, CheckpointError) as error:
        _fail(f"--prior: {error}")
    vla = getattr(policy, "low_level", policy)
    if hasattr(vla, "config"):
        size = vla.config.image_size
        env_config = env_config.model_copy(
            update={"render": True, "cameras": tuple(vla.config.cameras), "width": size, "height": size}
        )
    probe = MetaWorldEnv(env_config).reset(seed=seed)[0]
    projected = policy.infer(stack_observations([probe])).embeddings is None
    prior = PriorSpec(policy.version, None, seed, projected_embeddings=projected)
    return prior, prior.load(env_config.task, chunk_size, lambda _: policy), env_config


def _train_and_evaluate(
    loop: OnlineRLT, records: list, env_steps: int, eval_episodes: int, show: bool
) -> tuple[float, float]:
    """Run the loop under a progress bar; return (prior, RLT) success on the same evaluation seeds."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show) as bar:
        warmup = bar.add_task("warm-up episodes", total=loop.config.warmup_episodes)
        online = bar.add_task("online env steps", total=env_steps, start=False)

        def update(stats: EpisodeStats) -> None:
            if stats.mode == "prior":
                bar.advance(warmup)
            elif stats.mode == "learner":
                bar.start_task(online)
                bar.advance(online, stats.length)

        loop.on_stats = update
        loop.run(records)
        loop.on_stats = None
        bar.update(online, description="evaluating")
        return loop.evaluate(eval_episodes, mode="prior"), loop.evaluate(eval_episodes)


def _report(
    rl_version: str,
    prior_version: str,
    directory: Path,
    loop: OnlineRLT,
    stored: int,
    episodes: int,
    prior_rate: float,
    rlt_rate: float,
) -> None:
    online = [stats for stats in loop.stats if stats.mode == "learner"]
    console.print(
        f"{loop.env_steps} env steps ({stored} stored + {loop.config.warmup_episodes} fresh warm-up episodes, "
        f"{len(online)} online episodes, {loop.learner._n_updates} updates, "
        f"{loop.learner.replay_buffer.size()} replay chunks)"
    )
    for name, rate in ((prior_version, prior_rate), (rl_version, rlt_rate)):
        low, high = wilson_interval(round(rate * episodes), episodes)
        console.print(f"{name}: success {rate:.0%} of {episodes} [95% CI {low:.2f}–{high:.2f}]")
    console.print(f"checkpoint [bold]{rl_version}[/bold] at {directory}")
