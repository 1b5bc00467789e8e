"""Online RLT on Ray: one learner actor, N rollout actors, actor weights published through the object store.

Both sides are plain ``rlt.online.OnlineRLT`` loops built by the same picklable ``loop_factory(seed)``:

- ``RLTLearner`` (learner actor) runs the warm-up (prior episodes, RL token fit, replay seeding), then trains
  on every episode the rollout actors send (``OnlineRLT.learn``: ``utd_ratio`` updates per new transition).
  ``latest`` returns ``(version, [ref])``: the weights version (the learner's gradient-step count) and an
  object-store reference to ``RLTWeights`` (actor weights + frozen RL token), put once per new version.
- ``RLTRolloutWorker`` (rollout actor) plays learner-mode episodes with its own env, prior and exploration
  seed. Only between episodes does it ask for the newest version and, if it changed, load those weights, so
  an episode is acted by one version end to end; it records that version (``metadata["actor_updates"]`` of
  the episode's record) and sends the episode's chunks to the learner.

``RLTCluster`` starts and drives them. Sends are asynchronous; the learner actor handles one call at a time,
so a worker's ``latest`` call returns after its own previous episode was trained on. ``snapshot`` brings the
trained learner (actor, critic, replay) and the RL token back to the driver, to evaluate and save them there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ray
import torch

from rlt.errors import RLTInputError
from rlt.online import EpisodeChunks, OnlineRLT
from rlt.td3 import ChunkedTD3
from storage.records import EpisodeRecord

LoopFactory = Callable[[int], OnlineRLT]


@dataclass(frozen=True)
class RLTWeights:
    """What a rollout actor needs to act: the actor's weights, their version and the frozen RL token."""

    version: int
    actor: dict[str, torch.Tensor]
    token: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ActedEpisode:
    """One rollout episode as seen by the learner or a worker: who played it, with which weights, how long."""

    worker_id: int
    version: int
    transitions: int
    success: bool
    length: int


@dataclass(frozen=True)
class LearnerSnapshot:
    """The learner actor's loop state: its whole ``ChunkedTD3`` (actor, critic, replay), the frozen RL token's
    state and the env steps the loop played itself (its warm-up episodes)."""

    learner: ChunkedTD3
    token: dict[str, torch.Tensor]
    env_steps: int


def weights_checksum(actor: dict[str, torch.Tensor]) -> float:
    """A float fingerprint of actor weights (to check that a worker acts with what the learner published)."""
    return float(sum(value.double().sum().item() for value in actor.values()))


class RLTLearner:
    """The learner side (see the module docstring); ``seed`` seeds its loop (warm-up episodes, token, TD3)."""

    def __init__(self, loop_factory: LoopFactory, seed: int = 0) -> None:
        torch.set_num_threads(1)
        self.loop = loop_factory(seed)
        self.received: list[ActedEpisode] = []
        self.published: dict[int, float] = {}
        self._latest: tuple[int, ray.ObjectRef] | None = None

    def warm_up(self, records: Iterable[EpisodeRecord] = ()) -> int:
        """Warm up the loop (``OnlineRLT.warm_up``); returns the transitions added to replay."""
        return self.loop.warm_up(records)

    def add_episode(self, chunks: EpisodeChunks, worker_id: int, version: int, success: bool) -> int:
        """Train on one rollout episode acted by weights ``version``; returns the new weights version."""
        added = self.loop.learn([chunks])
        length = sum(len(step.rewards) for step in chunks.steps)
        self.received.append(ActedEpisode(worker_id, version, added, success, length))
        return self.loop.learner.weights_version

    def weights(self) -> RLTWeights:
        """The current actor weights and RL token (raises ``RLTInputError`` before the token is fitted)."""
        if not self.loop.token_fitted:
            raise RLTInputError("weights: call warm_up first; the RL token is not fitted")
        learner = self.loop.learner
        token = {name: value.detach().clone() for name, value in self.loop.token.state_dict().items()}
        return RLTWeights(learner.weights_version, learner.actor_weights(), token)

    def latest(self) -> tuple[int, list[ray.ObjectRef]]:
        """``(version, [ref to RLTWeights])``; the weights are put in the object store once per version."""
        version = self.loop.learner.weights_version
        if self._latest is None or self._latest[0] != version:
            weights = self.weights()
            self.published[version] = weights_checksum(weights.actor)
            self._latest = (version, ray.put(weights))
        return version, [self._latest[1]]

    def history(self) -> tuple[list[ActedEpisode], dict[int, float]]:
        """Episodes received so far and the checksum of every published version."""
        return list(self.received), dict(self.published)

    def snapshot(self) -> LearnerSnapshot:
        """The loop's trained state (raises ``RLTInputError`` before the token is fitted)."""
        return LearnerSnapshot(self.loop.learner, self.weights().token, self.loop.env_steps)


