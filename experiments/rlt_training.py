"""The online phase of an RLT stage (``experiments.pipeline_rlt.run_rlt``: ``flywheel rlt`` and the pipeline):
one picklable loop factory, trained in this process or on Ray.

``RLTLoopFactory(seed)`` builds the stage's loop (``actors.rlt_loop.RLTLoop``: a ``RolloutWorker`` playing the RLT
actor and the ``OnlineRLT`` learner); ``train_in_process`` runs it (``RLTLoop.run``). ``train_on_ray`` plays the
warm-up in this process, then hands the learner to a learner actor and the online budget to Ray rollout workers
(``actors.rlt_learner.RLTCluster``: a ``RolloutCluster`` running the RLT actor, weights published between
rounds), and brings the trained learner and RL token back into this process's loop, for evaluation and the
checkpoint. The loop commits its episodes through the sink ``sink_for`` gives it; the rollout workers commit
theirs to the store under the stage's run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from actors.rlt_loop import RLTLoop
from envs import EnvConfig, MetaWorldEnv
from policies.base import Policy
from rlt.online import EpisodeStats, OnlineConfig, OnlineRLT
from rlt.phase import PhaseSwitch
from rlt.rl_token import RLToken
from rlt.state import token_config_for
from rlt.td3 import LearnerConfig
from storage.records import EpisodeRecord


class TrainingProgress(Protocol):
    """Where the online phase reports progress."""

    def warmed_up(self, episodes: int) -> None:
        """``episodes`` more fresh warm-up episodes were played."""

    def played(self, env_steps: int) -> None:
        """Online episodes of ``env_steps`` env steps in all were played."""

    def evaluating(self) -> None:
        """Training is over; the final evaluation runs."""


class NoProgress:
    """A ``TrainingProgress`` that shows nothing (the pipeline's stage)."""

    def warmed_up(self, episodes: int) -> None:
        """Nothing to show."""

    def played(self, env_steps: int) -> None:
        """Nothing to show."""

    def evaluating(self) -> None:
        """Nothing to show."""


@dataclass(frozen=True)
class RLTLoopFactory:
    """Builds the RLT stage's loop for a seed; picklable when ``prior`` is.

    ``config`` and ``learner`` take the seed. The env, the prior and (a copy of) the phase switch are as
    given; the RL token (``z_dim`` wide, ``token_normalization``) is shaped by probing the prior on the env's
    first observation.
    """

    env_config: EnvConfig
    prior: Policy
    switch: PhaseSwitch
    z_dim: int
    config: OnlineConfig
    learner: LearnerConfig
    token_normalization: Literal["channel", "position"] = "channel"

    def __call__(self, seed: int) -> RLTLoop:
        """A fresh loop whose episode seeds, exploration and learner follow ``seed``."""
        env = MetaWorldEnv(self.env_config)
        return RLTLoop(self._learner(seed, env), lambda: env)

    def build_learner(self, seed: int) -> OnlineRLT:
        """The loop's learner alone (the learner actor's on Ray)."""
        env = MetaWorldEnv(self.env_config)
        try:
            return self._learner(seed, env)
        finally:
            env.close()

    def env_factory(self) -> MetaWorldEnv:
        """A fresh env (a rollout worker's)."""
        return MetaWorldEnv(self.env_config)

    def _learner(self, seed: int, env: MetaWorldEnv) -> OnlineRLT:
        observation = env.reset(seed=seed)[0]
        shape = token_config_for(
            self.prior, observation, z_dim=self.z_dim, normalization=self.token_normalization
        )
        token = RLToken(shape)
        return OnlineRLT(
            self.prior,
            copy.deepcopy(self.switch),
            token,
            self.config.model_copy(update={"seed": seed}),
            self.learner.model_copy(update={"seed": seed}),
            proprio_dim=int(np.asarray(observation[self.config.state_key]).shape[0]),
        )


@dataclass(frozen=True)
class OnlineRun:
    """A finished online phase: the trained loop (in this process), env steps played (warm-up + online;
    evaluation excluded) and online episodes played."""

    loop: RLTLoop
    env_steps: int
    online_episodes: int


def train_in_process(
    factory: RLTLoopFactory,
    seed: int,
    records: Iterable[EpisodeRecord],
    progress: TrainingProgress,
    *,
    state_path: Path | None = None,
    sink_for: Callable[[RLTLoop], Callable[[EpisodeRecord], object]] | None = None,
) -> OnlineRun:
    """``RLTLoop.run`` on ``factory(seed)`` (warm-up with ``records``, then the online budget).

    With ``state_path`` the loop writes its state there after every online episode and a rerun continues
    from it (``RLTLoop.run``'s resume). ``sink_for(loop)``, when given, is the loop's episode sink (it may read
    the loop: ``pipeline_rlt.episode_writer`` derives episode ids from its index).
    """
    loop = factory(seed)
    if sink_for is not None:
        loop.on_episode = sink_for(loop)

    def report(stats: EpisodeStats) -> None:
        if stats.mode == "prior":
            progress.warmed_up(1)
        elif stats.mode == "learner":
            progress.played(stats.length)

    loop.on_stats = report
    loop.run(records, state_path=state_path)
    loop.on_stats = None
    return OnlineRun(loop, loop.env_steps, sum(stats.mode == "learner" for stats in loop.stats))


def train_on_ray(
    factory: RLTLoopFactory,
    seed: int,
    workers: int,
    records: Iterable[EpisodeRecord],
    progress: TrainingProgress,
    *,
    store_url: str,
    run_id: str,
    sink_for: Callable[[RLTLoop], Callable[[EpisodeRecord], object]] | None = None,
) -> OnlineRun:
    """Warm up, then ``workers`` Ray rollout workers and a learner actor until the online budget is committed.

    This process plays the prior's warm-up episodes (loop seed ``seed``) and hands them to the learner actor
    (``actors.rlt_learner.RLTCluster``), whose learner warms up as in process; the rollout workers (run seed
    ``seed + 1``) commit their episodes to the store under ``run_id`` and to the learner, and get new weights
    after every round of about one episode each. The trained learner and RL token come back into this
    process's loop, for evaluation and the checkpoint. Ray is started as ``flywheel collect --workers`` starts
    it (``actors.cluster.ensure_ray``, left running); the actors share the CPUs Ray has (at most one each). An
    exception raised in the learner actor is re-raised here as itself. ``sink_for`` as in ``train_in_process``.
    """
    import ray
    from ray.exceptions import RayTaskError

    from actors.cluster import ensure_ray
    from actors.rlt_learner import RLTCluster, Rollouts

    loop = factory(seed)  # warm-up and evaluation; building it first surfaces set-up errors before Ray starts
    if sink_for is not None:
        loop.on_episode = sink_for(loop)
    ensure_ray()
    cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / (workers + 1))
    episode_steps = factory.env_config.episode_steps
    rollouts = Rollouts(
        env_factories=[factory.env_factory],
        task=factory.config.task,
        store_url=store_url,
        run_id=run_id,
        seed=seed + 1,
        record_images=factory.config.record_images,
        env_steps_per_call=episode_steps,
    )
    cluster = RLTCluster(
        factory.build_learner, loop.rlt, rollouts, workers, seed=seed, learner_cpus=cpus, cpus_per_worker=cpus
    )
    try:
        played = loop.play("prior", factory.config.warmup_episodes)
        progress.warmed_up(len(played))
        cluster.warm_up(played, list(records))
        online_steps = cluster.train(
            factory.config.total_env_steps, workers * episode_steps, on_round=progress.played
        )
        snapshot, online_episodes = cluster.snapshot(), len(cluster.history())
    except RayTaskError as error:
        raise _remote_cause(error) from None
    finally:
        cluster.shutdown()
    if loop.rlt.token is not None:
        loop.rlt.use_token(snapshot.token)
    loop.rlt.use_learner(snapshot.learner)
    return OnlineRun(loop, loop.env_steps + online_steps, online_episodes)


def _remote_cause(error: BaseException) -> BaseException:
    """The exception a loop raised in an actor, unwrapped from Ray's (possibly nested) ``RayTaskError``."""
    cause = getattr(error, "cause", None)
    return _remote_cause(cause) if isinstance(cause, BaseException) else error
