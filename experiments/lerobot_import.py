"""Bring a LeRobot dataset (a local v2.0/v2.1/v3.0 folder) into the experience store as demonstrations.

Each LeRobot episode becomes one ``EpisodeRecord``: ``observation.state`` → states, ``action`` → actions,
``next.reward`` → rewards (0 where absent), each camera feature (``observation.images.<name>`` → camera
``<name>``; images decoded with PIL, videos with PyAV) → images, optionally resized to a square side; the
episode's task text → ``prompt``. Steps are ``StepSource.HUMAN`` (teleoperated demonstrations) unless the
dataset carries flywheel's ``intervention`` column (an exported flywheel dataset keeps who acted). The outcome
is the dataset's own (flywheel's ``outcome`` column, else ``next.success``), else ``ImportConfig.outcome``.

Provenance goes into the metadata: ``demonstration``, ``fps``, ``robot_type`` (which a LeRobot export reads
back) and ``source`` (format, path, repo id, codebase version, original episode index). Episode UUIDs are
derived from the repo id, task, run, original index and a hash of the episode's states, actions and frames,
so importing the same data again into the same task and run stores nothing new (``write_episode`` sees an
identical record) from wherever it is read; other data (or another run or task) gets other UUIDs.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field

from experiments.lerobot import LeRobotEpisode, LeRobotFormatError, LeRobotReader
from storage import (
    EpisodeConflictError,
    EpisodeRecord,
    EpisodeValidationError,
    ExperienceStore,
    Outcome,
    StepSource,
)

#: Namespace of imported episodes' UUIDs (uuid5 over the episode's identity).
IMPORT_NAMESPACE = uuid.UUID("6f1c7a52-3b0e-4f7e-9a7d-1e5b2c9d4a10")
CAMERA_PREFIXES = ("observation.images.", "observation.")


class ImportConfig(BaseModel):
    """Which LeRobot dataset to import, into which store, and how to map it."""

    model_config = ConfigDict(extra="forbid")

    store_url: str
    source: Path = Field(description="the dataset folder (meta/, data/, videos/)")
    repo_id: str | None = Field(default=None, description="its Hub id, recorded as provenance")
    task: str | None = Field(
        default=None,
        description="store task name (default: an exported flywheel episode's, else the folder name)",
    )
    run_id: str | None = Field(
        default=None, description="run of the imported episodes (default: import-<folder>)"
    )
    outcome: Literal["success", "failure", "truncated"] = Field(
        default="success", description="outcome of episodes whose dataset records none"
    )
    state_key: str = "observation.state"
    action_key: str = "action"
    image_size: int | None = Field(default=None, ge=16, description="resize frames to this square side")
    limit: int | None = Field(default=None, ge=1)


def import_lerobot(config: ImportConfig) -> dict[str, Any]:
    """Import the dataset; returns a summary (``episodes`` new, ``duplicates`` already stored, ``frames``,
    ``tasks``, ``run_id``, ``version``). Raises ``LeRobotFormatError`` (one line) on a malformed dataset."""
    reader = LeRobotReader(config.source)
    for key in (config.state_key, config.action_key):
        if key not in reader.features:
            raise LeRobotFormatError(
                f"{config.source}: no {key!r} feature (features: {', '.join(sorted(reader.features))})"
            )
    store = ExperienceStore(config.store_url)
    store.upgrade()
    folder = _slug(config.source.resolve().name) or "lerobot"
    run_id = config.run_id or f"import-{folder}"
    store.register_run(
        run_id, name=f"LeRobot import of {config.source}", config=config.model_dump(mode="json")
    )
    new = duplicates = frames = 0
    tasks: set[str] = set()
    for count, episode in enumerate(reader):
        if config.limit is not None and count >= config.limit:
            break
        task = config.task or str(episode.meta.get("flywheel_task") or folder)
        tasks.add(task)
        record = episode_record(episode, reader, config, task, run_id)
        try:
            inserted = store.write_episode(record)
        except EpisodeValidationError as error:
            raise LeRobotFormatError(f"episode {episode.index}: {error}") from None
        except EpisodeConflictError:
            raise LeRobotFormatError(
                f"episode {episode.index}: stored before as {record.uuid} with different content"
            ) from None
        new += int(inserted)
        duplicates += int(not inserted)
        frames += record.length if inserted else 0
    return {
        "episodes": new,
        "duplicates": duplicates,
        "frames": frames,
        "tasks": sorted(tasks),
        "run_id": run_id,
        "version": reader.version,
    }


def episode_record(
    episode: LeRobotEpisode, reader: LeRobotReader, config: ImportConfig, task: str, run_id: str
) -> EpisodeRecord:
    """One LeRobot episode as a store record (see the module docstring for the mapping)."""
    length = episode.length
    states = _matrix(episode, config.state_key)
    actions = _matrix(episode, config.action_key)
    columns = episode.columns
    rewards = columns.get("next.reward", np.zeros(length)).astype(np.float32).reshape(length)
    demonstration = "intervention" not in columns
    sources = (
        np.full(length, StepSource.HUMAN, np.uint8)
        if demonstration
        else columns["intervention"].astype(np.uint8).reshape(length)
    )
    outcome = _outcome(episode, config)
    terminated, truncated = np.zeros(length, bool), np.zeros(length, bool)
    if "next.terminated" in columns and "next.truncated" in columns:
        terminated = columns["next.terminated"].astype(bool).reshape(length)
        truncated = columns["next.truncated"].astype(bool).reshape(length)
    elif length:
        terminated[-1] = outcome == Outcome.SUCCESS
        truncated[-1] = outcome != Outcome.SUCCESS
    images = {_camera(key): _resize(frames, config.image_size) for key, frames in episode.frames.items()}
    record = EpisodeRecord(
        uuid=uuid.UUID(int=0),
        task=task,
        env_id=f"lerobot/{reader.info.get('robot_type') or 'unknown'}",
        policy_version=None,
        seed=None,
        outcome=outcome,
        states=states,
        actions=actions,
        rewards=rewards,
        terminated=terminated,
        truncated=truncated,
        sources=sources,
        policy_versions=[None] * length,
        chunk_ids=np.full(length, -1, np.int32),
        chunk_offsets=np.zeros(length, np.int32),
        latency_ms=np.zeros(length, np.float32),
        chunks=np.zeros((0, 1, actions.shape[1]), np.float32),
        images=images,
        metadata=_provenance(episode, reader, config),
        run_id=run_id,
        prompt=episode.tasks[0] if episode.tasks else None,
    )
    record.uuid = _episode_uuid(record, episode, config)
    return record


def _matrix(episode: LeRobotEpisode, key: str) -> np.ndarray:
    values = episode.columns.get(key)
    if values is None:
        raise LeRobotFormatError(f"episode {episode.index}: no {key!r} column in the data")
    matrix = np.asarray(values, dtype=np.float32).reshape(episode.length, -1)
    if not np.isfinite(matrix).all():
        raise LeRobotFormatError(f"episode {episode.index}: {key!r} has NaN or infinite values")
    return matrix


def _outcome(episode: LeRobotEpisode, config: ImportConfig) -> Outcome:
    recorded = episode.meta.get("outcome")
    if recorded in {o.value for o in Outcome} - {Outcome.ERROR.value}:
        return Outcome(recorded)
    success = episode.columns.get("next.success")
    if success is not None:
        return Outcome.SUCCESS if bool(np.asarray(success).any()) else Outcome.FAILURE
    return Outcome(config.outcome)


def _provenance(episode: LeRobotEpisode, reader: LeRobotReader, config: ImportConfig) -> dict[str, Any]:
    source = {
        "format": "lerobot",
        "path": str(config.source.resolve()),
        "repo_id": config.repo_id,
        "codebase_version": reader.version,
        "episode_index": episode.index,
    }
    for key in ("flywheel_uuid", "policy_version"):
        if episode.meta.get(key) is not None:
            source[key] = str(episode.meta[key])
    return {
        "demonstration": "intervention" not in episode.columns,
        "fps": reader.fps,
        "robot_type": reader.info.get("robot_type"),
        "source": source,
    }


def _episode_uuid(record: EpisodeRecord, episode: LeRobotEpisode, config: ImportConfig) -> uuid.UUID:
    """uuid5 of the import's identity (repo id, task, run, original index) and the episode's content."""
    content = hashlib.sha256(record.states.tobytes() + record.actions.tobytes())
    for camera in sorted(record.images):
        content.update(camera.encode() + record.images[camera].tobytes())
    identity = [config.repo_id, record.task, record.run_id, episode.index, content.hexdigest()]
    return uuid.uuid5(IMPORT_NAMESPACE, json.dumps(identity))


def _camera(key: str) -> str:
    for prefix in CAMERA_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :]
    return key


def _resize(frames: np.ndarray, side: int | None) -> np.ndarray:
    if side is None or frames.shape[1:3] == (side, side):
        return frames
    resized = [
        np.asarray(PILImage.fromarray(frame).resize((side, side), PILImage.Resampling.BILINEAR))
        for frame in frames
    ]
    return np.stack(resized).astype(np.uint8)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-")[:100]
