"""The online phase of an RLT stage (``experiments.pipeline_rlt.run_rlt``: ``flywheel rlt`` and the pipeline):
one picklable loop factory, trained in this process or on Ray.

``RLTLoopFactory(seed)`` builds the stage's ``OnlineRLT`` loop; ``train_in_process`` runs it
(``OnlineRLT.run``). ``train_on_ray`` hands the factory to ``actors.rlt_learner.RLTCluster``: the learner
actor warms up on loop seed ``seed`` (the same warm-up as in process), ``workers`` rollout actors (loop seeds
``seed + 1 + i``) play learner-mode episodes in rounds until the summed env steps of their episodes reach the
online budget, and the trained learner and RL token come back into a loop in this process, for evaluation and
the checkpoint. Every loop commits its episodes through the factory's ``on_episode`` sink, so on Ray that sink
must be picklable (``actors.sinks.StoreSink``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from envs import EnvConfig, MetaWorldEnv
from policies.base import Policy
from rlt.online import EpisodeStats, OnlineConfig, OnlineRLT
from rlt.phase import PhaseSwitch
from rlt.rl_token import RLToken
from rlt.state import token_config_for
from rlt.td3 import LearnerConfig
from storage.records import EpisodeRecord

if TYPE_CHECKING:
    from actors.rlt_learner import RLTCluster

#: Most episodes a rollout worker plays per round (the budget is checked and progress shown between rounds).
MAX_ROUND_EPISODES = 4


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
    """Builds the RLT stage's loop for a seed; picklable when ``prior`` and ``on_episode`` are.

    ``config`` and ``learner`` take the seed. The env, the prior and (a copy of) the phase switch are as
    given; the RL token (``z_dim`` wide) is shaped by probing the prior on the env's first observation.
    """

    env_config: EnvConfig
    prior: Policy
    switch: PhaseSwitch
    z_dim: int
    config: OnlineConfig
    learner: LearnerConfig
    on_episode: Callable[[EpisodeRecord], object] | None = None

    def __call__(self, seed: int) -> OnlineRLT:
        """A fresh loop whose episode seeds, exploration and learner follow ``seed``."""
        env = MetaWorldEnv(self.env_config)
        token = RLToken(token_config_for(self.prior, env.reset(seed=seed)[0], z_dim=self.z_dim))
        return OnlineRLT(
            env,
            self.prior,
            copy.deepcopy(self.switch),
            token,
            self.config.model_copy(update={"seed": seed}),
            self.learner.model_copy(update={"seed": seed}),
            on_episode=self.on_episode,
        )


@dataclass(frozen=True)
class OnlineRun:
    """A finished online phase: the trained loop (in this process), env steps played (warm-up + online;
    evaluation excluded) and online episodes played."""

    loop: OnlineRLT
    env_steps: int
    online_episodes: int


def train_in_process(
    factory: RLTLoopFactory,
    seed: int,
    records: Iterable[EpisodeRecord],
    progress: TrainingProgress,
    *,
    state_path: Path | None = None,
    sink_for: Callable[[OnlineRLT], Callable[[EpisodeRecord], object]] | None = None,
) -> OnlineRun:
    """``OnlineRLT.run`` on ``factory(seed)`` (warm-up with ``records``, then the online budget).

    With ``state_path`` the loop writes its state there after every online episode and a rerun continues
    from it (``OnlineRLT.run``'s resume). ``sink_for(loop)``, when given, replaces the factory's episode sink
    with one that may read the loop (``pipeline_rlt.episode_writer`` derives episode ids from its index).
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
) -> OnlineRun:
    """Warm up on the learner actor, then ``workers`` rollout actors until the online budget is played.

    Ray is started as ``flywheel collect --workers`` starts it (``actors.cluster.ensure_ray``, left running);
    the actors share the CPUs Ray has (at most one each). An exception raised by a loop in an actor is
    re-raised here as itself.
    """
    import ray
    from ray.exceptions import RayTaskError

    from actors.cluster import ensure_ray
    from actors.rlt_learner import RLTCluster

    loop = factory(seed)  # the evaluation loop; building it first surfaces set-up errors before Ray starts
    ensure_ray()
    cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / (workers + 1))
    cluster = RLTCluster(factory, workers, seed=seed, learner_cpus=cpus, cpus_per_worker=cpus)
    try:
        cluster.warm_up(records)
        progress.warmed_up(factory.config.warmup_episodes)
        online_steps, online_episodes = _play_online(cluster, factory, workers, progress)
        snapshot = cluster.snapshot()
    except RayTaskError as error:
        raise _remote_cause(error) from None
    finally:
        cluster.shutdown()
    loop.use_token(snapshot.token)
    loop.use_learner(snapshot.learner)
    return OnlineRun(loop, snapshot.env_steps + online_steps, online_episodes)


def _play_online(
    cluster: RLTCluster, factory: RLTLoopFactory, workers: int, progress: TrainingProgress
) -> tuple[int, int]:
    """Rounds of episodes on every worker until their summed env steps reach the budget; (steps, episodes).

    A round gives each worker as many episodes as fit in what is left at full length (1 to
    ``MAX_ROUND_EPISODES``), so only a one-episode round can overshoot: by less than ``workers`` episodes.
    """
    budget, longest = factory.config.total_env_steps, factory.env_config.episode_steps
    steps = episodes = 0
    while steps < budget:
        per_worker = min(MAX_ROUND_EPISODES, max(1, (budget - steps) // (workers * longest)))
        played = [acted for run in cluster.run(per_worker) for acted, _ in run]
        round_steps = sum(acted.length for acted in played)
        steps, episodes = steps + round_steps, episodes + len(played)
        progress.played(round_steps)
    return steps, episodes


def _remote_cause(error: BaseException) -> BaseException:
    """The exception a loop raised in an actor, unwrapped from Ray's (possibly nested) ``RayTaskError``."""
    cause = getattr(error, "cause", None)
    return _remote_cause(cause) if isinstance(cause, BaseException) else error
