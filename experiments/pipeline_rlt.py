"""The RLT stage: online RLT (``actors.rlt_loop.RLTLoop``: the ``rlt.online.OnlineRLT`` learner fed by a rollout
worker) around a prior, saved as its own policy kind.

``run_rlt(RLTStage) -> RLTResult`` is the one RLT driver: the pipeline's RLT stage calls it once per iteration
and ``flywheel rlt`` is one run of it (plus its printing and MLflow record). An RLT result is not a VLA
checkpoint: it is the frozen prior plus an RL token and a chunked actor that take over in the critical phase,
saved as an ``rlt.checkpoint`` directory (written atomically; its ``RLTManifest`` holds the prior, the settings,
the env and the RL history) and registered in the store as kind ``rlt`` with the prior as its parent;
``load_rlt_policy`` rebuilds it as a ``Policy`` (``rlt.actor.RLTActor`` in ``eval`` mode) for evaluation, collection and the next
iteration.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.rlt_loop import RLTLoop
from envs import EnvConfig
from experiments.rlt_training import (
    NoProgress,
    OnlineRun,
    RLTLoopFactory,
    TrainingProgress,
    train_in_process,
    train_on_ray,
)
from policies.base import Policy
from policies.device import resolve_device
from policies.manifest import RLT_KIND
from policies.train_state import load_state
from rlt.actor import RLTActor
from rlt.checkpoint import (
    FinalEvaluation,
    RLTManifest,
    load_rlt_checkpoint,
    read_rlt_manifest,
    save_rlt_checkpoint,
)
from rlt.config import OnlineConfig, RLTConfig
from rlt.deployment import PriorSpec, RLTDeployment
from rlt.diagnostics import critic_calibration
from rlt.online import EpisodeStats, EvalPoint
from rlt.state import RLStateEncoder
from storage import EpisodeRecord, ExperienceStore


@dataclass(frozen=True)
class RLTStage:
    """What one RLT stage runs: the prior (loaded with ``load_version`` unless scripted) on ``env`` with
    ``config``, registered as ``version``, episodes committed under store run ``run_id``, the checkpoint
    written to ``folder``.

    ``records`` (stored episodes of the task, ``stored_episodes`` of them, e.g. this iteration's collection with
    its interventions) join the warm-up: they help fit the RL token and seed the second replay. ``state_path``
    is where the in-process learner state goes after every online episode (default: beside ``folder``); a rerun
    that finds it continues from it. ``workers`` > 0 plays the online episodes on that many Ray rollout actors.
    ``final_eval_episodes`` > 0 evaluates the prior and the RLT policy on the same seeds at the end.
    """

    store: ExperienceStore
    prior: PriorSpec
    load_version: Callable[[str], Policy]
    env: EnvConfig
    config: RLTConfig
    version: str
    run_id: str
    folder: Path
    seed: int
    records: Iterable[EpisodeRecord] = ()
    stored_episodes: int = 0
    state_path: Path | None = None
    workers: int = 0
    final_eval_episodes: int = 0
    progress: TrainingProgress = field(default_factory=NoProgress)

    @property
    def learner_state(self) -> Path | None:
        """Where the in-process learner state goes (none on Ray)."""
        if self.workers:
            return None
        return self.state_path or self.folder.parent / f"{self.folder.name}-state.pt"


@dataclass(frozen=True)
class RLTResult:
    """What an RLT stage produced: the saved policy's version and checkpoint, and its manifest (the RL curve,
    per-episode statistics, final evaluation)."""

    version: str
    checkpoint: Path
    manifest: RLTManifest

    @property
    def curve(self) -> list[EvalPoint]:
        """The learner's success at each evaluation point."""
        return self.manifest.curve

    @property
    def episode_stats(self) -> list[EpisodeStats]:
        """Every episode the in-process loop played (warm-up, online, evaluation)."""
        return self.manifest.episodes


def deployment_for(task: str, prior: PriorSpec, config: RLTConfig) -> RLTDeployment:
    """The deployment block the stage's checkpoint carries: the prior and the config's hand-off."""
    return RLTDeployment.with_handoff(task, prior, config.handoff, config.handoff_distance)


def run_rlt(stage: RLTStage) -> RLTResult:
    """Run online RLT around ``stage.prior``; store every episode under ``stage.run_id``; save the checkpoint.

    ``stage.version`` is registered (kind ``rlt``, parent = the prior) before the first episode, because the
    episodes' steps name it. In process, episode ids are derived from ``run_id`` and the episode's index, so a
    rerun after a kill skips the ids the killed attempt stored instead of adding episodes, and the learner state
    (``RLTStage.learner_state``) is removed once the checkpoint (renamed into place when complete) is saved.
    """
    config, env = stage.config, stage.env
    learner = config.learner.model_copy(
        update={"seed": stage.seed, "device": str(resolve_device(config.learner.device))}
    )
    torch.manual_seed(stage.seed)
    policy = stage.prior.load(env.task, learner.chunk_size, stage.load_version)
    deployment = deployment_for(env.task, stage.prior, config)
    _register(stage, deployment)
    online = OnlineConfig(
        **config.online.model_dump() | {"record_images": config.online.record_images or env.render},
        task=env.task,
        rl_version=stage.version,
        seed=stage.seed,
    )
    resumed = _resumed_from(stage.learner_state)
    factory = RLTLoopFactory(
        env, policy, deployment.switch(), config.z_dim, online, learner, config.token_normalization
    )
    run = _train(stage, factory)
    manifest = _manifest(stage, deployment, run, _final_evaluation(stage, run.loop), resumed)
    save_rlt_checkpoint(stage.folder, run.loop.rlt.learner, run.loop.rlt.token, manifest)
    if stage.learner_state is not None:
        stage.learner_state.unlink(missing_ok=True)
    return RLTResult(stage.version, stage.folder, manifest)


