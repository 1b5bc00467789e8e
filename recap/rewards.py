"""Rewards and Monte-Carlo returns from episode outcomes, normalized per task into [−1, 0].

Every step costs −1, the success step earns 0 and the last step of a failed episode (failure or time-limit
truncation) costs −C_fail. The return of a step is then minus the steps left to success, or minus the steps
left plus C_fail. Dividing by ``max_episode_length + C_fail`` of the task puts every return in [−1, 0]: 0 is
"succeeding now", −1 the worst possible start.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np

from core.types import LEARNABLE_OUTCOMES, Outcome
from recap.config import RewardConfig
from storage.records import EpisodeRecord


class RecapInputError(ValueError):
    """Input the RECAP learner cannot use; the message names the field and what was expected."""


def check_learnable(episodes: Sequence[EpisodeRecord]) -> None:
    """Raise ``RecapInputError`` unless every episode is non-empty, unique and has a learnable outcome."""
    if not episodes:
        raise RecapInputError("episodes: expected at least one EpisodeRecord, got none")
    seen: set[uuid.UUID] = set()
    for episode in episodes:
        if episode.uuid in seen:
            raise RecapInputError(f"episodes: uuid {episode.uuid} appears twice; expected unique episodes")
        seen.add(episode.uuid)
        if episode.outcome not in LEARNABLE_OUTCOMES:
            raise RecapInputError(
                f"episode {episode.uuid}: outcome {episode.outcome.value!r} has no reward; expected one of "
                f"{[outcome.value for outcome in LEARNABLE_OUTCOMES]} (drop error episodes before relabeling)"
            )
        if episode.length < 1:
            raise RecapInputError(f"episode {episode.uuid}: length 0; expected at least one step")


def task_horizons(episodes: Sequence[EpisodeRecord], config: RewardConfig) -> dict[str, int]:
    """Max episode length per task: from the config, else the longest episode of the task in ``episodes``."""
    horizons: dict[str, int] = {}
    for episode in episodes:
        horizons[episode.task] = max(horizons.get(episode.task, 0), episode.length)
    configured = config.max_episode_length
    for task in horizons:
        if isinstance(configured, int):
            horizons[task] = configured
        elif isinstance(configured, dict) and task in configured:
            horizons[task] = configured[task]
    for episode in episodes:
        if episode.length > horizons[episode.task]:
            raise RecapInputError(
                f"episode {episode.uuid}: length {episode.length} exceeds max_episode_length "
                f"{horizons[episode.task]} of task {episode.task!r}; expected ≤ the configured horizon"
            )
    return horizons


def fail_penalty(horizon: int, config: RewardConfig) -> float:
    """C_fail for a task with this horizon (default: the horizon itself)."""
    return float(horizon) if config.fail_penalty is None else float(config.fail_penalty)


def return_scale(horizon: int, config: RewardConfig) -> float:
    """The largest possible |return| of a task: dividing by it maps returns into [−1, 0]."""
    return float(horizon) + fail_penalty(horizon, config)


def step_rewards(episode: EpisodeRecord, horizon: int, config: RewardConfig) -> np.ndarray:
    """Normalized per-step rewards (length T) of an episode under the RECAP reward definition."""
    rewards = np.full(episode.length, -1.0, dtype=np.float64)
    rewards[-1] = 0.0 if episode.outcome == Outcome.SUCCESS else -fail_penalty(horizon, config)
    return rewards / return_scale(horizon, config)


