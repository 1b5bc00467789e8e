"""Episode writes: all CPU work (validation, hashing, compression) first, then one bulk-insert transaction.

``INSERT … ON CONFLICT (uuid) DO NOTHING RETURNING id`` makes a write idempotent: a UUID already stored with
the same content hash is a no-op, with a different one an ``EpisodeConflictError`` that rolls back. A crash
leaves either the whole episode or nothing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from storage import codec
from storage.database import Database
from storage.errors import EpisodeConflictError, RunFullError
from storage.images import FrameStore, PreparedFrames
from storage.records import EpisodeRecord, Outcome
from storage.registry import PolicyRegistry, RunRegistry
from storage.schema import Chunk, Episode, Intervention, Step


@dataclass
class _PreparedEpisode:
    """Everything computed before the write transaction starts."""

    record: EpisodeRecord
    content_hash: str
    frames: PreparedFrames


class EpisodeWriter:
    """Writes whole episodes; keeps one connection per process open between episodes."""

    def __init__(self, db: Database, policies: PolicyRegistry, runs: RunRegistry, frames: FrameStore) -> None:
        self._db = db
        self._policies = policies
        self._runs = runs
        self._frames = frames
        self._insert_new_episode = (
            db.insert(Episode)
            .on_conflict_do_nothing(index_elements=["uuid"])
            .returning(Episode.__table__.c.id)
        )
        self._connection: tuple[int, sa.Connection] | None = None

    def write(self, record: EpisodeRecord, max_run_episodes: int | None = None) -> bool:
        """Store ``record`` atomically; True if inserted, False if the identical episode was already stored.

        With ``max_run_episodes`` the episode is only inserted while its run holds fewer episodes than that
        (``RunFullError`` otherwise); the count and the insert happen under the run's lock.
        """
        record.validate()
        version_ids = self._policies.ids_for(record)
        frames = self._frames.prepare(record)
        prepared = _PreparedEpisode(record, codec.content_hash(record, frames.hashes), frames)
        connection = self._writer_connection()
        with connection.begin():
            if max_run_episodes is not None:
                self._check_room(connection, record, max_run_episodes)
            if self._insert(connection, prepared, version_ids):
                return True
            stored = connection.scalar(sa.select(Episode.content_hash).where(Episode.uuid == record.uuid))
            assert stored is not None
            return _already_stored(record.uuid, stored, prepared.content_hash)  # a conflict rolls back

    def close(self) -> None:
        """Close this process's writer connection (a forked child's inherited one is left alone)."""
        if self._connection is not None and self._connection[0] == os.getpid():
            self._connection[1].close()
        self._connection = None

    def _writer_connection(self) -> sa.Connection:
        """This process's connection for episode writes, kept open between episodes (reopened after a fork)."""
        if (
            self._connection is None
            or self._connection[0] != os.getpid()
            or self._connection[1].closed
            or self._connection[1].invalidated
        ):
            self._connection = (os.getpid(), self._db.write_engine.connect())
        return self._connection[1]

    def _check_room(self, connection: sa.Connection, record: EpisodeRecord, limit: int) -> None:
        """Lock the record's run; ``RunFullError`` if it already holds ``limit`` episodes, this one not among them."""
        if record.run_id is None:
            raise ValueError("max_run_episodes: the episode names no run_id to count against")
        self._runs.lock(connection, record.run_id)
        stored = connection.scalar(
            sa.select(sa.func.count()).select_from(Episode).where(Episode.run_id == record.run_id)
        )
        if stored < limit:
            return
        if connection.scalar(sa.select(Episode.id).where(Episode.uuid == record.uuid)) is None:
            raise RunFullError(
                f"run {record.run_id}: already holds {stored} episodes (target {limit}); "
                f"episode {record.uuid} was not stored"
            )

    def _insert(
        self, connection: sa.Connection, prepared: _PreparedEpisode, version_ids: dict[str, int]
    ) -> bool:
        """Insert all rows of the episode; False (and nothing inserted) if its UUID is already stored."""
        record = prepared.record
        self._runs.ensure(connection, record.run_id)
        episode_id = connection.execute(
            self._insert_new_episode, _episode_row(prepared, version_ids)
        ).scalar_one_or_none()
        if episode_id is None:
            return False
        if len(record.chunks):
            self._db.bulk_insert(connection, Chunk, _chunk_rows(record, episode_id))
        if record.length:
            self._db.bulk_insert(connection, Step, _step_rows(record, episode_id, version_ids))
        self._frames.write(connection, episode_id, prepared.frames)
        if record.interventions:
            segments = [
                (episode_id, i, s.t_start, s.t_end, s.trigger) for i, s in enumerate(record.interventions)
            ]
            self._db.bulk_insert(connection, Intervention, segments)
        return True


