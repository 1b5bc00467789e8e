"""The columnar episode format: what actors build and the store writes in one transaction.

Everything a step carries is an array with the episode length T as its first axis, so an episode moves as a
handful of contiguous buffers rather than T objects. ``validate`` checks shapes, dtypes and finiteness before
anything touches the database; the store calls it, so bad input never reaches SQL.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Outcome(enum.StrEnum):
    """How an episode ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRUNCATED = "truncated"
    ERROR = "error"


class StepSource(enum.IntEnum):
    """Who produced the executed action of a step."""

    POLICY = 0
    HUMAN = 1


class EpisodeValidationError(ValueError):
    """An episode record is malformed; the message names the field and what was expected."""


@dataclass(frozen=True)
class InterventionSegment:
    """A human takeover covering steps ``t_start`` (inclusive) to ``t_end`` (exclusive)."""

    t_start: int
    t_end: int
    trigger: str


@dataclass
class EpisodeRecord:
    """One finished episode, columnar.

    Per-step arrays (first axis T): ``states`` T×S float32, ``actions`` (executed) T×D float32, ``rewards`` T
    float32, ``terminated`` / ``truncated`` T bool, ``sources`` T uint8 (``StepSource``), ``policy_versions`` T
    str (the version that produced each step's chunk), ``chunk_ids`` T int32 (row in ``chunks``, −1 for steps not
    from a chunk), ``chunk_offsets`` T int32 (index of the action inside its chunk), ``latency_ms`` T float32
    (inference latency of the chunk, 0 where none). ``chunks`` is K×H×D float32: the predicted chunks.
    ``images`` maps camera → T×h×w×3 uint8 (optional). ``privileged`` is T×P float32 simulator state (optional;
    sim only — value models and state-based baselines may use it, deployed policies never do).
    """

    uuid: uuid.UUID
    task: str
    env_id: str
    policy_version: str | None
    seed: int | None
    outcome: Outcome
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    sources: np.ndarray
    policy_versions: list[str | None]
    chunk_ids: np.ndarray
    chunk_offsets: np.ndarray
    latency_ms: np.ndarray
    chunks: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    privileged: np.ndarray | None = None
    interventions: list[InterventionSegment] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None

    @property
    def length(self) -> int:
        """Number of steps T."""
        return int(self.actions.shape[0])


@dataclass
class EpisodeLabels:
    """Per-step labels of one episode under one relabel version (arrays of length T)."""

    episode_uuid: uuid.UUID
    values: np.ndarray
    advantages: np.ndarray
    indicators: np.ndarray


@dataclass
class RelabelRecord:
    """A relabel version: per-step value/advantage/indicator for a set of episodes, with its lineage.

    Relabels are never overwritten: writing one creates a new version. ``parent_id`` names the relabel it
    refines (if any), ``value_model_version`` the value model that produced it, ``config`` the settings and
    ``diagnostics`` the label-quality figures computed when it was made.
    """

    method: str
    labels: list[EpisodeLabels]
    value_model_version: str | None = None
    parent_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    relabel_id: str | None = None
