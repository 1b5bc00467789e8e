"""In-memory read views for learners: per-episode arrays and uniform N-step transition sampling.

Stored episodes are immutable, so their (image-free) step arrays are cached once and concatenated; sampling is
then pure numpy. Every window is cut at its episode's end: nothing ever mixes steps of two episodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class StepArrays:
    """The numeric per-step arrays of one episode (first axis T)."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    sources: np.ndarray
    privileged: np.ndarray | None


class TransitionBatch(NamedTuple):
    """``B`` sampled steps with the ``n``-step window that starts at each.

    ``states`` (B×S) is the state at ``t``; ``actions`` (B×n×D), ``rewards`` (B×n) and ``sources`` (B×n) cover
    steps ``t … t+n−1``; ``mask`` (B×n) is False past the episode's last step (those entries are 0).
    ``terminated`` / ``truncated`` (B) say whether the episode terminated / was truncated inside the window.
    ``next_states`` (B×S) is the state at ``t+n`` where ``has_next`` and zeros elsewhere. ``privileged`` /
    ``next_privileged`` likewise when every sampled episode has simulator state, else None. ``images`` /
    ``next_images`` (camera → B×h×w×3) only when requested. ``episode_ids`` are store row ids (see
    ``ReplayIndex.uuids``).
    """

    episode_ids: np.ndarray
    t: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    sources: np.ndarray
    mask: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_states: np.ndarray
    has_next: np.ndarray
    privileged: np.ndarray | None = None
    next_privileged: np.ndarray | None = None
    images: dict[str, np.ndarray] | None = None
    next_images: dict[str, np.ndarray] | None = None


class ReplayIndex:
    """Concatenated step arrays of a set of episodes, grown as episodes are added."""

    def __init__(self) -> None:
        self.episode_ids: set[int] = set()
        self.uuids: dict[int, uuid.UUID] = {}
        self._pending: list[tuple[int, StepArrays]] = []
        self._flat: dict[str, np.ndarray] = {}
        self._has_privileged = True

    @property
    def size(self) -> int:
        """Total number of steps."""
        return len(self._flat.get("rewards", ())) + sum(len(a.rewards) for _, a in self._pending)

    def add(self, episode_id: int, episode_uuid: uuid.UUID, arrays: StepArrays) -> None:
        """Add one episode's arrays (a no-op for episodes already present)."""
        if episode_id in self.episode_ids:
            return
        self.episode_ids.add(episode_id)
        self.uuids[episode_id] = episode_uuid
        if len(arrays.rewards):
            self._pending.append((episode_id, arrays))

    def arrays(self) -> dict[str, np.ndarray]:
        """The flat arrays: states, actions, rewards, terminated, truncated, sources, episode_ids, t, end."""
        if self._pending:
            self._merge()
        return self._flat

    def _merge(self) -> None:
        start = len(self._flat.get("rewards", ()))
        parts: dict[str, list[np.ndarray]] = {k: [v] for k, v in self._flat.items()}
        for episode_id, episode in self._pending:
            length = len(episode.rewards)
            self._has_privileged &= episode.privileged is not None
            columns = {
                "states": episode.states,
                "actions": episode.actions,
                "rewards": episode.rewards,
                "terminated": episode.terminated,
                "truncated": episode.truncated,
                "sources": episode.sources,
                "episode_ids": np.full(length, episode_id, dtype=np.int64),
                "t": np.arange(length, dtype=np.int64),
                "end": np.full(length, start + length, dtype=np.int64),
            }
            if episode.privileged is not None:
                columns["privileged"] = episode.privileged
            for name, column in columns.items():
                parts.setdefault(name, []).append(column)
            start += length
        self._pending = []
        if not self._has_privileged:
            parts.pop("privileged", None)
        try:
            self._flat = {name: np.concatenate(columns) for name, columns in parts.items()}
        except ValueError as error:
            raise ValueError(
                f"episodes have different state/action sizes; filter by task before sampling ({error})"
            ) from None

    def sample(self, batch_size: int, rng: np.random.Generator, n_step: int) -> TransitionBatch:
        """Uniform over all steps; each window is cut at its episode's end."""
        flat = self.arrays()
        starts = rng.integers(0, len(flat["rewards"]), size=batch_size)
        end = flat["end"][starts]
        window = starts[:, None] + np.arange(n_step)[None, :]
        mask = window < end[:, None]
        window = np.minimum(window, end[:, None] - 1)
        nxt = starts + n_step
        has_next = nxt < end
        nxt = np.minimum(nxt, end - 1)
        privileged = flat.get("privileged")
        return TransitionBatch(
            episode_ids=flat["episode_ids"][starts],
            t=flat["t"][starts],
            states=flat["states"][starts],
            actions=np.where(mask[:, :, None], flat["actions"][window], 0.0).astype(np.float32),
            rewards=np.where(mask, flat["rewards"][window], 0.0).astype(np.float32),
            sources=np.where(mask, flat["sources"][window], 0).astype(np.uint8),
            mask=mask,
            terminated=(flat["terminated"][window] & mask).any(axis=1),
            truncated=(flat["truncated"][window] & mask).any(axis=1),
            next_states=np.where(has_next[:, None], flat["states"][nxt], 0.0).astype(np.float32),
            has_next=has_next,
            privileged=None if privileged is None else privileged[starts],
            next_privileged=(
                None
                if privileged is None
                else np.where(has_next[:, None], privileged[nxt], 0.0).astype(np.float32)
            ),
        )