def _already_stored(episode_uuid: uuid.UUID, stored_hash: str, new_hash: str) -> bool:
    """False (nothing to write) if the stored episode is identical; ``EpisodeConflictError`` otherwise."""
    if stored_hash != new_hash:
        raise EpisodeConflictError(
            f"episode {episode_uuid}: already stored with different content "
            f"(stored hash {stored_hash[:12]}…, new {new_hash[:12]}…); use a new UUID"
        )
    return False


def _episode_row(prepared: _PreparedEpisode, version_ids: dict[str, int]) -> dict[str, Any]:
    """The ``episodes`` row, keyed by column name."""
    record = prepared.record
    return {
        "uuid": record.uuid,
        "run_id": record.run_id,
        "task": record.task,
        "env_id": record.env_id,
        "policy_version_id": version_ids.get(record.policy_version) if record.policy_version else None,
        "seed": record.seed,
        "outcome": Outcome(record.outcome).value,
        "length": record.length,
        "total_reward": float(record.rewards.astype(np.float64).sum()),
        "human_steps": int(np.count_nonzero(record.sources)),
        "state_dim": int(record.states.shape[1]),
        "action_dim": int(record.actions.shape[1]),
        "privileged_dim": None if record.privileged is None else int(record.privileged.shape[1]),
        "chunk_horizon": int(record.chunks.shape[1]),
        "error": record.error,
        "prompt": record.prompt,
        "metadata": record.metadata,
        "content_hash": prepared.content_hash,
        "final_observation": (
            None if record.final_observation is None else codec.encode_observation(record.final_observation)
        ),
    }


def _step_rows(record: EpisodeRecord, episode_id: int, version_ids: dict[str, int]) -> list[tuple[Any, ...]]:
    """One tuple per step, in the column order of the ``steps`` table."""
    steps = record.length
    privileged = (
        codec.blobs_from_vectors(record.privileged) if record.privileged is not None else [None] * steps
    )
    subtasks = record.subtasks if record.subtasks is not None else [None] * steps
    injected = record.injected if record.injected is not None else [None] * steps
    return list(
        zip(
            [episode_id] * steps,
            range(steps),
            codec.blobs_from_vectors(record.states),
            codec.blobs_from_vectors(record.actions),
            privileged,
            record.rewards.tolist(),
            record.terminated.tolist(),
            record.truncated.tolist(),
            record.sources.tolist(),
            list(map(version_ids.get, record.policy_versions)),  # None stays None
            [None if c < 0 else c for c in record.chunk_ids.tolist()],
            record.chunk_offsets.tolist(),
            record.latency_ms.tolist(),
            subtasks,
            injected,
            strict=True,
        )
    )


def _chunk_rows(record: EpisodeRecord, episode_id: int) -> list[tuple[Any, ...]]:
    """One ``chunks`` row per predicted chunk: (episode, index, horizon, H×D float32 blob, reference blob)."""
    horizon = record.chunks.shape[1]
    blobs = codec.blobs_from_vectors(record.chunks.reshape(len(record.chunks), -1))
    references: list[bytes | None] = [None] * len(blobs)
    if record.reference_chunks is not None:
        references = codec.blobs_from_vectors(record.reference_chunks.reshape(len(blobs), -1))
    return [
        (episode_id, i, horizon, blob, reference)
        for i, (blob, reference) in enumerate(zip(blobs, references, strict=True))
    ]
