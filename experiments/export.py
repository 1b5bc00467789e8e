"""Export stored episodes to other ecosystems' dataset formats.

``lerobot``: LeRobot's current on-disk format, v3.0 (``experiments.lerobot``: ``meta/info.json``,
``meta/stats.json``, ``meta/tasks.parquet``, ``meta/episodes/…``, ``data/chunk-*/file-*.parquet``, cameras as PNG
images in the data files or, with ``video``, ``videos/<key>/chunk-*/file-*.mp4``); fps and robot type come from
the episodes; a selection whose episodes store different cameras or image sizes is refused with the sets it
mixes, or with ``split`` written as one dataset per set.
``minari``: a Minari dataset written by ``minari.create_dataset_from_buffers`` (HDF5), loadable with
``minari.load_dataset``; Minari episodes carry T+1 observations, so the last observation is repeated. The dataset
carries the episodes' env spec (``envs.registration``, Minari's flat observation layout), so
``dataset.recover_environment()`` rebuilds the env, and per-step infos ``success`` (True on the final row of a
successful episode) and ``prompt``.

Both carry per-step actions, rewards, the intervention flag (1 = human) and, when a relabel is selected, the
RECAP value, advantage and indicator of each step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.types import LEARNABLE_OUTCOMES
from envs.tasks import UnknownTaskError, episode_prompt, resolve_task
from experiments.lerobot import LeRobotFormatError, LeRobotWriter
from experiments.paths import check_writable_folder
from storage import EpisodeLabels, EpisodeQuery, EpisodeRecord, EpisodeSummary, ExperienceStore, Outcome

#: LeRobot's name for camera features: ``observation.images.<camera>``.
CAMERA_PREFIX = "observation.images."
#: Meta-World's simulator step rate (frame_skip 5 × 2.5 ms): the frame rate of its episodes.
METAWORLD_FPS = 80


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
    fps: int | None = Field(default=None, ge=1, description="LeRobot frame rate (default: the episodes')")
    video: bool = Field(default=False, description="LeRobot cameras as mp4 videos (default: PNG images)")
    split: bool = Field(default=False, description="LeRobot: one dataset per camera/image-size set")
    dataset_id: str = Field(default="flywheel/export-v0", pattern=r"^([\w-]+/)?[\w-]+-v\d+$")


def select_summaries(store: ExperienceStore, config: ExportConfig) -> list[EpisodeSummary]:
    """The selected episodes' index rows, oldest first (at most ``limit``; no per-step data read)."""
    query = EpisodeQuery(
        tasks=config.tasks or None,
        run_ids=config.run_ids or None,
        outcomes=[config.outcome] if config.outcome else LEARNABLE_OUTCOMES,
    )
    selected = [summary for summary in store.find_episodes(query) if summary.length > 0]
    return selected[: config.limit]


def select_episodes(store: ExperienceStore, config: ExportConfig) -> Iterator[EpisodeRecord]:
    """The selected episodes with images, oldest first (at most ``limit``)."""
    for summary in select_summaries(store, config):
        yield store.load_episode(summary.uuid, images=True)


def feature_sets(store: ExperienceStore, summaries: list[EpisodeSummary]) -> dict[str, list[EpisodeSummary]]:
    """The selection grouped by what its episodes store as images, each named ``<cameras and sizes>``
    (e.g. ``corner2-96x96``; ``no-images``), read from the store's frame index."""
    shapes = store.frame_shapes([summary.uuid for summary in summaries])
    groups: dict[str, list[EpisodeSummary]] = {}
    for summary in summaries:
        layout = sorted(shapes.get(summary.uuid, {}).items())
        name = "-".join(f"{camera}-{h}x{w}" for camera, (h, w) in layout) or "no-images"
        groups.setdefault(re.sub(r"[^\w.-]+", "_", name), []).append(summary)
    return groups


