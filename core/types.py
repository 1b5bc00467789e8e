"""The types every room speaks: an observation, an action chunk, who produced a step, a takeover segment, how an
episode ended (and the one rule that decides it), and the Monte-Carlo return.

Each is defined here once; ``policies.base``, ``storage`` and ``envs`` re-export the ones their callers used to
import from them. numpy only, so a robot computer can import it without torch, mujoco or sqlalchemy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

import numpy as np


class Observation(TypedDict):
    """One time step as a policy sees it.

    ``images`` maps a camera name to an ``H×W×3`` ``uint8`` array (correct orientation), ``state`` is the
    proprioceptive vector (``float32``), ``prompt`` the natural-language instruction. ``privileged`` is the
    simulator's full state (Meta-World's 39-D vector): only scripted experts and simulated humans read it, it is
    never sent over the wire and learned policies never see it.
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: str
    privileged: NotRequired[np.ndarray]


class ObservationBatch(TypedDict):
    """A batch of observations: ``images[camera]`` is ``B×H×W×3``, ``state`` is ``B×S``, ``prompt`` a list of B."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: list[str]
    privileged: NotRequired[np.ndarray]


@dataclass
class ActionChunk:
    """What a policy returns for a batch: ``actions`` is ``B×H×D`` ``float32``.

    ``embeddings`` optionally carries the backbone's final token embeddings (``B×T×E``, used by RLT) and
    ``timing`` carries named durations in milliseconds (e.g. ``infer_ms``). A policy that refines another's
    chunk (RLT) also returns per row the chunk it started from (``reference``, ``B×C×D``), whether the row was
    in its critical phase (``critical``, ``B`` bool) and who produced the row's actions (``versions``); the
    rollout recorder stores them beside the executed chunk.
    """

    actions: np.ndarray
    embeddings: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=dict)
    reference: np.ndarray | None = None
    critical: np.ndarray | None = None
    versions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.actions.ndim != 3:
            raise ValueError(f"ActionChunk.actions must be B×H×D, got shape {self.actions.shape}")


class StepSource(enum.IntEnum):
    """Who produced the executed action of a step (stored per step as ``uint8``)."""

    POLICY = 0
    HUMAN = 1


@dataclass(frozen=True)
class InterventionSegment:
    """A human takeover covering steps ``t_start`` (inclusive) to ``t_end`` (exclusive), started by ``trigger``."""

    t_start: int
    t_end: int
    trigger: str


class Outcome(enum.StrEnum):
    """How an episode ended: see :func:`episode_outcome` for the rule."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRUNCATED = "truncated"
    ERROR = "error"


#: Outcomes a learner may learn from: every episode that ran to an end (an ``ERROR`` episode did not).
LEARNABLE_OUTCOMES: tuple[Outcome, ...] = (Outcome.SUCCESS, Outcome.FAILURE, Outcome.TRUNCATED)


def episode_outcome(success: bool, terminated: bool, truncated: bool) -> Outcome:
    """The one rule every episode writer uses: ``SUCCESS`` if the task succeeded; else ``TRUNCATED`` when the
    episode was cut by a time limit (truncated, not terminated); else ``FAILURE`` (the env ended it, or it ended
    without either flag). ``ERROR`` (a crash, an e-stop) is decided by the writer, not by this rule."""
    if success:
        return Outcome.SUCCESS
    if truncated and not terminated:
        return Outcome.TRUNCATED
    return Outcome.FAILURE


def monte_carlo_returns(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """G_t = Σ_{k ≥ t} γ^(k−t) r_k for every step t of one finished episode (``float64``, length T)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if gamma == 1.0:
        return np.cumsum(rewards[::-1])[::-1].copy()
    returns = np.zeros(len(rewards) + 1)
    for t in range(len(rewards) - 1, -1, -1):
        returns[t] = rewards[t] + gamma * returns[t + 1]
    return returns[:-1]
