"""Online RLT on Ray: one learner actor and a ``RolloutCluster`` of rollout workers playing the RLT actor.

- ``RLTLearner`` (the learner actor) holds the ``rlt.online.OnlineRLT`` learner built by ``learner_factory(seed)``:
  it warms up on the prior's episodes, then trains on every episode a rollout worker commits (``utd_ratio``
  updates per new chunk); ``weights`` returns its actor weights, their version (its gradient-step count) and the
  frozen RL token.
- The rollout workers are an ``actors.cluster.RolloutCluster`` of ``RolloutWorker``s like every other method's:
  their policy is the RLT actor (``rlt.actor.RLTActor`` in ``learner`` mode) around the prior, their episode
  sink ``LearnerSink`` commits each episode to the store (under the run) and then hands it to the learner
  actor. The workers record the prior's embeddings of every chunk (``record_embeddings``): the record the learner
  receives carries them (``EpisodeRecord.chunk_embeddings``; the store does not keep them), so the learner
  does not re-run the prior on the episodes it trains on. ``RLTCluster.publish`` rebuilds the actor with the learner's newest weights and publishes it to the
  running workers (each env takes it at its next chunk and keeps its hand-off; a restarted worker gets it when
  it is back).
- ``RLTCluster.train`` collects the online env-step budget in rounds through ``RolloutCluster.collect`` (a
  SIGKILLed worker is restarted and its share handed out again; the run ends with the budget's committed
  episodes), publishing new weights after every round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.cluster import RolloutCluster
from actors.sinks import StoreSink
from core.types import Outcome
from rlt.actor import RLTActor
from rlt.online import OnlineRLT
from rlt.td3 import ChunkedTD3
from storage import ExperienceStore
from storage.records import EpisodeRecord

LearnerFactory = Callable[[int], OnlineRLT]


@dataclass(frozen=True)
class RLTWeights:
    """What a rollout worker needs to act: the actor's weights, their version and the frozen RL token."""

    version: int
    actor: dict[str, torch.Tensor]
    token: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ActedEpisode:
    """One rollout episode as the learner received it: where it was played, with which weights, what it gave."""

    env_id: str
    version: int
    transitions: int
    success: bool
    length: int


@dataclass(frozen=True)
class LearnerSnapshot:
    """The learner actor's state: its whole ``ChunkedTD3`` (actor, critic, replay) and the RL token's state."""

    learner: ChunkedTD3
    token: dict[str, torch.Tensor]


def weights_checksum(actor: dict[str, torch.Tensor]) -> float:
    """A float fingerprint of actor weights (to check that a worker acts with what the learner published)."""
    return float(sum(value.double().sum().item() for value in actor.values()))


class RLTLearner:
    """The learner actor (see the module docstring); ``seed`` seeds its learner."""

    def __init__(self, learner_factory: LearnerFactory, seed: int = 0) -> None:
        torch.set_num_threads(1)
        self.rlt = learner_factory(seed)
        self.received: list[ActedEpisode] = []

    def warm_up(self, played: list[EpisodeRecord], stored: list[EpisodeRecord]) -> int:
        """``OnlineRLT.warm_up``: fit the token, seed replay, train; returns the transitions added."""
        return self.rlt.warm_up(played, stored)

    def add_episode(self, record: EpisodeRecord) -> int:
        """Train on one committed rollout episode (an ``error`` one is skipped); returns the weights version."""
        if record.outcome != Outcome.ERROR:
            added = self.rlt.learn([record])
            version = int(record.metadata.get("actor_updates", -1))
            success = record.outcome == Outcome.SUCCESS
            self.received.append(ActedEpisode(record.env_id, version, added, success, record.length))
        return self.rlt.learner.weights_version

    def weights(self) -> RLTWeights:
        """The current actor weights and the frozen RL token."""
        learner, token = self.rlt.learner, self.rlt.token
        state = {} if token is None else {k: v.detach().clone() for k, v in token.state_dict().items()}
        return RLTWeights(learner.weights_version, learner.actor_weights(), state)

    def history(self) -> list[ActedEpisode]:
        """The episodes trained on so far, in the order they arrived."""
        return list(self.received)

    def snapshot(self) -> LearnerSnapshot:
        """The learner's trained state (to evaluate and save on the driver)."""
        return LearnerSnapshot(self.rlt.learner, self.weights().token)


class LearnerSink:
    """A rollout worker's episode sink: commit to the store at ``url``, then hand the record to the learner actor.

    An episode the store already holds (a duplicate) is not sent again."""

    def __init__(self, url: str, learner: ray.actor.ActorHandle) -> None:
        self.store, self.learner = StoreSink(url), learner

    def __call__(self, record: EpisodeRecord) -> bool:
        written = self.store(record)
        if written:
            self.learner.add_episode.remote(record)
        return written