def export_episodes(config: ExportConfig) -> dict:
    """Write the selection to ``config.output``; returns a summary (episodes, frames, path; with ``split``,
    ``datasets``: one summary per feature set, each in ``<output>/<set name>``)."""
    check_writable_folder(config.output, "--output")
    if config.output.exists() and any(config.output.iterdir()):
        raise ExportError(f"--output: {config.output} exists and is not empty")
    store = ExperienceStore(config.store_url)
    labels = _labels(store, config.relabel_id)
    if config.format == "minari":
        return export_minari(select_episodes(store, config), labels, config)
    summaries = select_summaries(store, config)
    if not summaries:
        raise ExportError("no stored episodes match the selection")
    groups = feature_sets(store, summaries)
    if len(groups) > 1 and not config.split:
        raise ExportError(_mixed_message(groups))
    if not config.split:
        return export_lerobot(_load(store, summaries), labels, config)
    written = [
        export_lerobot(
            _load(store, group), labels, config.model_copy(update={"output": config.output / name})
        )
        for name, group in groups.items()
    ]
    return {
        "format": "lerobot",
        "episodes": sum(d["episodes"] for d in written),
        "frames": sum(d["frames"] for d in written),
        "path": str(config.output),
        "datasets": written,
    }


def _load(store: ExperienceStore, summaries: list[EpisodeSummary]) -> Iterator[EpisodeRecord]:
    for summary in summaries:
        yield store.load_episode(summary.uuid, images=True)


def _mixed_message(groups: dict[str, list[EpisodeSummary]]) -> str:
    """One line naming each feature set of a mixed selection (episodes, tasks, runs) and the ways out."""
    described = "; ".join(
        f"{name}: {len(group)} episodes of {', '.join(sorted({s.task for s in group}))} "
        f"in run(s) {', '.join(sorted({s.run_id or 'none' for s in group}))}"
        for name, group in groups.items()
    )
    return (
        f"the selection mixes {len(groups)} camera/image-size sets ({described}); a LeRobot dataset has one: "
        "pick one with --tasks/--runs, or --split to write one dataset per set into --output"
    )


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


def _prompt(episode: EpisodeRecord) -> str:
    """The episode's instruction: its stored prompt, else its Meta-World task's, else the task name."""
    return episode_prompt(episode.prompt or None, episode.task)


def _fps(episode: EpisodeRecord, config: ExportConfig) -> int:
    """Frames per second: ``--fps``, else the rate the episode records (an import's ``fps``, the robot
    runtime's ``rate_hz``), else the Meta-World simulator's step rate."""
    if config.fps is not None:
        return config.fps
    runtime = episode.metadata.get("robot_runtime")
    for rate in (episode.metadata.get("fps"), runtime.get("rate_hz") if isinstance(runtime, dict) else None):
        if isinstance(rate, int | float) and rate > 0:
            return round(rate)
    if _is_metaworld(episode.task):
        return METAWORLD_FPS
    raise ExportError(f"episode {episode.uuid} records no frame rate (task {episode.task!r}): give --fps")


def _robot_type(episode: EpisodeRecord) -> str | None:
    """The robot: the episode's recorded ``robot_type`` (an import's), else Sawyer for Meta-World tasks."""
    recorded = episode.metadata.get("robot_type")
    if isinstance(recorded, str) and recorded:
        return recorded
    return "sawyer" if _is_metaworld(episode.task) else None


def _is_metaworld(task: str) -> bool:
    try:
        resolve_task(task)
    except UnknownTaskError:
        return False
    return True


def export_lerobot(episodes: Iterator[EpisodeRecord], labels: dict, config: ExportConfig) -> dict:
    """Write the episodes as one LeRobot v3.0 dataset under ``config.output`` (``experiments.lerobot``)."""
    writer: LeRobotWriter | None = None
    try:
        for episode in episodes:
            if writer is None:
                writer = LeRobotWriter(
                    config.output, _fps(episode, config), _robot_type(episode), config.video
                )
            columns = _step_columns(episode, labels.get(episode.uuid))
            columns |= {"next.terminated": episode.terminated, "next.truncated": episode.truncated}
            frames = {f"{CAMERA_PREFIX}{camera}": images for camera, images in episode.images.items()}
            writer.add_episode(columns, frames, _prompt(episode), _provenance(episode))
        if writer is None:
            raise ExportError("no stored episodes match the selection")
        written = writer.close()
    except LeRobotFormatError as error:
        raise ExportError(f"{error}; export one task/camera set at a time (--tasks, --runs)") from None
    return {"format": "lerobot", **written, "path": str(config.output), "fps": writer.fps}


