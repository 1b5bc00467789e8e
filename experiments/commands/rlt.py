"""``flywheel rlt``: refine a frozen prior with RLT online on a Meta-World task, committing every episode.

The command is one run of the pipeline's RLT stage (``experiments.pipeline_rlt.run_rlt``) plus its progress bar,
printed comparison and MLflow record. Its settings are ``rlt.config.RLTConfig`` (the pipeline config's ``rlt:``
block): read from ``--config``, then the typed flags, then ``--set key=value``, validated once by that model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from experiments.paths import checkpoints_dir, default_store_url
from experiments.validation import UserError, first_error
from rlt.config import RLTConfig, info_handoff_key

if TYPE_CHECKING:
    from envs import EnvConfig
    from experiments.pipeline_rlt import RLTResult
    from policies.base import Policy
    from rlt.checkpoint import RLTManifest
    from rlt.deployment import PriorSpec
    from storage import ExperienceStore

app = typer.Typer(help="RLT: online RL on top of a frozen prior.", no_args_is_help=True)
console = Console()

RUN_FILE = "run.json"  # next to the learner state: the interrupted run's version and stored-episode count


def _field(path: str) -> Any:
    """The ``RLTConfig`` field at a dotted ``path`` (``learner.beta``)."""
    model: Any = RLTConfig
    *blocks, name = path.split(".")
    for block in blocks:
        model = model.model_fields[block].annotation
    return model.model_fields[name]


def _help(path: str, extra: str = "") -> str:
    """A typed flag's help: the config field's description, its key and its default (defined in rlt.config)."""
    field = _field(path)
    return f"{field.description}{extra} (--set {path}=…; default {field.default})"


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
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML settings: an RLT block (handoff, z_dim, online:, learner: — rlt.config.RLTConfig) or a "
            "pipeline config whose rlt: block is used; flags and --set override it",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="KEY=VALUE for any setting, e.g. --set learner.n_critics=5 --set online.exploration=offset "
            "(repeatable; keys and defaults in docs/rlt.md)",
        ),
    ] = None,
    env_steps: Annotated[int | None, typer.Option(help=_help("online.total_env_steps"))] = None,
    warmup_episodes: Annotated[int | None, typer.Option(help=_help("online.warmup_episodes"))] = None,
    eval_episodes: Annotated[
        int | None,
        typer.Option(
            help=_help("online.eval_episodes", "; the prior and RLT are compared on as many at the end")
        ),
    ] = None,
    token_steps: Annotated[int | None, typer.Option(help=_help("online.token_steps"))] = None,
    handoff: Annotated[str | None, typer.Option(help=_help("handoff"))] = None,
    handoff_distance: Annotated[
        float | None, typer.Option(help=_help("handoff_distance", " (≤ 0: RLT acts from the start)"))
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help=_help("learner.chunk_size"))] = None,
    learning_starts: Annotated[int | None, typer.Option(help=_help("learner.learning_starts"))] = None,
    beta: Annotated[float | None, typer.Option(help=_help("learner.beta"))] = None,
    utd_ratio: Annotated[int | None, typer.Option(help=_help("learner.utd_ratio"))] = None,
    residual_scale: Annotated[float | None, typer.Option(help=_help("learner.residual_scale"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("learner.device"))] = None,
    store: Annotated[
        str | None, typer.Option("--db", help="Experience store URL (default: the embedded SQLite store)")
    ] = None,
    stored_episodes: Annotated[
        int, typer.Option(min=0, help="Warm up on at most this many stored episodes of the task too")
    ] = 50,
    prior_noise: Annotated[float, typer.Option(min=0.0, help="Action noise of the scripted prior")] = 0.3,
    prior_bias: Annotated[
        float,
        typer.Option(
            help="Systematic error of the scripted prior: it misjudges the object's (or, on reach, the goal's) "
            "position by this many metres, the same way in every step (direction: envs.experts.PRIOR_BIASES)"
        ),
    ] = 0.0,
    episode_steps: Annotated[
        int | None, typer.Option(min=1, help="Episode limit (default: the task's)")
    ] = 200,
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
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted run with the same arguments from its last online episode "
            "(--no-resume: start over; runs with --workers start over)"
        ),
    ] = True,
) -> None:
    """Run RLT online: warm up (stored + fresh prior episodes), fit the RL token, then learn online.

    One run of the pipeline's RLT stage. With --workers N the warm-up and training run in a learner actor and N
    rollout actors play the online episodes with its newest weights (pulled between episodes), until their env
    steps reach --env-steps; evaluation, checkpoint and store writes are as without Ray.

    Every episode — warm-up, online and evaluation — is committed to the store with per-step policy versions
    (the prior before the hand-off, this run's RLT version after it, none on human steps) and the per-step
    critical-phase flag. The actor/critic and the RL token are saved as a checkpoint directory registered as
    a policy version; the prior and RLT are evaluated on the same episode seeds.

    Without --workers the learner's state (weights, optimizers, replay, token, counters, random state) is
    written after every online episode, and a rerun with the same arguments continues from it under the same
    version, skipping episodes the interrupted run already committed; the state is removed once the version's
    checkpoint is saved.
    """
    from envs import EnvConfig
    from experiments.pipeline_rlt import RLTStage, run_rlt
    from experiments.tracking import POLICY_VERSION_TAG, log_command_run
    from policies.device import DeviceError, resolve_device
    from policies.train_state import STATE_FILE
    from rlt.errors import CriticDivergedError, RLTInputError

    flags = {
        "online.total_env_steps": env_steps,
        "online.warmup_episodes": warmup_episodes,
        "online.eval_episodes": eval_episodes,
        "online.token_steps": token_steps,
        "handoff": handoff,
        "handoff_distance": handoff_distance,
        "learner.chunk_size": chunk_size,
        "learner.learning_starts": learning_starts,
        "learner.beta": beta,
        "learner.utd_ratio": utd_ratio,
        "learner.residual_scale": residual_scale,
        "learner.device": device,
    }
    if handoff_distance is not None and handoff_distance <= 0 and info_handoff_key(handoff or "") is None:
        flags |= {"handoff": "always", "handoff_distance": None}
    config = rlt_config(
        config_file, {key: value for key, value in flags.items() if value is not None}, overrides
    )
    env_config = EnvConfig(  # a ValidationError is reported by the CLI's root handler
        task=task,
        render=False,
        reward="sparse",
        terminate_on_success=True,
        max_episode_steps=episode_steps,
        seed=seed,
        success_tolerance=success_tolerance,
    )
    try:
        resolve_device(config.learner.device)
    except DeviceError as error:
        raise UserError(f"learner.device: {error}") from None
    experience = _open_store(store)
    prior_spec, load_version, env_config = _load_prior(
        prior, env_config, experience, (prior_noise, prior_bias), seed
    )
    key = {"env": env_config, "prior": prior_spec.version, "noise": prior_noise, "config": config}
    key |= {
        "stored": stored_episodes,
        "output": output.resolve() if output else None,
        "store": experience.url,
    }
    state_dir = None if workers else _state_dir(key, resume)
    started = _started_run(state_dir)
    rl_version = started.get("rl_version") or f"rlt-{env_config.task}-{uuid.uuid4().hex[:8]}"
    directory = output or checkpoints_dir() / rl_version
    if directory.exists():
        raise UserError(f"--output {directory}: already exists")
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
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        stage = RLTStage(
            experience,
            prior_spec,
            load_version,
            env_config,
            config,
            version=rl_version,
            run_id=rl_version,
            folder=directory,
            seed=seed,
            records=records,
            stored_episodes=stored_count,
            state_path=state_dir / STATE_FILE if state_dir is not None else None,
            workers=workers,
            final_eval_episodes=config.online.eval_episodes,
            progress=_Bar(bar, config.online.warmup_episodes, config.online.total_env_steps),
        )
        try:
            result = run_rlt(stage)
        except (RLTInputError, CriticDivergedError) as error:
            _fail(f"{error} (no checkpoint written)")
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    manifest = result.manifest
    evaluation = manifest.evaluation
    experience.write_evaluation(
        rl_version, env_config.task, evaluation.episodes, round(evaluation.rlt_success * evaluation.episodes)
    )
    log_command_run(
        "rlt",
        manifest.model_dump(mode="json", exclude={"curve", "episodes"}) | {"prior": prior_spec.version},
        {"prior_success": evaluation.prior_success, "rlt_success": evaluation.rlt_success}
        | {"eval_episodes": evaluation.episodes, "env_steps": manifest.env_steps}
        | {"online_episodes": manifest.online_episodes},
        {POLICY_VERSION_TAG: rl_version, "prior_version": prior_spec.version, "task": env_config.task},
    )
    _report(result, prior_spec.version)


def rlt_config(file: Path | None, flags: dict[str, Any], overrides: list[str] | None) -> RLTConfig:
    """``RLTConfig`` from ``file`` (an RLT block or a pipeline config's ``rlt:``), then ``flags`` and ``overrides``
    (``key=value``, dotted keys, YAML values) on top; any problem is a one-line ``UserError`` naming the key."""
    import yaml

    data: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"--config {file}: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--config {file}: expected a mapping of RLT settings")
        data = loaded.get("rlt", {}) if "tasks" in loaded else loaded
    for override in overrides or []:
        path, equals, text = override.partition("=")
        if not equals or not path.strip():
            raise UserError(f"--set {override}: expected KEY=VALUE, e.g. learner.beta=0.5")
        flags = flags | {path.strip(): yaml.safe_load(text)}
    for path, value in flags.items():
        *blocks, name = path.split(".")
        target = data
        for block in blocks:
            target = target.setdefault(block, {})
            if not isinstance(target, dict):
                raise UserError(f"{path}: {block} is a block of settings, not a value")
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    try:
        return RLTConfig.model_validate(data)
    except ValidationError as error:
        raise UserError(first_error(error)) from None


def _fail(message: str) -> NoReturn:
    """Print one ``error: …`` line and exit 1 (the run failed)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(1)


def _state_dir(key: dict[str, Any], resume: bool) -> Path:
    """The state folder of the run described by ``key`` (its arguments), under the checkpoints' ``train-state``
    as ``train bc``'s; ``resume=False`` discards what an earlier attempt left there."""
    text = json.dumps(key, sort_keys=True, default=_jsonable)
    folder = checkpoints_dir() / "train-state" / f"rlt-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, RLTConfig):  # where it runs does not change what it learns
        return value.model_dump(mode="json", exclude={"learner": {"device"}})
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def _started_run(state_dir: Path | None) -> dict[str, Any]:
    """What an interrupted attempt recorded once it had saved a learner state: its version and the stored
    episodes it used; empty for a fresh run."""
    from policies.train_state import STATE_FILE, TrainStateError, load_state

    if state_dir is None:
        return {}
    try:
        state = load_state(state_dir / STATE_FILE)
    except TrainStateError as error:
        raise UserError(f"{error} (--no-resume starts over)") from None
    return {} if state is None else json.loads((state_dir / RUN_FILE).read_text())


def _open_store(url: str | None) -> ExperienceStore:
    from storage import ExperienceStore, StoreError

    try:
        experience = ExperienceStore(url or default_store_url())
        experience.upgrade()
    except (ValueError, ImportError, StoreError) as error:
        raise UserError(f"--db: {error}") from None
    return experience


def _load_prior(
    spec: str, env_config: EnvConfig, store: ExperienceStore, scripted: tuple[float, float], seed: int
) -> tuple[PriorSpec, Callable[[str], Policy], EnvConfig]:
    """The prior as the deployment block saves it, how the stage loads it and the env config it needs (cameras
    for a VLA). A scripted prior (``scripted``: its action noise and bias in metres along the task's
    ``PRIOR_BIASES`` direction) is built by ``PriorSpec.load``, as it is rebuilt at deployment."""
    from envs import MetaWorldEnv
    from envs.experts import bias_vectors, prior_bias_direction
    from envs.scripted import scripted_version
    from experiments.policy_loader import PolicySpecError, load, register, resolve, scripted_spec
    from policies.base import stack_observations
    from policies.checkpoint import CheckpointError
    from rlt.deployment import PriorSpec

    noise, bias = scripted
    if spec == "scripted":
        biases = bias_vectors(prior_bias_direction(env_config.task), bias) if bias else {}
        prior = PriorSpec(scripted_version(noise, **biases), noise, seed, **biases)
        register(store, resolve(scripted_spec(noise, None, biases)), prior.version)
        return prior, lambda version: load(version, task=env_config.task, store=store, seed=seed), env_config
    if bias:
        raise UserError("--prior-bias: only a scripted prior (--prior scripted) takes a systematic error")
    try:
        source = resolve(spec, store)
        policy = load(source, task=env_config.task, store=store, seed=seed)
    except (PolicySpecError, CheckpointError) as error:
        raise UserError(f"--prior: {error}") from None
    register(store, source, policy.version)
    vla = getattr(policy, "low_level", policy)
    if hasattr(vla, "config"):
        size = vla.config.image_size
        env_config = env_config.model_copy(
            update={"render": True, "cameras": tuple(vla.config.cameras), "width": size, "height": size}
        )
    probe = MetaWorldEnv(env_config).reset(seed=seed)[0]
    projected = policy.infer(stack_observations([probe])).embeddings is None
    return PriorSpec(policy.version, None, seed, projected_embeddings=projected), lambda _: policy, env_config


class _Bar:
    """The progress bar's two counters: fresh warm-up episodes, then online env steps (``TrainingProgress``)."""

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

    def evaluating(self) -> None:
        """Say the final evaluation runs."""
        self.bar.update(self.online, description="evaluating")


def _report(result: RLTResult, prior_version: str) -> None:
    """The run in a few lines: env steps and data, the prior vs RLT with intervals, the checkpoint, the critic."""
    from experiments.evaluation import wilson_interval

    manifest: RLTManifest = result.manifest
    if manifest.resumed_from_env_step is not None:
        console.print(f"resumed from env step {manifest.resumed_from_env_step} of an interrupted run")
    console.print(
        f"{manifest.env_steps} env steps ({manifest.stored_episodes} stored + "
        f"{manifest.config.online.warmup_episodes} fresh warm-up episodes, {manifest.online_episodes} online "
        f"episodes, {manifest.updates} updates, {manifest.replay_chunks} replay chunks)"
    )
    evaluation = manifest.evaluation
    intervals = []
    for name, rate in ((prior_version, evaluation.prior_success), (result.version, evaluation.rlt_success)):
        intervals.append(wilson_interval(round(rate * evaluation.episodes), evaluation.episodes))
        low, high = intervals[-1]
        console.print(f"{name}: success {rate:.0%} of {evaluation.episodes} [95% CI {low:.2f}–{high:.2f}]")
    console.print(
        _comparison(evaluation.prior_success, evaluation.rlt_success, evaluation.episodes, intervals)
    )
    console.print(f"checkpoint [bold]{result.version}[/bold] at {result.checkpoint}")
    calibration = manifest.critic_calibration
    if calibration is not None:
        console.print(
            f"critic on RLT's evaluation chunks ({calibration.chunks}): Q {calibration.mean_q:.3f} vs discounted "
            f"return {calibration.mean_return:.3f} (Q − return {calibration.bias:+.3f}), "
            f"Spearman {calibration.spearman:.2f}; Q far above the return means the actor climbs the critic's "
            "errors"
        )


def _comparison(prior: float, rlt: float, episodes: int, intervals: list[tuple[float, float]]) -> str:
    """One line: RLT against the prior it started from, on the same evaluation seeds, and whether the
    difference is outside both 95% intervals."""
    (prior_low, prior_high), (rlt_low, rlt_high) = intervals
    if rlt_low > prior_high:
        verdict = "better than the prior (the 95% intervals do not overlap)"
    elif rlt_high < prior_low:
        verdict = "worse than the prior (the 95% intervals do not overlap)"
    else:
        verdict = "the 95% intervals overlap: more --eval-episodes or seeds to tell them apart"
    return (
        f"RLT vs its prior on the same {episodes} evaluation seeds: {100 * (rlt - prior):+.0f} points "
        f"({prior:.0%} → {rlt:.0%}); {verdict}"
    )