@dataclass(frozen=True)
class Rollouts:
    """What the rollout workers run: env factories, the task, the run (store ``store_url``, ``run_id``) and the
    run seed their episode seeds derive from; ``env_steps_per_call`` is a worker's share per ``run`` call."""

    env_factories: list[Callable[[], Any]]
    task: str
    store_url: str
    run_id: str
    seed: int
    record_images: bool = False
    env_steps_per_call: int = 256


class RLTCluster:
    """The learner actor and ``num_workers`` rollout workers (see the module docstring).

    ``driver`` is the driver's learner (its own replay stays empty): the published policy is a copy of its RLT
    actor (prior, hand-off, exploration) in ``learner`` mode, acting with the learner actor's newest weights
    through a replay-less learner; the driver adopts the learner actor's RL token once it is fitted.
    """

    def __init__(
        self,
        learner_factory: LearnerFactory,
        driver: OnlineRLT,
        rollouts: Rollouts,
        num_workers: int,
        *,
        seed: int = 0,
        learner_cpus: float = 1.0,
        cpus_per_worker: float = 1.0,
        max_restarts: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        self.learner = ray.remote(num_cpus=learner_cpus)(RLTLearner).remote(learner_factory, seed)
        self.driver, self.rollouts = driver, rollouts
        self._acting = ChunkedTD3(
            driver.learner.state_dim,
            driver.learner.action_dim,
            driver.learner.config.model_copy(update={"buffer_size": 1, "demo_fraction": 0.0}),
        )
        self.num_workers, self.cpus_per_worker, self.max_restarts = num_workers, cpus_per_worker, max_restarts
        self.workers: RolloutCluster | None = None
        self.store = ExperienceStore(rollouts.store_url)

    def warm_up(self, played: list[EpisodeRecord], stored: list[EpisodeRecord] = ()) -> int:
        """Warm up the learner on the prior's ``played`` episodes and ``stored`` ones; returns transitions added."""
        return ray.get(self.learner.warm_up.remote(list(played), list(stored)))

    def publish(self) -> int:
        """Build the RLT actor with the learner's newest weights and publish it to the rollout workers (started
        on the first call); returns the published weights version."""
        weights: RLTWeights = ray.get(self.learner.weights.remote())
        policy = self._policy(weights)
        if self.workers is None:
            rollouts = self.rollouts
            kwargs = {
                "env_factories": rollouts.env_factories,
                "policy": policy,
                "sink": LearnerSink(rollouts.store_url, self.learner),
                "task": rollouts.task,
                "seed": rollouts.seed,
                "run_id": rollouts.run_id,
                "record_images": rollouts.record_images,
                "record_embeddings": True,
            }
            self.workers = RolloutCluster(
                self.num_workers,
                kwargs,
                cpus_per_worker=self.cpus_per_worker,
                max_restarts=self.max_restarts,
            )
        self.workers.publish_policy(policy)
        return weights.version

    def train(self, env_steps: int, round_steps: int, on_round: Callable[[int], object] | None = None) -> int:
        """Collect ``env_steps`` committed env steps in the run (at least; episodes are committed whole) in rounds
        of ``round_steps``, publishing new weights before each; returns the committed steps. ``on_round``
        receives each round's steps."""
        start = committed = self.committed_steps()
        while committed - start < env_steps:
            self.publish()
            target = min(start + env_steps, committed + round_steps)
            result = self.workers.collect(
                target,
                self.committed_steps,
                unit="env_steps",
                env_steps_per_call=self.rollouts.env_steps_per_call,
                progress=False,
            )
            if on_round is not None:
                on_round(result.committed - committed)
            committed = result.committed
        return committed - start

    def committed_steps(self) -> int:
        """Env steps of the episodes committed in the run."""
        return self.store.count_steps(run_id=self.rollouts.run_id)

    def pids(self) -> list[int]:
        """Process ids of the rollout workers (for fault-injection tests)."""
        return self.workers.pids() if self.workers is not None else []

    def history(self) -> list[ActedEpisode]:
        """The episodes the learner trained on (after every episode sent so far)."""
        return ray.get(self.learner.history.remote())

    def snapshot(self) -> LearnerSnapshot:
        """The learner's trained state (``RLTLearner.snapshot``)."""
        return ray.get(self.learner.snapshot.remote())

    def shutdown(self) -> None:
        """Close the rollout workers, then kill the learner actor."""
        if self.workers is not None:
            self.workers.shutdown()
        ray.kill(self.learner)

    def _policy(self, weights: RLTWeights) -> RLTActor:
        """The RLT actor the workers run: the driver's prior and settings, the published weights."""
        driver = self.driver
        if not driver.token_fitted:
            driver.use_token(weights.token)
        self._acting.load_actor_weights(weights.actor, weights.version)
        actor = driver.actor
        return RLTActor(
            actor.prior,
            actor.switch,
            self._acting,
            driver.encoder,
            rl_version=actor.rl_version,
            mode="learner",
            exploration=actor.exploration,
            state_key=actor.state_key,
            seed=self.rollouts.seed,
            defer_until_trained=True,
        )
