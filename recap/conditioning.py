"""Advantage-conditioned training examples: per-step "Advantage: positive/negative" text from a relabel.

The policy training loop (policies/training.py) appends the condition to the task prompt and drops it 30% of
the time so the unconditioned policy is trained too; at inference the policy is conditioned on positive.
Two schemes (``recap.config.Conditioning``): ``explicit`` writes both texts; ``positive_only`` writes the
positive text only and leaves negative steps unconditioned (they train the unconditioned policy; RLinf).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recap.config import Conditioning
from recap.relabel import METHOD
from storage.records import EpisodeLabels, EpisodeRecord, RelabelRecord

POSITIVE_PROMPT = "Advantage: positive"
NEGATIVE_PROMPT = "Advantage: negative"


class RelabelMismatchError(ValueError):
    """A relabel record does not fit the episodes it is applied to (missing episode, wrong length, method)."""


def advantage_prompt(indicator: bool) -> str:
    """The condition text of an advantage indicator."""
    return POSITIVE_PROMPT if indicator else NEGATIVE_PROMPT


@dataclass
class ConditionedEpisode:
    """An episode with its per-step advantage indicators and condition texts (length T)."""

    episode: EpisodeRecord
    indicators: np.ndarray
    conditions: list[str | None]


def labels_by_episode(record: RelabelRecord) -> dict[uuid.UUID, EpisodeLabels]:
    """The record's labels keyed by episode uuid (a RECAP record only)."""
    if record.method != METHOD:
        raise RelabelMismatchError(
            f"relabel {record.relabel_id}: method {record.method!r}, expected {METHOD!r}"
        )
    return {labels.episode_uuid: labels for labels in record.labels}


def matching_labels(
    episode: EpisodeRecord, labels: dict[uuid.UUID, EpisodeLabels], relabel_id: str | None
) -> EpisodeLabels:
    """The labels of ``episode``; a missing episode or a length mismatch is a ``RelabelMismatchError``."""
    found = labels.get(episode.uuid)
    if found is None:
        raise RelabelMismatchError(
            f"episode {episode.uuid}: not in relabel {relabel_id}; relabel the current data"
        )
    if len(found.indicators) != episode.length:
        raise RelabelMismatchError(
            f"episode {episode.uuid}: relabel {relabel_id} has {len(found.indicators)} labels, "
            f"expected the episode length {episode.length}"
        )
    return found


def condition_texts(flags: np.ndarray, scheme: Conditioning = "explicit") -> list[str | None]:
    """Per-step condition text of indicators ``flags`` under ``scheme`` (None: no condition)."""
    if scheme == "positive_only":
        return [POSITIVE_PROMPT if flag else None for flag in flags]
    return [advantage_prompt(bool(flag)) for flag in flags]


def conditioned_episodes(
    episodes: Sequence[EpisodeRecord], record: RelabelRecord, scheme: Conditioning = "explicit"
) -> list[ConditionedEpisode]:
    """Attach the advantage condition of ``record`` to every step of ``episodes`` (texts per ``scheme``)."""
    labels = labels_by_episode(record)
    out = []
    for episode in episodes:
        flags = matching_labels(episode, labels, record.relabel_id).indicators.astype(bool)
        out.append(ConditionedEpisode(episode, flags, condition_texts(flags, scheme)))
    return out