def _register(stage: RLTStage, deployment: RLTDeployment) -> None:
    """Register the stage's version (kind ``rlt``, parent = the prior) and its store run."""
    stage.store.register_policy_version(
        stage.version,
        kind=RLT_KIND,
        uri=str(stage.folder.resolve()),
        parent=stage.prior.version,
        metadata={
            "config": stage.config.model_dump(mode="json"),
            "deployment": dataclasses.asdict(deployment),
        },
    )
    stage.store.register_run(
        stage.run_id, name="rlt", config={"prior": stage.prior.version, "version": stage.version}
    )


def _final_evaluation(stage: RLTStage, loop: RLTLoop) -> FinalEvaluation | None:
    """The prior, then the deterministic learner, on the same ``final_eval_episodes`` seeds (none: skipped)."""
    episodes = stage.final_eval_episodes
    if not episodes:
        return None
    stage.progress.evaluating()
    prior_success = loop.evaluate(episodes, mode="prior")
    return FinalEvaluation(
        episodes=episodes, prior_success=prior_success, rlt_success=loop.evaluate(episodes)
    )


def _manifest(
    stage: RLTStage,
    deployment: RLTDeployment,
    run: OnlineRun,
    evaluation: FinalEvaluation | None,
    resumed: int | None,
) -> RLTManifest:
    """The checkpoint's manifest: what deploys it and what the run was (the critic checked on the last
    evaluation's episodes, if any were played)."""
    loop = run.loop
    evaluated = loop.last_evaluation
    learner = loop.rlt.learner
    calibration = critic_calibration(learner, loop.rlt.encoder, evaluated) if evaluated else None
    return RLTManifest(
        rl_version=stage.version,
        deployment=deployment,
        config=stage.config,
        env=stage.env,
        token=loop.rlt.token.config,
        env_steps=run.env_steps,
        online_episodes=run.online_episodes,
        stored_episodes=stage.stored_episodes,
        updates=learner.weights_version,
        replay_chunks=learner.replay_buffer.size(),
        workers=stage.workers,
        resumed_from_env_step=resumed,
        curve=loop.curve,
        episodes=_plain(loop.stats),
        evaluation=evaluation,
        critic_calibration=calibration,
    )


def _train(stage: RLTStage, factory: RLTLoopFactory) -> OnlineRun:
    """The online phase on Ray (``stage.workers``) or in this process, resuming from the learner state; this
    process's loop commits its episodes with ``episode_writer``."""

    def sink_for(loop: RLTLoop) -> Callable[[EpisodeRecord], None]:
        return episode_writer(stage.store, stage.run_id, lambda: loop.episode_index)

    if stage.workers:
        return train_on_ray(
            factory,
            stage.seed,
            stage.workers,
            stage.records,
            stage.progress,
            store_url=stage.store.url,
            run_id=stage.run_id,
            sink_for=sink_for,
        )
    return train_in_process(
        factory, stage.seed, stage.records, stage.progress, state_path=stage.learner_state, sink_for=sink_for
    )


def _resumed_from(state_path: Path | None) -> int | None:
    """The env step an interrupted attempt's learner state reached (None: nothing to resume)."""
    state = load_state(state_path) if state_path is not None else None
    return None if state is None else int(state["counters"]["env_steps"])


def _plain(stats: list[EpisodeStats]) -> list[EpisodeStats]:
    """Episode statistics with numpy scalars made plain Python (for the JSON manifest)."""
    plain = json.loads(json.dumps([dataclasses.asdict(s) for s in stats], default=lambda value: value.item()))
    return [EpisodeStats(**entry) for entry in plain]


def load_rlt_result(folder: Path) -> RLTResult:
    """The result of a finished RLT stage, read back from its checkpoint's manifest (a rerun after a kill that
    came after the save logs the same curve instead of training again)."""
    manifest = read_rlt_manifest(folder)
    return RLTResult(manifest.rl_version, folder, manifest)


def episode_writer(
    store: ExperienceStore, run_id: str, index: Callable[[], int]
) -> Callable[[EpisodeRecord], None]:
    """Commit each episode under ``run_id`` with an id derived from the run and the loop's episode ``index()``
    (which a resumed loop continues); ids an earlier, killed attempt of the stage already wrote are skipped."""
    stored = {summary.uuid for summary in store.list_episodes(run_id=run_id)}

    def write(record: EpisodeRecord) -> None:
        episode_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}#{index()}")
        if episode_id not in stored:
            store.write_episode(dataclasses.replace(record, uuid=episode_id, run_id=run_id))

    return write


def load_rlt_policy(folder: Path, version: str, task: str, load_version: Callable[[str], Policy]) -> RLTActor:
    """Rebuild a saved RLT policy (a pipeline's or ``flywheel rlt``'s) from its deployment block as the RLT
    actor in ``eval`` mode (the deterministic learner after each env's hand-off); its prior is loaded with
    ``load_version`` or rebuilt as a scripted expert."""
    checkpoint = load_rlt_checkpoint(folder)
    deployment, learner, token = checkpoint.deployment, checkpoint.learner, checkpoint.token
    prior = deployment.prior.load(task, learner.config.chunk_size, load_version)
    encoder = RLStateEncoder(token, learner.state_dim - token.config.z_dim)
    state_key = checkpoint.manifest.config.online.state_key
    return RLTActor(prior, deployment.switch(), learner, encoder, rl_version=version, state_key=state_key)
