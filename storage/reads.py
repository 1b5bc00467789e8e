"""Episode reads: the episode index (list, count) and whole episodes as ``EpisodeRecord`` arrays.

Step, chunk and intervention rows are read straight through the driver (``Database.raw_rows``) and turned
into arrays column by column.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import sqlalchemy as sa

from core.types import Observation
from storage import codec
from storage.database import Database, as_utc
from storage.errors import NotFoundError
from storage.images import FrameStore
from storage.records import EpisodeQuery, EpisodeRecord, EpisodeSummary, InterventionSegment, Outcome
from storage.registry import PolicyRegistry
from storage.sampling import StepArrays
from storage.schema import Episode, PolicyVersion, Step

# The per-step columns read back; the first seven make a ``StepArrays``.
STEP_READ_COLUMNS = (
    "state",
    "action",
    "privileged",
    "reward",
    "terminated",
    "truncated",
    "source",
    "policy_version_id",
    "chunk_index",
    "chunk_offset",
    "latency_ms",
    "subtask",
    "injected",
)
ARRAY_COLUMNS = STEP_READ_COLUMNS[:7]
STEPS_OF_EPISODE = f"SELECT {', '.join(STEP_READ_COLUMNS)} FROM steps WHERE episode_id = ? ORDER BY t"
CHUNKS_OF_EPISODE = "SELECT actions, reference FROM chunks WHERE episode_id = ? ORDER BY chunk_index"
INTERVENTIONS_OF_EPISODE = (
    "SELECT t_start, t_end, trigger FROM interventions WHERE episode_id = ? ORDER BY segment_index"
)


class EpisodeReader:
    """Lists, counts and loads stored episodes."""

    def __init__(self, db: Database, policies: PolicyRegistry, frames: FrameStore) -> None:
        self._db = db
        self._policies = policies
        self._frames = frames

    def list(self, query: EpisodeQuery, limit: int | None, newest_first: bool) -> list[EpisodeSummary]:
        """Summaries of the matching episodes, oldest first (at most ``limit``; ``newest_first`` reverses)."""
        order = Episode.id.desc() if newest_first else Episode.id
        select = select_episodes(query).order_by(order).limit(limit)
        with self._db.read_session() as session:
            return [_summary(episode, version) for episode, version in session.execute(select)]

    def count(self, query: EpisodeQuery) -> int:
        """Number of matching episodes."""
        return self._count(sa.select(sa.func.count()).select_from(select_episodes(query).subquery()))

    def count_steps(self, query: EpisodeQuery) -> int:
        """Total length (env steps) of the matching episodes."""
        matched = select_episodes(query).subquery()
        return self._count(sa.select(sa.func.coalesce(sa.func.sum(matched.c.length), 0)))

    def injected_fractions(self, query: EpisodeQuery) -> dict[uuid.UUID, float]:
        """Per matching episode, the fraction of its steps marked ``injected`` (0.0 for a clean episode)."""
        matched = select_episodes(query).subquery()
        select = (
            sa.select(matched.c.uuid, matched.c.length, sa.func.count(Step.injected))
            .select_from(matched.outerjoin(Step, Step.episode_id == matched.c.id))
            .group_by(matched.c.id, matched.c.uuid, matched.c.length)
        )
        with self._db.read_session() as session:
            return {
                episode: injected / max(length, 1) for episode, length, injected in session.execute(select)
            }

    def _count(self, select: sa.Select) -> int:
        with self._db.read_session() as session:
            return int(session.scalar(select) or 0)

    def load(self, episode_uuid: uuid.UUID, images: bool) -> EpisodeRecord:
        """The stored episode (frames decoded if ``images``); ``NotFoundError`` if there is none."""
        episodes, versions = Episode.__table__, PolicyVersion.__table__
        select = (
            sa.select(episodes, versions.c.version.label("policy_version"))
            .select_from(episodes.outerjoin(versions, episodes.c.policy_version_id == versions.c.id))
            .where(episodes.c.uuid == episode_uuid)
        )
        with self._db.read_engine.connect() as connection:
            row = connection.execute(select).one_or_none()
            if row is None:
                raise NotFoundError(f"episode {episode_uuid}: not in the store at {self._db.safe_url()}")
            return self._assemble(connection, row, images)

    def _assemble(self, connection: sa.Connection, episode: sa.Row[Any], images: bool) -> EpisodeRecord:
        """An episode from its ``episodes`` row (Core row, with ``policy_version``) and its step rows."""
        rows = self._db.raw_rows(connection, STEPS_OF_EPISODE, (episode.id,))
        columns = transpose(rows, len(STEP_READ_COLUMNS))
        arrays = arrays_from_columns(episode, columns[: len(ARRAY_COLUMNS)])
        version_ids, chunk_index, chunk_offset, latency, subtasks, injected = columns[len(ARRAY_COLUMNS) :]
        chunks, references = transpose(self._db.raw_rows(connection, CHUNKS_OF_EPISODE, (episode.id,)), 2)
        segments = self._db.raw_rows(connection, INTERVENTIONS_OF_EPISODE, (episode.id,))
        return EpisodeRecord(
            **_header(episode, episode.policy_version),
            states=arrays.states,
            actions=arrays.actions,
            rewards=arrays.rewards,
            terminated=arrays.terminated,
            truncated=arrays.truncated,
            sources=arrays.sources,
            policy_versions=self._policies.names_of(version_ids),
            chunk_ids=np.array([-1 if c is None else c for c in chunk_index], dtype=np.int32),
            chunk_offsets=np.array(chunk_offset, dtype=np.int32),
            latency_ms=np.array(latency, dtype=np.float32),
            chunks=_chunk_array(chunks, episode.chunk_horizon, episode.action_dim),
            reference_chunks=(
                _chunk_array(references, episode.chunk_horizon, episode.action_dim)
                if references and references[0] is not None
                else None
            ),
            images=self._frames.of_episode(connection, episode.id, episode.length) if images else {},
            privileged=arrays.privileged,
            interventions=[InterventionSegment(*segment) for segment in segments],
            metadata=episode.metadata,
            subtasks=list(subtasks) if any(s is not None for s in subtasks) else None,
            injected=list(injected) if any(s is not None for s in injected) else None,
            final_observation=_final_observation(episode.final_observation, images),
        )


def select_episodes(query: EpisodeQuery) -> sa.Select[Any]:
    """``SELECT`` of (``Episode``, policy version name) for the episodes ``query`` matches (each tuple of values an
    ``IN`` clause; ``max_per_task`` a row number per task, oldest first)."""
    select = sa.select(Episode, PolicyVersion.version).outerjoin(
        PolicyVersion, Episode.policy_version_id == PolicyVersion.id
    )
    if query.tasks is not None:
        select = select.where(Episode.task.in_(query.tasks))
    if query.outcomes is not None:
        select = select.where(Episode.outcome.in_([outcome.value for outcome in query.outcomes]))
    if query.policy_versions is not None:
        select = select.where(PolicyVersion.version.in_(query.policy_versions))
    if query.run_ids is not None:
        select = select.where(Episode.run_id.in_(query.run_ids))
    if query.max_per_task is not None:
        rank = sa.func.row_number().over(partition_by=Episode.task, order_by=Episode.id)
        ranked = select.with_only_columns(Episode.id, rank.label("rank")).subquery()
        first = sa.select(ranked.c.id).where(ranked.c.rank <= query.max_per_task)
        select = select.where(Episode.id.in_(first))
    return select


def transpose(rows: list[Any], width: int) -> list[tuple[Any, ...]]:
    """Transpose rows into ``width`` column tuples (empty tuples when there are no rows)."""
    return list(zip(*rows, strict=True)) if rows else [()] * width


def arrays_from_columns(episode: Episode | sa.Row[Any], columns: list[tuple[Any, ...]]) -> StepArrays:
    """Per-step arrays from the ``ARRAY_COLUMNS`` columns (state, action, privileged, reward, …, source)."""
    state, action, privileged, reward, terminated, truncated, source = columns
    length = len(reward)
    return StepArrays(
        states=codec.vectors_from_blobs(list(state), length, episode.state_dim),
        actions=codec.vectors_from_blobs(list(action), length, episode.action_dim),
        rewards=np.array(reward, dtype=np.float32),
        terminated=np.array(terminated, dtype=bool),
        truncated=np.array(truncated, dtype=bool),
        sources=np.array(source, dtype=np.uint8),
        privileged=(
            None
            if episode.privileged_dim is None
            else codec.vectors_from_blobs(list(privileged), length, episode.privileged_dim)
        ),
    )


def _chunk_array(blobs: list[bytes], horizon: int, action_dim: int) -> np.ndarray:
    """K×H×D float32 chunks from their per-chunk blobs."""
    return codec.vectors_from_blobs(blobs, len(blobs), horizon * action_dim).reshape(
        len(blobs), horizon, action_dim
    )


def _final_observation(data: bytes | None, images: bool) -> Observation | None:
    """The stored final observation (None for an episode without one); its frames only with ``images``, as the
    steps' frames."""
    if data is None:
        return None
    observation = codec.decode_observation(data)
    if not images:
        observation["images"] = {}
    return observation


def _summary(episode: Episode, version: str | None) -> EpisodeSummary:
    return EpisodeSummary(
        **_header(episode, version),
        length=episode.length,
        total_reward=episode.total_reward,
        human_steps=episode.human_steps,
        metadata=episode.metadata_,
        created_at=as_utc(episode.created_at),
    )


def _header(episode: Episode | sa.Row[Any], policy_version: str | None) -> dict[str, Any]:
    """The fields an ``EpisodeRecord`` and an ``EpisodeSummary`` share, from an ``episodes`` row."""
    return {
        "uuid": episode.uuid,
        "task": episode.task,
        "env_id": episode.env_id,
        "policy_version": policy_version,
        "seed": episode.seed,
        "outcome": Outcome(episode.outcome),
        "run_id": episode.run_id,
        "error": episode.error,
        "prompt": episode.prompt,
    }
