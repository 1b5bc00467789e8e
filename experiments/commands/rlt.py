"""``flywheel rlt``: refine a frozen prior with RLT online on a Meta-World task, committing every episode.

The online phase runs in this process or, with ``--workers N``, on Ray (``experiments.rlt_training``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from experiments.paths import checkpoints_dir, default_store_url

if TYPE_CHECKING:
    from envs import EnvConfig
    from experiments.rlt_training import OnlineRun, RLTLoopFactory
    from policies.base import Policy
    from rlt.deployment import PriorSpec
    from rlt.diagnostics import CriticCalibration
    from rlt.online import OnlineRLT
    from storage import EpisodeRecord, ExperienceStore

app = typer.Typer(help="RLT: online RL on top of a frozen prior.", no_args_is_help=True)
console = Console()

Z_DIM = 32  # width of the RL token bottleneck z_rl
RUN_FILE = "run.json"  # next to the learner state: the interrupted run's version and stored-episode count


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
        str | None, typer.Option("--db", help="Experience store URL (default: the embedded SQLite store)")
    ] = None,
    stored_episodes: Annotated[
        int, typer.Option(min=0, help="Warm up on at most this many stored episodes of the task too")
    ] = 50,
    warmup_episodes: Annotated[int, typer.Option(min=0, help="Fresh prior-only warm-up episodes")] = 10,
    prior_noise: Annotated[float, typer.Option(min=0.0, help="Action noise of the scripted prior")] = 0.3,
    handoff: Annotated[
        str, typer.Option(help="Distance that hands off to RLT: a pair of envs.metaworld_env.HANDOFF_PAIRS")
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
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Ray rollout actors playing the online episodes for one learner actor, on a local Ray "
            "(0: everything in this process)",
        ),
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    device: Annotated[
        str, typer.Option(help="Where the RL token and the actor-critic train: cpu, cuda, mps or auto")
    ] = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted run with the same arguments from its last online episode "
            "(--no-resume: start over; runs with --workers start over)"
        ),
    ] = True,
) -> None:
    """Run RLT online: warm up (stored + fresh prior episodes), fit the RL token, then learn online.

    With --workers N the warm-up and training run in a learner actor and N rollout actors play the online
    episodes with its newest weights (pulled between episodes), until their env steps reach --env-steps;
    evaluation, checkpoint and store writes are as without Ray.

    Every episode — warm-up, online and evaluation — is committed to the store with per-step policy versions
    (the prior before the hand-off, this run's RLT version after it, none on human steps) and the per-step
    critical-phase flag. The actor/critic and the RL token are saved as a checkpoint directory registered as
    a policy version; the prior and RLT are evaluated on the same episode seeds.

    Without --workers the learner's state (weights, optimizers, replay, token, counters, random state) is
    written after every online episode, and a rerun with the same arguments continues from it under the same
    version, skipping episodes the interrupted run already committed; the state is removed once the version's
    checkpoint is saved.
    """
    from actors.sinks import StoreSink
    from envs import EnvConfig
    from envs.metaworld_env import HANDOFF_PAIRS
    from experiments.rlt_training import RLTLoopFactory
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from policies.device import DeviceError, resolve_device
    from rlt.checkpoint import save_rlt_checkpoint
    from rlt.deployment import RLTDeployment
    from rlt.diagnostics import critic_calibration
    from rlt.errors import CriticDivergedError, RLTInputError
    from rlt.online import OnlineConfig
    from rlt.phase import handoff_switch
    from rlt.td3 import LearnerConfig

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
        switch = handoff_switch(HANDOFF_PAIRS, handoff, handoff_distance)
        learner_config = LearnerConfig(
            chunk_size=chunk_size,
            learning_starts=learning_starts,
            seed=seed,
            device=str(resolve_device(device)),
        )
    except DeviceError as error:
        _fail(str(error))
    except RLTInputError as error:
        _fail(str(error))
    experience = _open_store(store)
    prior_spec, policy, env_config = _load_prior(prior, env_config, experience, prior_noise, chunk_size, seed)
    key = {"env": env_config, "prior": policy.version, "noise": prior_noise, "handoff": handoff}
    key |= {"handoff_distance": handoff_distance, "env_steps": env_steps, "stored": stored_episodes}
    key |= {"warmup": warmup_episodes, "token_steps": token_steps, "learner": learner_config}
    key |= {"output": output.resolve() if output else None, "store": experience.url}
    state_dir = None if workers else _state_dir(key, resume)
    started = _started_run(state_dir)
    rl_version = started.get("rl_version") or f"rlt-{env_config.task}-{uuid.uuid4().hex[:8]}"
    directory = output or checkpoints_dir() / rl_version
    if directory.exists():
        _fail(f"--output {directory}: already exists")
    experience.register_policy_version(
        rl_version, kind="rlt", uri=str(directory.resolve()), parent=policy.version
    )
    records = (
        []
        if started
        else list(
            experience.iter_episodes(task=env_config.task, limit=stored_episodes, images=env_config.render)
        )
    )
    stored_count = started.get("stored_episodes", len(records))
    if state_dir is not None and not started:
        state_dir.mkdir(parents=True, exist_ok=True)
        run_info = {"rl_version": rl_version, "stored_episodes": stored_count}
        (state_dir / RUN_FILE).write_text(json.dumps(run_info))
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
    sink = StoreSink(experience.url) if workers else None  # in process: episode_writer (_train_and_evaluate)
    factory = RLTLoopFactory(env_config, policy, switch, Z_DIM, config, learner_config, on_episode=sink)
    try:
        run, prior_rate, rlt_rate = _train_and_evaluate(
            factory, seed, workers, records, eval_episodes, progress, state_dir, experience
        )
        calibration = critic_calibration(run.loop.learner, run.loop.encoder, run.loop.last_evaluation)
        manifest = {
            "rl_version": rl_version,
            "env_steps": run.env_steps,
            "workers": workers,
            "stored_episodes": stored_count,
            "resumed_from_env_step": started.get("env_steps"),
            "env": env_config.model_dump(mode="json"),
            "eval": {"episodes": eval_episodes, "prior_success": prior_rate, "rlt_success": rlt_rate},
            "critic_calibration": dataclasses.asdict(calibration),
        }
        deployment = RLTDeployment.with_handoff(env_config.task, prior_spec, handoff, handoff_distance)
        save_rlt_checkpoint(directory, run.loop.learner, run.loop.token, deployment, manifest)
    except (RLTInputError, CriticDivergedError) as error:
        _fail(f"{error} (no checkpoint written)", code=1)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    successes = round(rlt_rate * eval_episodes)
    experience.write_evaluation(rl_version, env_config.task, eval_episodes, successes)
    log_command_run(
        "rlt",
        manifest | {"learner": dataclasses.asdict(learner_config), "prior": policy.version},
        {"prior_success": prior_rate, "rlt_success": rlt_rate, "eval_episodes": eval_episodes}
        | {"env_steps": run.env_steps, "online_episodes": run.online_episodes},
        {POLICY_VERSION_TAG: rl_version, "prior_version": policy.version, "task": env_config.task},
    )
    if started:
        console.print(f"resumed from env step {started['env_steps']} of an interrupted run")
    _report(rl_version, policy.version, directory, run, stored_count, eval_episodes, prior_rate, rlt_rate)
    _report_critic(calibration)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print one ``error: …`` line and exit (2: bad input, 1: the run failed)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _state_dir(key: dict[str, Any], resume: bool) -> Path:
    """The state folder of the run described by ``key`` (its arguments), under the checkpoints' ``train-state``
    as ``train bc``'s; ``resume=False`` discards what an earlier attempt left there."""
    text = json.dumps(key, sort_keys=True, default=_jsonable)
    folder = checkpoints_dir() / "train-state" / f"rlt-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value) | {"device": None}  # where it runs does not change what it learns
    return str(value)


def _started_run(state_dir: Path | None) -> dict[str, Any]:
    """What an interrupted attempt recorded once it had saved a learner state: its version, stored episodes
    used and the env step it reached (``env_steps``); empty for a fresh run."""
    from policies.train_state import STATE_FILE, TrainStateError, load_state

    try:
        state = load_state(state_dir / STATE_FILE) if state_dir is not None else None
    except TrainStateError as error:
        _fail(f"{error} (--no-resume starts over)")
    if state is None:
        return {}
    return json.loads((state_dir / RUN_FILE).read_text()) | state["counters"]


def _open_store(url: str | None) -> ExperienceStore:
    from storage import ExperienceStore, StoreError

    try:
        experience = ExperienceStore(url or default_store_url())
        experience.upgrade()
    except (ValueError, ImportError, StoreError) as error:
        _fail(f"--db: {error}")
    return experience


def _load_prior(
    spec: str, env_config: EnvConfig, store: ExperienceStore, noise: float, chunk_size: int, seed: int
) -> tuple[PriorSpec, Policy, EnvConfig]:
    """The prior as saved in the deployment block, the prior itself (with embeddings) and the env config it
    needs (cameras for a VLA). A scripted prior is built by ``PriorSpec.load``, as it is rebuilt at deployment."""
    from envs import MetaWorldEnv
    from envs.scripted import scripted_version
    from experiments.policy_loader import PolicySpecError, load, register, resolve
    from policies.base import stack_observations
    from policies.checkpoint import CheckpointError
    from rlt.deployment import PriorSpec


    def load_version(version: str) -> Policy:
        return load(version, task=env_config.task, store=store, seed=seed)

    if spec == "scripted":
        prior = PriorSpec(scripted_version(noise), noise, seed)
        register(store, resolve(spec, noise=noise), prior.version)
        return prior, prior.load(env_config.task, chunk_size, load_version), env_config
    try:
        source = resolve(spec, store)
        policy = load(source, task=env_config.task, store=store, seed=seed)
    except (PolicySpecError, CheckpointError) as error:
        _fail(f"--prior: {error}")
    register(store, source, policy.version)
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


class _Bar:
    """The progress bar's two counters: fresh warm-up episodes, then online env steps."""

    def __init__(self, bar: Progress, warmup_episodes: int, env_steps: int) -> None:
        self.bar = bar
        self.warmup = bar.add_task("warm-up episodes", total=warmup_episodes)
        self.online = bar.add_task("online env steps", total=env_steps, start=False)

    def warmed_up(self, episodes: int) -> None:
        """Advance the warm-up counter."""
        self.bar.advance(self.warmup, episodes)

    def played(self, env_steps: int) -> None:
        """Advance the online counter (started on the first online episode)."""
        self.bar.start_task(self.online)
        self.bar.advance(self.online, env_steps)


def _train_and_evaluate(
    factory: RLTLoopFactory,
    seed: int,
    workers: int,
    records: list,
    eval_episodes: int,
    show: bool,
    state_dir: Path | None,
    store: ExperienceStore,
) -> tuple[OnlineRun, float, float]:
    """Train under a progress bar (on Ray with ``workers`` > 0); return the run and (prior, RLT) success on
    the same evaluation seeds. In process the learner state goes to ``state_dir`` and episodes are committed
    under the run's version with ids from their index (a resumed run skips those already stored)."""
    from experiments.pipeline_rlt import episode_writer
    from experiments.rlt_training import train_in_process, train_on_ray
    from policies.train_state import STATE_FILE

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show) as bar:
        display = _Bar(bar, factory.config.warmup_episodes, factory.config.total_env_steps)
        if workers:
            run = train_on_ray(factory, seed, workers, records, display)
        else:
            version = factory.config.rl_version

            def sink_for(loop: OnlineRLT) -> Callable[[EpisodeRecord], None]:
                return episode_writer(store, version, lambda: loop.episode_index)

            state_path = state_dir / STATE_FILE if state_dir is not None else None
            run = train_in_process(factory, seed, records, display, state_path=state_path, sink_for=sink_for)
        bar.update(display.online, description="evaluating")
        return run, run.loop.evaluate(eval_episodes, mode="prior"), run.loop.evaluate(eval_episodes)


