"""Content-addressed frames: each distinct image is hashed, compressed and stored once; steps refer to it.

Hashing and compression happen before the write transaction (``prepare``); inside it, new frames are
inserted-or-ignored (another writer may have stored the same frame meanwhile) and every step gets its refs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from storage import codec
from storage.database import Database, batches
from storage.errors import StoreError
from storage.records import EpisodeRecord
from storage.schema import Episode, Image, StepImage

Frames = dict[tuple[int, int, str], np.ndarray]


@dataclass
class PreparedFrames:
    """An episode's frames ready to write: per-camera hashes by step, and rows of frames not yet stored."""

    hashes: dict[str, list[str]]
    new_rows: list[tuple[Any, ...]]


class FrameStore:
    """Reads and writes the ``images`` and ``step_images`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def prepare(self, record: EpisodeRecord) -> PreparedFrames:
        """Hash every frame and compress the distinct ones the store does not hold yet (no transaction)."""
        hashes: dict[str, list[str]] = {}
        unique: dict[str, np.ndarray] = {}
        for camera in sorted(record.images):
            hashes[camera] = []
            for frame in record.images[camera]:
                digest = codec.image_hash(frame)
                hashes[camera].append(digest)
                unique.setdefault(digest, frame)
        stored = self._existing(list(unique))
        missing = [(digest, frame) for digest, frame in sorted(unique.items()) if digest not in stored]
        encoded = codec.encode_images([frame for _, frame in missing])
        new_rows = [
            (digest, codec.IMAGE_CODEC, *frame.shape, data)
            for (digest, frame), data in zip(missing, encoded, strict=True)
        ]
        return PreparedFrames(hashes, new_rows)

    def write(self, connection: sa.Connection, episode_id: int, frames: PreparedFrames) -> None:
        """Inside the episode's transaction: new frames (insert-or-ignore) and the step → frame refs."""
        if frames.new_rows:
            self._db.bulk_insert(connection, Image, frames.new_rows, skip_existing=True)
        refs = [
            (episode_id, t, camera, digest)
            for camera, hashes in frames.hashes.items()
            for t, digest in enumerate(hashes)
        ]
        if refs:
            self._db.bulk_insert(connection, StepImage, refs)

    def of_episode(self, connection: sa.Connection, episode_id: int, length: int) -> dict[str, np.ndarray]:
        """Camera → T×h×w×3 frames of one episode (each distinct frame decoded once)."""
        rows = connection.execute(
            _frames_select(StepImage.camera, StepImage.image_hash)
            .where(StepImage.episode_id == episode_id)
            .order_by(StepImage.camera, StepImage.t)
        ).all()
        decoded: dict[str, np.ndarray] = {}
        frames: dict[str, list[np.ndarray]] = {}
        for camera, digest, *image in rows:
            if digest not in decoded:
                decoded[digest] = _decode(*image)
            frames.setdefault(camera, []).append(decoded[digest])
        images = {camera: np.stack(stack) for camera, stack in frames.items()}
        for camera, stack in images.items():
            if len(stack) != length:
                raise StoreError(
                    f"episode {episode_id}: camera {camera!r} has {len(stack)} frames, expected {length}"
                )
        return images

    def of_steps(self, steps: list[tuple[int, int]]) -> Frames:
        """(episode id, t, camera) → frame for the given (episode id, t) steps."""
        frames: Frames = {}
        with self._db.read_session() as session:
            for batch in batches(steps, 400):
                rows = session.execute(
                    _frames_select(StepImage.episode_id, StepImage.t, StepImage.camera).where(
                        sa.tuple_(StepImage.episode_id, StepImage.t).in_(batch)
                    )
                ).all()
                for episode_id, t, camera, *image in rows:
                    frames[(episode_id, t, camera)] = _decode(*image)
        return frames

    def frame_shapes(self, episode_uuids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, tuple[int, int]]]:
        """Episode → camera → (height, width) of its first frame; episodes without frames are left out.

        Every frame of an episode's camera has one shape, so the first step's frames describe the episode.
        """
        shapes: dict[uuid.UUID, dict[str, tuple[int, int]]] = {}
        with self._db.read_session() as session:
            for batch in batches(episode_uuids, 400):
                rows = session.execute(
                    sa.select(Episode.uuid, StepImage.camera, Image.height, Image.width)
                    .join(StepImage, StepImage.episode_id == Episode.id)
                    .join(Image, StepImage.image_hash == Image.hash)
                    .where(StepImage.t == 0, Episode.uuid.in_(batch))
                ).all()
                for episode, camera, height, width in rows:
                    shapes.setdefault(episode, {})[camera] = (height, width)
        return shapes

    def _existing(self, hashes: list[str]) -> set[str]:
        """The subset of ``hashes`` already stored."""
        found: set[str] = set()
        if not hashes:
            return found
        with self._db.read_session() as session:
            for batch in batches(hashes, 900):
                found.update(session.scalars(sa.select(Image.hash).where(Image.hash.in_(batch))))
        return found


def _frames_select(*keys: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """``keys`` followed by (codec, height, width, channels, data) of each step's frame."""
    return (
        sa.select(*keys)
        .add_columns(Image.codec, Image.height, Image.width, Image.channels, Image.data)
        .join(Image, StepImage.image_hash == Image.hash)
    )


def _decode(image_codec: str, height: int, width: int, channels: int, data: bytes) -> np.ndarray:
    return codec.decode_image(image_codec, data, (height, width, channels))
