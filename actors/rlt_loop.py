"""Online RLT in one process: a ``RolloutWorker`` playing the RLT actor and the learner (``rlt.online.OnlineRLT``),
alternating.

Episodes come from the common rollout path like every other method's (``RolloutWorker`` + ``EpisodeRecorder``,
one outcome rule); the learner consumes their records. ``run`` does: warm-up episodes with the prior alone (plus
any stored ``EpisodeRecord`` passed to ``run``) → the learner fits and freezes the RL token on their embeddings,
seeds replay and trains on it → online episodes, each followed by ``utd_ratio`` updates per collected chunk,
with the learner's success evaluated every ``eval_every_steps`` env steps on fixed seeds (``eval_seed_base +
i``). Every finished episode (evaluation included) goes to the episode sink ``on_episode`` (e.g.
``ExperienceStore.write_episode`` or ``actors.sinks.StoreSink``) with ``metadata`` ``learner: rlt``, its
``mode``, the ``prior_version`` and ``actor_updates`` (the weights version that acted,
``RLTActor.episode_metadata``).

The worker records the prior's embeddings of every chunk the actor played (``record_embeddings``): they reach the
learner with the episode's record (``EpisodeRecord.chunk_embeddings``), so the learner re-runs the prior only
where the actor did not (``OnlineRLT.episode_chunks``): the stored episodes passed to ``run``, and steps without
a recorded chunk start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from actors.rollout import EnvFactory, RolloutWorker
from core.types import Outcome
from policies.train_state import load_state, save_state
from rlt.actor import Mode
from rlt.errors import RLTInputError
from rlt.online import EpisodeChunks, EpisodeStats, EvalPoint, OnlineRLT
from storage.records import EpisodeRecord


class RLTLoop:
    """The learner ``learner`` (``rlt``) and a one-env ``RolloutWorker`` on ``env_factory`` (see the module docstring).

    ``on_stats`` receives every episode's ``EpisodeStats`` (progress display).
    """

    def __init__(
        self,
        learner: OnlineRLT,
        env_factory: EnvFactory,
        *,
        on_episode: Callable[[EpisodeRecord], object] | None = None,
        on_stats: Callable[[EpisodeStats], object] | None = None,
    ) -> None:
        config = learner.config
        self.rlt, self.config = learner, config
        self.on_episode, self.on_stats = on_episode, on_stats
        self.worker = RolloutWorker(
            [env_factory],
            learner.actor,
            self._emit,
            task=config.task,
            seed=config.seed,
            record_images=config.record_images,
            record_embeddings=True,
        )
        self.env_steps = 0
        self.episode_index = 0
        self.stats: list[EpisodeStats] = []
        self.curve: list[EvalPoint] = []
        self.evaluated: list[EpisodeRecord] = []

    @property
    def last_evaluation(self) -> list[EpisodeChunks]:
        """The last evaluation's episodes at chunk level (e.g. for ``rlt.diagnostics.critic_calibration``)."""
        return self.rlt.episode_chunks(self.evaluated)

    def run(
        self, records: Iterable[EpisodeRecord] = (), state_path: str | Path | None = None
    ) -> list[EvalPoint]:
        """Warm up, then train for ``total_env_steps``; return the evaluation curve.

        ``records`` (stored episodes of the task) join the warm-up: they help fit the token and seed the second
        replay. With ``state_path`` the loop's state (learner weights, optimizers and replay, the token, counters,
        random state, curve) is written there atomically after every online episode, and a run that finds one
        skips the warm-up and continues from it.
        """
        state = load_state(state_path) if state_path is not None else None
        if state is not None:
            end, next_eval = self._restore(state)
        else:
            self.warm_up(records)
            end, next_eval = self.env_steps + self.config.total_env_steps, self.env_steps
        while self.env_steps < end:
            if self.config.eval_every_steps and self.env_steps >= next_eval:
                self.curve.append(EvalPoint(self.env_steps, self.evaluate(self.config.eval_episodes)))
                next_eval += self.config.eval_every_steps
            played = self.play("learner", 1)
            self.rlt.learn(played)
            if state_path is not None:
                save_state(state_path, self._state(end, next_eval))
        if self.config.eval_every_steps:
            self.curve.append(EvalPoint(self.env_steps, self.evaluate(self.config.eval_episodes)))
        return self.curve

    def warm_up(self, records: Iterable[EpisodeRecord] = ()) -> int:
        """``warmup_episodes`` prior episodes, then ``OnlineRLT.warm_up`` on them and ``records``; returns the
        transitions added to replay."""
        played = self.play("prior", self.config.warmup_episodes)
        return self.rlt.warm_up(played, records)

    def play(self, mode: Mode, episodes: int, seeds: list[int] | None = None) -> list[EpisodeRecord]:
        """Play ``episodes`` episodes with the actor in ``mode`` (on ``seeds``; default: the run's training
        seeds); returns their records."""
        if mode != "prior" and self.rlt.encoder is None:
            raise RLTInputError(
                "mode: the RL token must be fitted before the learner acts (run warm-up first)"
            )
        if not episodes:
            return []
        self.rlt.actor.mode = mode
        seeds = seeds or [self.config.seed * 1_000_003 + self.episode_index + k for k in range(episodes)]
        self.worker.seed_episodes(seeds)
        played: list[EpisodeRecord] = []
        self.worker.run(episodes=episodes, on_episode=played.append)
        return played

    def evaluate(self, episodes: int, mode: Mode = "eval") -> float:
        """Success rate over ``episodes`` episodes on the fixed evaluation seeds (no exploration, no updates)."""
        seeds = [self.config.eval_seed_base + index for index in range(episodes)]
        self.evaluated = self.play(mode, episodes, seeds)
        return float(np.mean([record.outcome == Outcome.SUCCESS for record in self.evaluated]))

    def close(self) -> None:
        """Close the worker's env."""
        self.worker.close()

    def _emit(self, record: EpisodeRecord) -> None:
        """The worker's sink: hand the record on, count it."""
        mode = self.rlt.actor.mode
        if self.on_episode is not None:
            self.on_episode(record)
        if mode != "eval":
            self.env_steps += record.length
        self.episode_index += 1
        stats = self._episode_stats(record, mode)
        self.stats.append(stats)
        if self.on_stats is not None:
            self.on_stats(stats)

    def _episode_stats(self, record: EpisodeRecord, mode: Mode) -> EpisodeStats:
        starts = record.chunk_offsets == 0
        acted = np.array([version == self.config.rl_version for version in record.policy_versions], bool)
        return EpisodeStats(
            index=self.episode_index,
            mode=mode,
            success=record.outcome == Outcome.SUCCESS,
            length=record.length,
            env_steps=self.env_steps,
            critical_steps=int(np.sum(record.metadata.get("critical_phase", 0))),
            rl_chunks=int(np.sum(starts & acted)),
            interventions=len(record.interventions),
            losses=dict(self.rlt.learner.last_losses),
        )

    def _state(self, end: int, next_eval: int) -> dict[str, Any]:
        """What ``run`` needs to continue after the current episode (see ``run``'s ``state_path``)."""
        return {
            **self.rlt.state(),
            "counters": {"env_steps": self.env_steps, "episode_index": self.episode_index},
            "loop": {"end": end, "next_eval": next_eval},
            "curve": [(point.env_steps, point.success_rate) for point in self.curve],
            "stats": self.stats,
        }

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        """Adopt a ``_state``; returns the loop's end and next evaluation step."""
        self.rlt.restore(state)
        self.env_steps = int(state["counters"]["env_steps"])
        self.episode_index = int(state["counters"]["episode_index"])
        self.curve = [EvalPoint(steps, rate) for steps, rate in state["curve"]]
        self.stats = list(state["stats"])
        return int(state["loop"]["end"]), int(state["loop"]["next_eval"])
