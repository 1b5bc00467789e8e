"""Export stored episodes to other ecosystems' dataset formats.

``lerobot``: LeRobot's v2.1 on-disk layout — ``meta/info.json``, ``meta/tasks.jsonl``, ``meta/episodes.jsonl``,
``meta/episodes_stats.jsonl`` and one parquet file per episode under ``data/chunk-000/`` with camera frames as
image features (PNG bytes in a ``{bytes, path}`` struct, as Hugging Face ``datasets`` writes them).
``minari``: a Minari dataset written by ``minari.create_dataset_from_buffers`` (HDF5), loadable with
``minari.load_dataset``; Minari episodes carry T+1 observations, so the last observation is repeated.

Both carry per-step actions, rewards, the intervention flag (1 = human) and, when a relabel is selected, the
RECAP value, advantage and indicator of each step.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field

from envs.tasks import task_prompt
from experiments.paths import check_writable_folder
from storage import EpisodeLabels, EpisodeRecord, ExperienceStore, Outcome

LEROBOT_VERSION = "v2.1"
CHUNK_SIZE = 1000


class ExportError(ValueError):
    """The selection is empty, mixes incompatible episodes, or the destination exists."""


class ExportConfig(BaseModel):
    """Which episodes to export, how, and where."""

    model_config = ConfigDict(extra="forbid")

    store_url: str
    output: Path
    format: Literal["lerobot", "minari"]
    tasks: list[str] | None = None
    run_ids: list[str] | None = None
    outcome: Literal["success", "failure", "truncated"] | None = None
    limit: int | None = Field(default=None, ge=1)
    relabel_id: str | None = None
    fps: int = Field(default=10, ge=1)
    dataset_id: str = Field(default="flywheel/export-v0", pattern=r"^([\w-]+/)?[\w-]+-v\d+$")


def select_episodes(store: ExperienceStore, config: ExportConfig) -> Iterator[EpisodeRecord]:
    """The selected episodes with images, oldest first (at most ``limit``)."""
    count = 0
    for task in config.tasks or [None]:
        for run_id in config.run_ids or [None]:
            for summary in store.list_episodes(task=task, run_id=run_id, outcome=config.outcome):
                if summary.outcome == Outcome.ERROR or summary.length == 0:
                    continue
                if config.limit is not None and count >= config.limit:
                    return
                count += 1
                yield store.load_episode(summary.uuid, images=True)


def export_episodes(config: ExportConfig) -> dict:
    """Write the selection to ``config.output``; returns a summary (episodes, frames, path)."""
    check_writable_folder(config.output, "--output")
    if config.output.exists() and any(config.output.iterdir()):
        raise ExportError(f"--output: {config.output} exists and is not empty")
    store = ExperienceStore(config.store_url)
    labels = _labels(store, config.relabel_id)
    episodes = select_episodes(store, config)
    if config.format == "lerobot":
        return export_lerobot(episodes, labels, config)
    return export_minari(episodes, labels, config)


def _labels(store: ExperienceStore, relabel_id: str | None) -> dict:
    if relabel_id is None:
        return {}
    return {labels.episode_uuid: labels for labels in store.load_relabel(relabel_id).labels}


def _step_columns(episode: EpisodeRecord, labels: EpisodeLabels | None) -> dict[str, np.ndarray]:
    columns = {
        "action": episode.actions.astype(np.float32),
        "observation.state": episode.states.astype(np.float32),
        "next.reward": episode.rewards.astype(np.float32),
        "next.done": np.arange(episode.length) == episode.length - 1,
        "intervention": episode.sources.astype(np.int64),
    }
    if labels is not None:
        columns |= {
            "value": labels.values.astype(np.float32),
            "advantage": labels.advantages.astype(np.float32),
            "advantage_positive": labels.indicators.astype(bool),
        }
    return columns


# ---- LeRobot ----


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _feature(array: np.ndarray) -> dict:
    dtype = "bool" if array.dtype == bool else str(array.dtype)
    shape = list(array.shape[1:]) or [1]
    return {"dtype": dtype, "shape": shape, "names": None}


def _stats(array: np.ndarray) -> dict:
    values = array.reshape(len(array), -1).astype(np.float64)
    return {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [len(array)],
    }


def export_lerobot(episodes: Iterator[EpisodeRecord], labels: dict, config: ExportConfig) -> dict:
    """Write LeRobot v2.1 parquet + metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = config.output
    (root / "meta").mkdir(parents=True, exist_ok=True)
    tasks: dict[str, int] = {}
    features: dict | None = None
    frames = 0
    episode_rows, stats_rows = [], []
    for index, episode in enumerate(episodes):
        prompt = task_prompt(episode.task)
        task_index = tasks.setdefault(prompt, len(tasks))
        columns = _step_columns(episode, labels.get(episode.uuid))
        steps = np.arange(episode.length)
        scalars = {
            "timestamp": (steps / config.fps).astype(np.float32),
            "frame_index": steps.astype(np.int64),
            "episode_index": np.full(episode.length, index, np.int64),
            "index": (frames + steps).astype(np.int64),
            "task_index": np.full(episode.length, task_index, np.int64),
        }
        table = {
            name: pa.array(list(values) if values.ndim > 1 else values) for name, values in columns.items()
        }
        table |= {name: pa.array(values) for name, values in scalars.items()}
        for camera, images in episode.images.items():
            table[f"observation.images.{camera}"] = pa.array(
                [{"bytes": _png(frame), "path": None} for frame in images],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            )
        episode_features = {name: _feature(values) for name, values in (columns | scalars).items()}
        episode_features |= {
            f"observation.images.{camera}": {
                "dtype": "image",
                "shape": list(images.shape[1:]),
                "names": ["height", "width", "channel"],
            }
            for camera, images in episode.images.items()
        }
        if features is None:
            features = episode_features
        elif features != episode_features:
            raise ExportError(
                f"episode {episode.uuid} has different features; export one task/camera set at a time"
            )
        path = root / "data" / f"chunk-{index // CHUNK_SIZE:03d}" / f"episode_{index:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), path)
        frames += episode.length
        episode_rows.append(
            {
                "episode_index": index,
                "tasks": [prompt],
                "length": episode.length,
                "flywheel_uuid": str(episode.uuid),
                "outcome": episode.outcome.value,
                "policy_version": episode.policy_version,
            }
        )
        episode_stats = {name: _stats(values) for name, values in (columns | scalars).items()}
        for camera, images in episode.images.items():
            pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
            episode_stats[f"observation.images.{camera}"] = {
                key: [[[value]] for value in values]
                for key, values in {
                    "min": pixels.min(0),
                    "max": pixels.max(0),
                    "mean": pixels.mean(0),
                    "std": pixels.std(0),
                }.items()
            } | {"count": [len(images)]}
        stats_rows.append({"episode_index": index, "stats": episode_stats})
    if features is None:
        raise ExportError("no stored episodes match the selection")
    info = {
        "codebase_version": LEROBOT_VERSION,
        "robot_type": "sawyer",
        "total_episodes": len(episode_rows),
        "total_frames": frames,
        "total_tasks": len(tasks),
        "total_videos": 0,
        "total_chunks": (len(episode_rows) - 1) // CHUNK_SIZE + 1,
        "chunks_size": CHUNK_SIZE,
        "fps": config.fps,
        "splits": {"train": f"0:{len(episode_rows)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": None,
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    _write_jsonl(root / "meta" / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in tasks.items()])
    _write_jsonl(root / "meta" / "episodes.jsonl", episode_rows)
    _write_jsonl(root / "meta" / "episodes_stats.jsonl", stats_rows)
    return {"format": "lerobot", "episodes": len(episode_rows), "frames": frames, "path": str(root)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---- Minari ----


def export_minari(episodes: Iterator[EpisodeRecord], labels: dict, config: ExportConfig) -> dict:
    """Write a Minari (HDF5) dataset under ``config.output`` (``MINARI_DATASETS_PATH`` points there)."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers: list[EpisodeBuffer] = []
    frames = 0
    spaces: tuple | None = None
    for index, episode in enumerate(episodes):
        observations = {"state": _with_final(episode.states.astype(np.float32))}
        observations |= {camera: _with_final(images) for camera, images in episode.images.items()}
        columns = _step_columns(episode, labels.get(episode.uuid))
        infos = {
            name: _with_final(values)
            for name, values in columns.items()
            if name not in ("action", "observation.state", "next.reward", "next.done")
        }
        buffers.append(
            EpisodeBuffer(
                id=index,
                seed=episode.seed,
                observations=observations,
                actions=episode.actions.astype(np.float32),
                rewards=list(episode.rewards.astype(np.float64)),
                terminations=list(episode.terminated),
                truncations=list(episode.truncated),
                infos=infos,
            )
        )
        frames += episode.length
        if spaces is None:
            spaces = (
                gym.spaces.Box(-1.0, 1.0, episode.actions.shape[1:], np.float32),
                gym.spaces.Dict(
                    {
                        "state": gym.spaces.Box(-np.inf, np.inf, episode.states.shape[1:], np.float32),
                        **{
                            camera: gym.spaces.Box(0, 255, images.shape[1:], np.uint8)
                            for camera, images in episode.images.items()
                        },
                    }
                ),
            )
    if spaces is None:
        raise ExportError("no stored episodes match the selection")
    config.output.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(config.output.resolve())
    try:
        minari.create_dataset_from_buffers(
            config.dataset_id,
            buffers,
            action_space=spaces[0],
            observation_space=spaces[1],
            algorithm_name="flywheel",
            description="Episodes exported from a flywheel experience store",
            data_format="hdf5",
            jpeg_encoding=False,
        )
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return {
        "format": "minari",
        "episodes": len(buffers),
        "frames": frames,
        "path": str(config.output),
        "dataset_id": config.dataset_id,
    }


def _with_final(values: np.ndarray) -> np.ndarray:
    """T step values → T+1 (Minari's observations include the final one; the last step is repeated)."""
    return np.concatenate([values, values[-1:]], axis=0)
