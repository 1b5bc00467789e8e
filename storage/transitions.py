"""Transition sampling for learners: a cached ``ReplayIndex`` per episode filter, refreshed incrementally.

Stored episodes are immutable, so the image-free step arrays of the matching episodes are loaded once; each
refresh adds only episodes stored since (one id query). Frames are fetched for the sampled steps only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.database import Database, batches
from storage.errors import NotFoundError
from storage.images import FrameStore
from storage.reads import ARRAY_COLUMNS, arrays_from_columns, select_episodes, transpose
from storage.records import EpisodeQuery
from storage.sampling import ReplayIndex, TransitionBatch
from storage.schema import Episode

STEPS_OF_EPISODES = (
    f"SELECT episode_id, {', '.join(ARRAY_COLUMNS)} FROM steps WHERE episode_id IN ({{ids}}) "
    "ORDER BY episode_id, t"
)


class TransitionSampler:
    """In-memory replay indexes (one per ``EpisodeQuery``) and uniform N-step sampling over them."""

    def __init__(self, db: Database, frames: FrameStore) -> None:
        self._db = db
        self._frames = frames
        self._replays: dict[EpisodeQuery, ReplayIndex] = {}

    def sample(
        self,
        query: EpisodeQuery,
        batch_size: int,
        rng: np.random.Generator,
        n_step: int,
        images: bool,
        refresh: bool,
    ) -> TransitionBatch:
        """``batch_size`` uniformly sampled steps with their ``n_step`` windows (frames if ``images``)."""
        if batch_size < 1 or n_step < 1:
            raise ValueError(f"batch_size and n_step: expected >= 1, got {batch_size} and {n_step}")
        batch = self.replay(query, refresh).sample(batch_size, rng, n_step)
        if images:
            batch = batch._replace(**self._batch_images(batch))
        return batch

    def replay(self, query: EpisodeQuery, refresh: bool) -> ReplayIndex:
        """The index of all matching episodes' step arrays (with newly stored ones if ``refresh``)."""
        replay = self._replays.get(query)
        if replay is not None and not refresh and replay.size:
            return replay
        replay = self._replays.setdefault(query, ReplayIndex())
        ids = select_episodes(query).with_only_columns(Episode.id)
        with self._db.read_session() as session:
            new_ids = sorted(set(session.scalars(ids)) - replay.episode_ids)
            for batch in batches(new_ids, 200):
                episodes = session.scalars(sa.select(Episode).where(Episode.id.in_(batch))).all()
                self._add_arrays(session, list(episodes), replay)
        if replay.size == 0:
            raise NotFoundError(f"no steps to sample for {query}")
        return replay

    def _add_arrays(self, session: Session, episodes: list[Episode], replay: ReplayIndex) -> None:
        """Load the step arrays of ``episodes`` in one query and add them to ``replay``."""
        by_id = {episode.id: episode for episode in episodes}
        marks = ", ".join("?" * len(by_id))
        rows = self._db.raw_rows(session.connection(), STEPS_OF_EPISODES.format(ids=marks), tuple(by_id))
        grouped: dict[int, list[Any]] = {episode_id: [] for episode_id in by_id}
        for row in rows:
            grouped[row[0]].append(row[1:])
        for episode_id, episode_rows in grouped.items():
            episode = by_id[episode_id]
            arrays = arrays_from_columns(episode, transpose(episode_rows, len(ARRAY_COLUMNS)))
            replay.add(episode_id, episode.uuid, arrays)

    def _batch_images(self, batch: TransitionBatch) -> dict[str, dict[str, np.ndarray]]:
        """Frames at ``t`` (``images``) and at ``t + n`` where there is a next step (``next_images``)."""
        next_t = np.where(batch.has_next, batch.t + batch.mask.shape[1], batch.t)
        keys = {(int(e), int(t)) for e, t in zip(batch.episode_ids, batch.t, strict=True)}
        keys |= {(int(e), int(t)) for e, t in zip(batch.episode_ids, next_t, strict=True)}
        frames = self._frames.of_steps(sorted(keys))
        cameras = sorted({camera for _, _, camera in frames})

        def gather(steps: np.ndarray) -> dict[str, np.ndarray]:
            return {
                camera: np.stack(
                    [frames[(int(e), int(t), camera)] for e, t in zip(batch.episode_ids, steps, strict=True)]
                )
                for camera in cameras
            }

        return {"images": gather(batch.t), "next_images": gather(next_t)}