def _provenance(episode: EpisodeRecord) -> dict:
    """flywheel's columns of an episode's row in the LeRobot episodes table."""
    return {
        "flywheel_uuid": str(episode.uuid),
        "flywheel_task": episode.task,
        "outcome": episode.outcome.value,
        "policy_version": episode.policy_version,
        "run_id": episode.run_id,
    }


# ---- Minari ----


def export_minari(episodes: Iterator[EpisodeRecord], labels: dict, config: ExportConfig) -> dict:
    """Write a Minari (HDF5) dataset under ``config.output`` (``MINARI_DATASETS_PATH`` points there)."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers: list[EpisodeBuffer] = []
    frames = 0
    spaces: tuple | None = None
    specs: set[str | None] = set()
    for index, episode in enumerate(episodes):
        observations = {"state": _with_final(episode.states.astype(np.float32))}
        observations |= {camera: _with_final(images) for camera, images in episode.images.items()}
        columns = _step_columns(episode, labels.get(episode.uuid))
        infos = {
            name: _with_final(values)
            for name, values in columns.items()
            if name not in ("action", "observation.state", "next.reward", "next.done")
        }
        infos |= _success_and_prompt(episode)
        specs.add(_minari_spec(episode))
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
        dataset = minari.create_dataset_from_buffers(
            config.dataset_id,
            buffers,
            action_space=spaces[0],
            observation_space=spaces[1],
            algorithm_name="flywheel",
            description="Episodes exported from a flywheel experience store",
            data_format="hdf5",
            jpeg_encoding=False,
        )
        (spec,) = specs if len(specs) == 1 else (None,)
        if spec is not None:  # recorded without building the env here (recover_environment builds it)
            dataset.storage.update_metadata({"env_spec": spec})
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


def _success_and_prompt(episode: EpisodeRecord) -> dict[str, np.ndarray]:
    """Minari infos (T+1 rows, row 0 the reset's): ``success`` (True on the final row of a successful episode)
    and ``prompt`` (the episode's instruction on every row; strings, read back as bytes)."""
    success = np.zeros(episode.length + 1, dtype=bool)
    success[-1] = episode.outcome == Outcome.SUCCESS
    return {"success": success, "prompt": np.array([_prompt(episode)] * (episode.length + 1), dtype=object)}


def _minari_spec(episode: EpisodeRecord) -> str | None:
    """The env spec (JSON) ``recover_environment`` rebuilds the episode's env from, in Minari's flat observation
    layout: the one the episode recorded (``env_spec``, less its first-reset seed and, without rendering, its frame
    settings), else for a Meta-World task one made from its frames. A dataset whose episodes name different envs
    carries none."""
    from envs import EnvConfig
    from envs.registration import env_spec, spec_from_metadata, with_layout

    recorded = episode.metadata.get("env_spec")
    if recorded:
        spec = with_layout(spec_from_metadata(recorded), "flat")
        config = spec.kwargs["config"]
        unused = {"seed"} | ({"width", "height", "camera", "cameras"} if not config.get("render", True) else set())
        spec.kwargs["config"] = {k: v for k, v in config.items() if k not in unused}  # equal envs, equal specs
        return spec.to_json()
    if not _is_metaworld(episode.task):
        return None
    shapes = {camera: images.shape[1:3] for camera, images in episode.images.items()}
    height, width = next(iter(shapes.values()), (64, 64))
    config = EnvConfig(
        task=episode.task, width=width, height=height, **({"cameras": tuple(shapes)} if shapes else {"render": False})
    )
    return env_spec(config, layout="flat").to_json()


def _with_final(values: np.ndarray) -> np.ndarray:
    """T step values → T+1 (Minari's observations include the final one; the last step is repeated)."""
    return np.concatenate([values, values[-1:]], axis=0)
