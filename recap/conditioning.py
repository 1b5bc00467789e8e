"""Advantage-conditioned training examples: per-step "Advantage: positive/negative" text from a relabel.

The policy training loop (policies/training.py) appends the condition to the task prompt and drops it 30% of
the time so the unconditioned policy is trained too; at inference the policy is conditioned on positive.
Two schemes (``recap.config.Conditioning``): ``explicit`` writes both texts; ``positive_only`` writes the
positive text only and leaves negative steps unconditioned (they train the unconditioned policy; RLinf).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from policies.training import BCDataset, HeldOutLoss
from policies.vla.policy import VLAPolicy
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


def conditioning_gap(
    policy: VLAPolicy,
    dataset: BCDataset,
    negative: str | None = NEGATIVE_PROMPT,
    max_samples: int = 512,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Does the trained policy use its advantage conditional? The flow loss of the dataset's positive-labelled
    samples (``conditions == POSITIVE_PROMPT``) under the positive prompt and under ``negative`` (the negative
    text, or None: unconditioned, for positive-only conditioning), with the same noise and flow times.

    ``conditioning_gap`` = loss under ``negative`` − loss under positive: > 0 when the positive prompt explains
    the positive samples better (the conditional is learned), ≈ 0 when the model ignores the text. At most
    ``max_samples`` samples (drawn with ``seed``); all figures None when no sample is positive.
    """
    positive = [i for i, text in enumerate(dataset.conditions or []) if text == POSITIVE_PROMPT]
    if not positive:
        return {
            "samples": 0,
            "flow_loss_positive": None,
            "flow_loss_negative": None,
            "conditioning_gap": None,
        }
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(positive, size=min(max_samples, len(positive)), replace=False))
    subset = BCDataset(
        images={camera: frames[rows] for camera, frames in dataset.images.items()},
        state=dataset.state[rows],
        prompts=[dataset.prompts[i] for i in rows],
        actions=dataset.actions[rows],
        action_mask=dataset.action_mask[rows],
        conditions=[POSITIVE_PROMPT] * len(rows),
    )
    loss_positive = HeldOutLoss(policy, subset, seed=seed)()
    loss_negative = HeldOutLoss(policy, replace(subset, conditions=[negative] * len(rows)), seed=seed)()
    return {
        "samples": len(rows),
        "flow_loss_positive": loss_positive,
        "flow_loss_negative": loss_negative,
        "conditioning_gap": loss_negative - loss_positive,
    }
