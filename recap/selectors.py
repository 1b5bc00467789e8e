"""Baseline data selectors for ablations on the same data: per-step weights keyed by episode uuid.

A weight of 0 drops the step; plain BC weighs every step 1; filtered BC keeps successful episodes and
intervention steps; advantage-filtered BC keeps the steps a relabel marks positive (RECAP's labels used as a filter
instead of a condition); AWR weighs steps by exp(A / τ), clipped, using the advantages of a relabel.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recap.conditioning import labels_by_episode, matching_labels
from storage.records import EpisodeRecord, Outcome, RelabelRecord, StepSource

StepWeights = dict[uuid.UUID, np.ndarray]


class AWRConfig(BaseModel):
    """Advantage-weighted regression weights exp(A / (τ · scale)) clipped at ``max_weight``.

    With ``standardize`` the scale is the task's advantage standard deviation (advantages of normalized
    returns are small, ~0.05 for 50 steps); otherwise 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, gt=0.0)
    max_weight: float = Field(default=20.0, gt=0.0)
    standardize: bool = True


def bc_all_weights(episodes: Sequence[EpisodeRecord]) -> StepWeights:
    """Plain behaviour cloning: every step of every episode."""
    return {episode.uuid: np.ones(episode.length, dtype=np.float32) for episode in episodes}


def filtered_bc_weights(episodes: Sequence[EpisodeRecord]) -> StepWeights:
    """Filtered BC: every step of successful episodes plus the intervention steps of the others."""
    return {
        episode.uuid: (
            np.ones(episode.length, dtype=np.float32)
            if episode.outcome == Outcome.SUCCESS
            else (np.asarray(episode.sources) == StepSource.HUMAN).astype(np.float32)
        )
        for episode in episodes
    }


def advantage_filtered_weights(episodes: Sequence[EpisodeRecord], record: RelabelRecord) -> StepWeights:
    """Advantage-filtered BC: weight 1 on the steps ``record`` marks positive (its indicators), 0 elsewhere."""
    labels = labels_by_episode(record)
    return {
        ep.uuid: matching_labels(ep, labels, record.relabel_id).indicators.astype(np.float32) for ep in episodes
    }


def awr_weights(
    episodes: Sequence[EpisodeRecord], record: RelabelRecord, config: AWRConfig | None = None
) -> StepWeights:
    """AWR weights from the advantages of ``record`` (which must cover ``episodes``)."""
    config = config or AWRConfig()
    labels = labels_by_episode(record)
    advantages = {ep.uuid: matching_labels(ep, labels, record.relabel_id).advantages for ep in episodes}
    scale: dict[str, float] = {}
    for task in {episode.task for episode in episodes}:
        pooled = np.concatenate([advantages[ep.uuid] for ep in episodes if ep.task == task])
        spread = float(pooled.std()) if config.standardize else 1.0
        scale[task] = spread if spread > 1e-8 else 1.0
    ceiling = np.log(config.max_weight)
    return {
        ep.uuid: np.exp(
            np.minimum(advantages[ep.uuid] / (config.temperature * scale[ep.task]), ceiling)
        ).astype(np.float32)
        for ep in episodes
    }