def _report_critic(calibration: CriticCalibration) -> None:
    """One line: is the critic's value of RLT's evaluation chunks what actually followed them?"""
    console.print(
        f"critic on RLT's evaluation chunks ({calibration.chunks}): Q {calibration.mean_q:.3f} vs discounted "
        f"return {calibration.mean_return:.3f} (Q − return {calibration.bias:+.3f}), "
        f"Spearman {calibration.spearman:.2f}; Q far above the return means the actor climbs the critic's errors"
    )


def _report(
    rl_version: str,
    prior_version: str,
    directory: Path,
    run: OnlineRun,
    stored: int,
    episodes: int,
    prior_rate: float,
    rlt_rate: float,
) -> None:
    from experiments.evaluation import wilson_interval

    learner = run.loop.learner
    console.print(
        f"{run.env_steps} env steps ({stored} stored + {run.loop.config.warmup_episodes} fresh warm-up "
        f"episodes, {run.online_episodes} online episodes, {learner.weights_version} updates, "
        f"{learner.replay_buffer.size()} replay chunks)"
    )
    for name, rate in ((prior_version, prior_rate), (rl_version, rlt_rate)):
        low, high = wilson_interval(round(rate * episodes), episodes)
        console.print(f"{name}: success {rate:.0%} of {episodes} [95% CI {low:.2f}–{high:.2f}]")
    console.print(f"checkpoint [bold]{rl_version}[/bold] at {directory}")
