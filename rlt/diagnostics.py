"""Is the critic telling the truth? Q of executed chunks against the returns that actually followed them.

TD3-style learners fail quietly when the actor climbs a critic's errors: Q rises while success does not. The
check needs no simulator or expert, so it works on robot episodes too: for every critical chunk of finished
episodes, compare ``min(Q1, Q2)(x, a)`` of the chunk that was executed with its Monte-Carlo return, the
discounted rewards of that chunk and of every later chunk of the episode. On an episode that ended by
truncation the Monte-Carlo return misses what came after the limit, so it is a lower bound there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from core.types import monte_carlo_returns
from rlt.online import EpisodeChunks
from rlt.state import RLStateEncoder
from rlt.td3 import ChunkedTD3


@dataclass(frozen=True)
class CriticCalibration:
    """Q vs Monte-Carlo return over ``chunks`` critical chunks: mean error (Q − return) and rank correlation."""

    chunks: int
    mean_q: float
    mean_return: float
    bias: float
    spearman: float


def chunk_returns(episode: EpisodeChunks, gamma: float) -> np.ndarray:
    """Discounted return from the start of every chunk of ``episode`` to its end (per-step ``gamma``)."""
    returns = monte_carlo_returns(np.concatenate([step.rewards for step in episode.steps]), gamma)
    starts = np.cumsum([0] + [len(step.rewards) for step in episode.steps[:-1]])
    return returns[starts]


def critic_calibration(
    learner: ChunkedTD3, encoder: RLStateEncoder, episodes: list[EpisodeChunks]
) -> CriticCalibration:
    """Compare the critic's value of every executed critical chunk in ``episodes`` with its Monte-Carlo return."""
    q_values, returns = [], []
    for episode in episodes:
        critical = [index for index, step in enumerate(episode.steps) if step.critical]
        if not critical:
            continue
        steps = [episode.steps[index] for index in critical]
        states = encoder.encode(
            np.stack([step.context.embeddings for step in steps]),
            np.stack([step.context.proprio for step in steps]),
        )
        references = np.stack([step.context.reference for step in steps])
        q_values.append(learner.q_values(states, references, np.stack([step.executed for step in steps])))
        returns.append(chunk_returns(episode, learner.config.gamma)[critical])
    if not q_values:
        return CriticCalibration(0, float("nan"), float("nan"), float("nan"), float("nan"))
    q, mc = np.concatenate(q_values), np.concatenate(returns)
    spearman = float(stats.spearmanr(q, mc).statistic) if np.ptp(mc) > 0 and np.ptp(q) > 0 else float("nan")
    return CriticCalibration(len(q), float(q.mean()), float(mc.mean()), float((q - mc).mean()), spearman)