class RLTRolloutWorker:
    """The rollout side: plays learner-mode episodes with the newest weights pulled between episodes."""

    def __init__(self, loop_factory: LoopFactory, learner: ray.actor.ActorHandle, worker_id: int, seed: int):
        torch.set_num_threads(1)
        self.loop = loop_factory(seed)
        self.learner, self.worker_id = learner, worker_id
        self.version = -1

    def run(self, episodes: int) -> list[tuple[ActedEpisode, float]]:
        """Play ``episodes`` episodes; returns each one's provenance and the checksum of the weights that acted.

        ``ActedEpisode.transitions`` here counts the episode's RL-acted chunks (the learner counts what it added).
        """
        played, sent = [], []
        for _ in range(episodes):
            self._sync()
            chunks, stats = self.loop.run_episode("learner")
            sent.append(self.learner.add_episode.remote(chunks, self.worker_id, self.version, stats.success))
            acted = ActedEpisode(self.worker_id, self.version, stats.rl_chunks, stats.success, stats.length)
            played.append((acted, weights_checksum(self.loop.learner.actor_weights())))
        ray.get(sent)  # every episode was trained on before run returns
        return played

    def _sync(self) -> None:
        version, (ref,) = ray.get(self.learner.latest.remote())
        if version == self.version:
            return
        weights: RLTWeights = ray.get(ref)
        if not self.loop.token_fitted:
            self.loop.use_token(weights.token)
        self.loop.learner.load_actor_weights(weights.actor, weights.version)
        self.version = weights.version


class RLTCluster:
    """A learner actor and ``num_workers`` rollout actors (worker ``i`` uses loop seed ``seed + 1 + i``)."""

    def __init__(
        self,
        loop_factory: LoopFactory,
        num_workers: int,
        *,
        seed: int = 0,
        learner_cpus: float = 1.0,
        cpus_per_worker: float = 1.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        self.learner = ray.remote(num_cpus=learner_cpus)(RLTLearner).remote(loop_factory, seed)
        worker_class = ray.remote(num_cpus=cpus_per_worker)(RLTRolloutWorker)
        self.workers = [
            worker_class.remote(loop_factory, self.learner, index, seed + 1 + index)
            for index in range(num_workers)
        ]

    def warm_up(self, records: Iterable[EpisodeRecord] = ()) -> int:
        """Warm up the learner; returns the transitions it added to replay."""
        return ray.get(self.learner.warm_up.remote(list(records)))

    def run(self, episodes_per_worker: int) -> list[list[tuple[ActedEpisode, float]]]:
        """Every worker plays ``episodes_per_worker`` episodes concurrently; returns each worker's ``run``."""
        return ray.get([worker.run.remote(episodes_per_worker) for worker in self.workers])

    def history(self) -> tuple[list[ActedEpisode], dict[int, float]]:
        """The learner's received episodes and published checksums (after every sent episode was trained on)."""
        return ray.get(self.learner.history.remote())

    def snapshot(self) -> LearnerSnapshot:
        """The learner's trained state (``RLTLearner.snapshot``), e.g. to evaluate and save on the driver."""
        return ray.get(self.learner.snapshot.remote())

    def shutdown(self) -> None:
        """Kill the learner and every rollout actor."""
        for handle in [*self.workers, self.learner]:
            ray.kill(handle)
