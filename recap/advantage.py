"""Advantages and the per-task advantage indicator of RECAP.

N-step: A_t = Σ_{k<N} r_{t+k} + V(o_{t+N}) − V(o_t), with the reward sum truncated at the episode end and
V = 0 past it (the last step already carries the terminal reward: 0 on success, −C_fail on failure, so nothing
is left to bootstrap). Monte-Carlo: A_t = G_t − V(o_t). The indicator is I_t = A_t > ε_task, ε_task chosen so
that the requested fraction of a task's autonomous steps is positive; intervention steps are forced positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recap.config import AdvantageConfig
from recap.rewards import monte_carlo_returns
from storage.records import EpisodeRecord, StepSource


def n_step_advantages(rewards: np.ndarray, values: np.ndarray, n_step: int) -> np.ndarray:
    """N-step advantages of one episode (rewards and values of length T)."""
    length = len(rewards)
    if len(values) != length:
        raise ValueError(f"values has length {len(values)}, expected the episode length {length}")
    cumulative = np.concatenate([[0.0], np.cumsum(rewards)])
    end = np.minimum(np.arange(length) + n_step, length)
    reward_sum = cumulative[end] - cumulative[:length]
    bootstrap = np.where(end < length, values[np.minimum(end, length - 1)], 0.0)
    return reward_sum + bootstrap - values


def monte_carlo_advantages(rewards: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Monte-Carlo advantages G_t − V(o_t) of one episode."""
    if len(values) != len(rewards):
        raise ValueError(f"values has length {len(values)}, expected the episode length {len(rewards)}")
    return monte_carlo_returns(rewards) - values


def advantages(rewards: np.ndarray, values: np.ndarray, config: AdvantageConfig) -> np.ndarray:
    """Advantages by the configured estimator."""
    if config.estimator == "monte_carlo":
        return monte_carlo_advantages(rewards, values)
    return n_step_advantages(rewards, values, config.n_step)


def quantile_threshold(advantages: np.ndarray, positive_fraction: float) -> float:
    """ε such that ``round(positive_fraction · n)`` of ``advantages`` are > ε (exact unless values tie).

    Returns −inf when every step should be positive and +inf for an empty population.
    """
    if advantages.size == 0:
        return float("inf")
    ordered = np.sort(advantages)[::-1]
    count = round(positive_fraction * ordered.size)
    return float("-inf") if count >= ordered.size else float(ordered[count])


def forced_positive(episode: EpisodeRecord, config: AdvantageConfig) -> np.ndarray:
    """Steps whose indicator is positive regardless of the advantage: human-intervention steps."""
    human = np.asarray(episode.sources) == StepSource.HUMAN
    return human if config.interventions_positive else np.zeros_like(human)


def task_thresholds(
    episodes: Sequence[EpisodeRecord], episode_advantages: Sequence[np.ndarray], config: AdvantageConfig
) -> dict[str, float]:
    """Per-task ε over the steps that are not forced positive (so that share of them comes out positive)."""
    pooled: dict[str, list[np.ndarray]] = {}
    for episode, values in zip(episodes, episode_advantages, strict=True):
        pooled.setdefault(episode.task, []).append(values[~forced_positive(episode, config)])
    fraction = float(config.positive_fraction)
    return {task: quantile_threshold(np.concatenate(parts), fraction) for task, parts in pooled.items()}


def indicators(
    episode: EpisodeRecord, episode_advantages: np.ndarray, threshold: float, config: AdvantageConfig
) -> np.ndarray:
    """I_t = A_t > ε, with intervention steps forced positive."""
    return (episode_advantages > threshold) | forced_positive(episode, config)
