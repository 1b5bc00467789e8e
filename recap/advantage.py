"""Advantages and the per-task advantage indicator of RECAP.

N-step: A_t = Σ_{t≤k<e} r_k + V(o_e) − V(o_t) with e = min(t + N, end of t's segment), where a segment ends at
the episode's end and (optionally) where the step source changes (policy ↔ human). At the episode's end V = 0
(the last step already carries the terminal reward: 0 on success, −C_fail on failure, so nothing is left to
bootstrap); at a source change the window bootstraps from V at the other source's first step. N defaults to a
tenth of the task's horizon (``AdvantageConfig.window``). Monte-Carlo: A_t = G_t − V(o_t). The indicator is
I_t = A_t > ε_task, ε_task chosen so that the requested fraction of a task's autonomous steps is positive;
intervention steps (and, optionally, demonstrations) are forced positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.types import monte_carlo_returns
from recap.config import AdvantageConfig
from storage.records import EpisodeRecord, StepSource

#: Policy-version prefix of the scripted experts' demonstrations (``envs.scripted.scripted_version``).
SCRIPTED_PREFIX = "scripted"


def window_ends(length: int, n_step: int, sources: np.ndarray | None = None) -> np.ndarray:
    """Exclusive end e_t of each step's window: min(t + N, the episode's end, the next change of ``sources``)."""
    ends = np.minimum(np.arange(length) + n_step, length)
    if sources is None or length == 0:
        return ends
    sources = np.asarray(sources)
    change = np.flatnonzero(sources[1:] != sources[:-1]) + 1  # first step of each new segment
    boundaries = np.append(change, length)
    segment_end = boundaries[np.searchsorted(change, np.arange(length), side="right")]
    return np.minimum(ends, segment_end)


def n_step_advantages(
    rewards: np.ndarray, values: np.ndarray, n_step: int, sources: np.ndarray | None = None
) -> np.ndarray:
    """N-step advantages of one episode (rewards and values of length T); with ``sources`` (T) the windows
    also stop where the step source changes and bootstrap from V there."""
    length = len(rewards)
    if len(values) != length:
        raise ValueError(f"values has length {len(values)}, expected the episode length {length}")
    cumulative = np.concatenate([[0.0], np.cumsum(rewards)])
    end = window_ends(length, n_step, sources)
    reward_sum = cumulative[end] - cumulative[:length]
    bootstrap = np.where(end < length, values[np.minimum(end, length - 1)], 0.0)
    return reward_sum + bootstrap - values


def monte_carlo_advantages(rewards: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Monte-Carlo advantages G_t − V(o_t) of one episode."""
    if len(values) != len(rewards):
        raise ValueError(f"values has length {len(values)}, expected the episode length {len(rewards)}")
    return monte_carlo_returns(rewards) - values


def advantages(
    rewards: np.ndarray,
    values: np.ndarray,
    config: AdvantageConfig,
    horizon: int | None = None,
    sources: np.ndarray | None = None,
) -> np.ndarray:
    """Advantages by the configured estimator (N from ``horizon``, default the episode length, when unset;
    windows stop at changes of ``sources`` when ``config.stop_at_source_change``)."""
    if config.estimator == "monte_carlo":
        return monte_carlo_advantages(rewards, values)
    segments = sources if config.stop_at_source_change else None
    return n_step_advantages(rewards, values, config.window(horizon or len(rewards)), segments)


def quantile_threshold(advantages: np.ndarray, positive_fraction: float) -> float:
    """ε such that ``round(positive_fraction · n)`` of ``advantages`` are > ε (exact unless values tie).

    Returns −inf when every step should be positive and +inf for an empty population.
    """
    if advantages.size == 0:
        return float("inf")
    ordered = np.sort(advantages)[::-1]
    count = round(positive_fraction * ordered.size)
    return float("-inf") if count >= ordered.size else float(ordered[count])


def is_demonstration(episode: EpisodeRecord) -> bool:
    """An episode the learned policy did not produce: a scripted expert's, or every step human."""
    scripted = (episode.policy_version or "").startswith(SCRIPTED_PREFIX)
    return scripted or bool(episode.length and (np.asarray(episode.sources) == StepSource.HUMAN).all())


def forced_positive(episode: EpisodeRecord, config: AdvantageConfig) -> np.ndarray:
    """Steps whose indicator is positive regardless of the advantage: human-intervention steps, and every
    step of a demonstration with ``demonstrations_positive``."""
    if config.demonstrations_positive and is_demonstration(episode):
        return np.ones(episode.length, dtype=bool)
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
