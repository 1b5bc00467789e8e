"""LeRobot's dataset format on disk: a v3.0 writer and a v2.x/v3.0 reader (no LeRobot install needed).

Layout written (LeRobot ``codebase_version`` ``"v3.0"``, as ``lerobot.datasets`` writes it):

- ``meta/info.json``: version, ``fps``, ``robot_type``, totals, path templates and ``features``
  (dtype/shape/names per column; cameras are ``image`` — PNG bytes in a ``{bytes, path}`` struct inside the
  data parquet — or ``video``, one mp4 stream per camera);
- ``meta/stats.json``: min/max/mean/std/count and q01…q99 per feature over the whole dataset;
- ``meta/tasks.parquet``: the task strings (index ``task``) and their ``task_index``;
- ``meta/episodes/chunk-000/file-000.parquet``: one row per episode — ``episode_index``, ``tasks``, ``length``,
  where its rows are (``data/chunk_index``, ``data/file_index``, ``dataset_from_index``, ``dataset_to_index``)
  and its frames (``videos/<key>/chunk_index``, ``file_index``, ``from_timestamp``, ``to_timestamp``), its
  ``stats/<feature>/<stat>``, plus whatever extra columns the caller gives (flywheel's provenance);
- ``data/chunk-CCC/file-FFF.parquet``: every frame of many episodes (``timestamp``, ``frame_index``,
  ``episode_index``, ``index``, ``task_index`` and the feature columns), a new file past ~100 MB;
- ``videos/<key>/chunk-CCC/file-FFF.mp4``: the frames of many episodes back to back (H.264, PyAV).

The reader accepts v3.0 and the older per-episode layout (v2.0/v2.1: ``meta/episodes.jsonl``,
``meta/tasks.jsonl``, ``data/chunk-CCC/episode_EEEEEE.parquet``, ``videos/chunk-CCC/<key>/episode_EEEEEE.mp4``)
and yields one ``LeRobotEpisode`` (columns, camera frames, task text, metadata row) at a time. Anything
malformed is a one-line ``LeRobotFormatError``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

CODEBASE_VERSION = "v3.0"
READABLE_VERSIONS = ("v2.0", "v2.1", "v3.0")
CHUNK_SIZE = 1000
DATA_FILE_SIZE_MB = 100
VIDEO_FILE_SIZE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
#: Columns every LeRobot frame has (besides the features), as ``lerobot.utils.constants.DEFAULT_FEATURES``.
INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}
VIDEO_CODEC = "libx264"
VIDEO_OPTIONS = {"crf": "15", "g": "2", "preset": "medium"}  # g=2: a key frame every other frame (seeking)


class LeRobotFormatError(ValueError):
    """A dataset folder that is not a readable LeRobot dataset (the message names the file and the problem)."""


@dataclass
class LeRobotEpisode:
    """One episode as stored in a LeRobot dataset.

    ``columns`` maps each non-camera feature to its T×… array (``action``, ``observation.state``, …, and the
    index columns); ``frames`` maps each camera feature key to T×h×w×3 uint8; ``tasks`` is the episode's task
    text per frame; ``meta`` is its row of the episodes table (stats left out).
    """

    index: int
    columns: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    tasks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of frames."""
        return len(self.columns["frame_index"])


# ---- writing (v3.0) ----


def _feature(values: np.ndarray) -> dict:
    dtype = "bool" if values.dtype == bool else str(values.dtype)
    return {"dtype": dtype, "shape": list(values.shape[1:]) or [1], "names": None}


def _arrow_column(values: np.ndarray) -> Any:
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(values.reshape(len(values), -1).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """One episode's statistics of a per-frame feature (per dimension), as LeRobot's ``compute_episode_stats``."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    stats = {
        "min": flat.min(0),
        "max": flat.max(0),
        "mean": flat.mean(0),
        "std": flat.std(0),
        "count": np.array([len(values)]),
    }
    return stats | {name: np.quantile(flat, q, axis=0) for name, q in QUANTILES.items()}


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel statistics of T×h×w×3 uint8 frames in [0, 1], shaped (3, 1, 1) as LeRobot's image stats."""
    pixels = frames.reshape(-1, 3).astype(np.float64) / 255.0
    stats = feature_stats(pixels)
    shaped = {name: value.reshape(3, 1, 1) for name, value in stats.items() if name != "count"}
    return shaped | {"count": np.array([len(frames)])}


def aggregate_stats(episodes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Dataset statistics from per-episode ones: count-weighted means (quantiles too), pooled variance."""
    counts = np.array([float(stats["count"][0]) for stats in episodes])
    weights = counts / counts.sum()
    mean = sum(w * s["mean"] for w, s in zip(weights, episodes, strict=True))
    variance = sum(
        w * (s["std"] ** 2 + (s["mean"] - mean) ** 2) for w, s in zip(weights, episodes, strict=True)
    )
    result = {
        "min": np.min([s["min"] for s in episodes], axis=0),
        "max": np.max([s["max"] for s in episodes], axis=0),
        "mean": mean,
        "std": np.sqrt(variance),
        "count": np.array([int(counts.sum())]),
    }
    return result | {
        name: sum(w * s[name] for w, s in zip(weights, episodes, strict=True)) for name in QUANTILES
    }


def _listed(stats: dict[str, np.ndarray]) -> dict[str, list]:
    return {name: np.asarray(value).tolist() for name, value in stats.items()}


class _VideoFile:
    """One camera's mp4 being written: frames of consecutive episodes in one H.264 stream at ``fps``."""

    def __init__(self, path: Path, fps: int, height: int, width: int) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream(VIDEO_CODEC, rate=fps, options=VIDEO_OPTIONS)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv444p"

    def add(self, frames: np.ndarray) -> None:
        import av

        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames
            self._container.mux(self._stream.encode(video_frame))
            self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode())
        self._container.close()


class LeRobotWriter:
    """Writes episodes into an empty folder as a LeRobot v3.0 dataset; ``close()`` writes the metadata.

    Every episode must have the same features (column names, dtypes and shapes, cameras and their sizes);
    a different one is a ``LeRobotFormatError`` naming what differs. ``video=True`` stores cameras as mp4
    (needs PyAV), else as PNG images inside the data files (lossless).
    """

    def __init__(self, root: Path, fps: int, robot_type: str | None, video: bool = False) -> None:
        self.root, self.fps, self.robot_type, self.video = root, fps, robot_type, video
        self.tasks: dict[str, int] = {}
        self.features: dict[str, dict] | None = None
        self.frames = 0
        self._episode_rows: list[dict] = []
        self._episode_stats: list[dict[str, dict]] = []
        self._data_file = (0, 0)
        self._data_tables: list[Any] = []
        self._data_bytes = 0
        self._data_from = 0
        self._videos: dict[str, _VideoFile] = {}
        self._video_files: dict[str, tuple[int, int]] = {}

    def add_episode(
        self,
        columns: dict[str, np.ndarray],
        frames: dict[str, np.ndarray],
        task: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Append one episode: per-frame ``columns`` (T×…), camera ``frames`` (key → T×h×w×3 uint8), its task
        text and extra columns for its row of the episodes table."""
        length = len(next(iter(columns.values())))
        index = len(self._episode_rows)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        steps = np.arange(length)
        indices = {
            "timestamp": (steps / self.fps).astype(np.float32),
            "frame_index": steps.astype(np.int64),
            "episode_index": np.full(length, index, np.int64),
            "index": (self.frames + steps).astype(np.int64),
            "task_index": np.full(length, task_index, np.int64),
        }
        features = {name: _feature(values) for name, values in (columns | indices).items()}
        features |= {key: self._camera_feature(images) for key, images in frames.items()}
        self._check_features(features, index)
        row: dict[str, Any] = {"episode_index": index, "tasks": [task], "length": length}
        row |= self._write_data(columns | indices, {} if self.video else frames, length)
        if self.video:
            row |= self._write_videos(frames, length)
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        stats = {name: feature_stats(values) for name, values in (columns | indices).items()}
        stats |= {key: image_stats(images) for key, images in frames.items()}
        self._episode_stats.append(stats)
        for name, feature in stats.items():
            row |= {f"stats/{name}/{stat}": np.asarray(value).tolist() for stat, value in feature.items()}
        self._episode_rows.append(row | (extra or {}))
        self.frames += length

    def _camera_feature(self, images: np.ndarray) -> dict:
        height, width, channels = images.shape[1:]
        feature = {
            "dtype": "video" if self.video else "image",
            "shape": [height, width, channels],
            "names": ["height", "width", "channels"],
        }
        if self.video:
            feature["info"] = {
                "video.height": height,
                "video.width": width,
                "video.codec": "h264",
                "video.pix_fmt": "yuv444p",
                "video.is_depth_map": False,
                "video.fps": self.fps,
                "video.channels": channels,
                "has_audio": False,
            }
        return feature

    def _check_features(self, features: dict[str, dict], index: int) -> None:
        if self.features is None:
            self.features = features
            return
        if features != self.features:
            differ = sorted(
                name
                for name in set(features) | set(self.features)
                if features.get(name) != self.features.get(name)
            )
            described = ", ".join(
                f"{name} {_describe(features.get(name))} vs {_describe(self.features.get(name))}"
                for name in differ[:3]
            )
            raise LeRobotFormatError(f"episode {index} has different features than episode 0: {described}")

    def _write_data(self, columns: dict[str, np.ndarray], frames: dict[str, np.ndarray], length: int) -> dict:
        import pyarrow as pa

        table = {name: _arrow_column(values) for name, values in columns.items()}
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        for key, images in frames.items():
            table[key] = pa.array([{"bytes": _png(frame), "path": None} for frame in images], image_type)
        arrow = pa.table(table)
        if self._data_tables and self._data_bytes + arrow.nbytes > DATA_FILE_SIZE_MB * 1024**2:
            self._flush_data()
        self._data_tables.append(arrow)
        self._data_bytes += arrow.nbytes
        chunk_index, file_index = self._data_file
        return {
            "data/chunk_index": chunk_index,
            "data/file_index": file_index,
            "dataset_from_index": self.frames,
            "dataset_to_index": self.frames + length,
        }

    def _flush_data(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._data_tables:
            return
        chunk_index, file_index = self._data_file
        path = self.root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(path, self._data_tables[0].schema, compression="snappy")
        for episode in self._data_tables:  # one row group per episode, as LeRobot writes them
            writer.write_table(pa.Table.from_batches(episode.to_batches(), episode.schema))
        writer.close()
        self._data_tables, self._data_bytes = [], 0
        self._data_file = _next_file(chunk_index, file_index)

    def _write_videos(self, frames: dict[str, np.ndarray], length: int) -> dict:
        row: dict[str, Any] = {}
        for key, images in frames.items():
            video = self._videos.get(key)
            if video is not None and video.path.stat().st_size > VIDEO_FILE_SIZE_MB * 1024**2:
                video.close()
                self._video_files[key] = _next_file(*self._video_files[key])
                video = None
            chunk_index, file_index = self._video_files.setdefault(key, (0, 0))
            if video is None:
                path = self.root / VIDEO_PATH.format(
                    video_key=key, chunk_index=chunk_index, file_index=file_index
                )
                video = self._videos[key] = _VideoFile(path, self.fps, *images.shape[1:3])
            start = video.frames / self.fps
            video.add(images)
            row |= {
                f"videos/{key}/chunk_index": chunk_index,
                f"videos/{key}/file_index": file_index,
                f"videos/{key}/from_timestamp": start,
                f"videos/{key}/to_timestamp": start + length / self.fps,
            }
        return row

    def close(self) -> dict:
        """Finish the files and write ``meta/``; returns ``{"episodes", "frames"}``. Raises
        ``LeRobotFormatError`` when no episode was added."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.features is None:
            raise LeRobotFormatError("no episodes to write")
        self._flush_data()
        for video in self._videos.values():
            video.close()
        meta = self.root / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(self._episode_rows),
            self.root / EPISODES_PATH.format(chunk_index=0, file_index=0),
        )
        tasks = pd.DataFrame(
            {"task_index": list(self.tasks.values())}, index=pd.Index(list(self.tasks), name="task")
        )
        tasks.to_parquet(meta / "tasks.parquet")
        stats = {
            name: _listed(aggregate_stats([episode[name] for episode in self._episode_stats]))
            for name in self._episode_stats[0]
        }
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        episodes = len(self._episode_rows)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": episodes,
            "total_frames": self.frames,
            "total_tasks": len(self.tasks),
            "chunks_size": CHUNK_SIZE,
            "data_files_size_in_mb": DATA_FILE_SIZE_MB,
            "video_files_size_in_mb": VIDEO_FILE_SIZE_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video else None,
            "features": self.features,
        }
        (meta / "info.json").write_text(json.dumps(info, indent=2))
        return {"episodes": episodes, "frames": self.frames}


def _next_file(chunk_index: int, file_index: int) -> tuple[int, int]:
    """The next (chunk, file) slot: ``CHUNK_SIZE`` files per chunk folder."""
    return (chunk_index + 1, 0) if file_index + 1 >= CHUNK_SIZE else (chunk_index, file_index + 1)


def _describe(feature: dict | None) -> str:
    if feature is None:
        return "(absent)"
    return f"{feature['dtype']}{list(feature['shape'])}"


# ---- reading (v2.0, v2.1, v3.0) ----


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing (not a LeRobot dataset folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LeRobotFormatError(f"{path}: not valid JSON ({error})") from None


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise LeRobotFormatError(f"{path}: not valid JSON lines ({error})") from None


def _parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise LeRobotFormatError(f"{path}: not a readable parquet file ({error})") from None


def read_info(root: Path) -> dict:
    """``meta/info.json``, checked: a readable ``codebase_version``, ``fps`` and ``features``."""
    if not root.is_dir():
        raise LeRobotFormatError(f"{root}: no such dataset folder")
    info = _json(root / "meta" / "info.json")
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{root / 'meta' / 'info.json'}: expected a JSON object")
    version = info.get("codebase_version")
    if version not in READABLE_VERSIONS:
        raise LeRobotFormatError(
            f"{root / 'meta' / 'info.json'}: codebase_version {version!r} is not one of {', '.join(READABLE_VERSIONS)}"
        )
    for key, kind in (("fps", (int, float)), ("features", dict), ("data_path", str)):
        if not isinstance(info.get(key), kind):
            raise LeRobotFormatError(f"{root / 'meta' / 'info.json'}: missing or malformed {key!r}")
    return info


class LeRobotReader:
    """Reads a local LeRobot dataset folder (v2.0, v2.1 or v3.0) episode by episode."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.info = read_info(root)
        self.version: str = self.info["codebase_version"]
        self.fps = float(self.info["fps"])
        self.features: dict[str, dict] = self.info["features"]
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in ("image", "video")]
        self.task_texts = self._tasks()
        self.episodes = self._episodes()
        self._table_cache: tuple[Path, Any] | None = None

    @property
    def legacy(self) -> bool:
        """The per-episode-file layout of v2.x."""
        return self.version != CODEBASE_VERSION

    def _tasks(self) -> dict[int, str]:
        if self.legacy:
            rows = _jsonl(self.root / "meta" / "tasks.jsonl")
            try:
                return {int(row["task_index"]): str(row["task"]) for row in rows}
            except (KeyError, TypeError, ValueError):
                raise LeRobotFormatError(
                    f"{self.root / 'meta' / 'tasks.jsonl'}: rows need task_index and task"
                ) from None
        table = _parquet(self.root / "meta" / "tasks.parquet").to_pydict()
        texts = table.get("task") or table.get("__index_level_0__")
        if texts is None or "task_index" not in table:
            raise LeRobotFormatError(
                f"{self.root / 'meta' / 'tasks.parquet'}: needs columns task and task_index"
            )
        return {int(i): str(t) for i, t in zip(table["task_index"], texts, strict=True)}

    def _episodes(self) -> list[dict]:
        if self.legacy:
            rows = _jsonl(self.root / "meta" / "episodes.jsonl")
        else:
            import pyarrow as pa

            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise LeRobotFormatError(f"{self.root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet")
            tables = [_parquet(path) for path in files]
            try:
                table = pa.concat_tables(tables, promote_options="default")
            except pa.ArrowInvalid as error:
                raise LeRobotFormatError(
                    f"{self.root / 'meta' / 'episodes'}: files disagree ({error})"
                ) from None
            keep = [name for name in table.column_names if not name.startswith("stats/")]
            rows = table.select(keep).to_pylist()
        for row in rows:
            if not isinstance(row.get("episode_index"), int) or not isinstance(row.get("length"), int):
                raise LeRobotFormatError(
                    f"{self.root / 'meta'}: an episode row lacks episode_index or length"
                )
        return sorted(rows, key=lambda row: row["episode_index"])

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self) -> Iterator[LeRobotEpisode]:
        for row in self.episodes:
            yield self.episode(row)

    def episode(self, row: dict) -> LeRobotEpisode:
        """The episode of one row of the episodes table."""
        index = row["episode_index"]
        table = self._episode_table(row)
        if table.num_rows != row["length"]:
            raise LeRobotFormatError(
                f"episode {index}: {table.num_rows} frames in the data, {row['length']} in meta"
            )
        columns: dict[str, np.ndarray] = {}
        frames: dict[str, np.ndarray] = {}
        for name in table.column_names:
            feature = self.features.get(name, {})
            if feature.get("dtype") == "image":
                frames[name] = self._decode_images(table.column(name).to_pylist(), name, index)
            elif name in self.features or name in INDEX_FEATURES:
                columns[name] = _column_array(table.column(name), name, index)
        for key in self.camera_keys:
            if self.features[key]["dtype"] == "video":
                frames[key] = self._decode_video(row, key, columns.get("timestamp"), index)
            elif key not in frames:
                raise LeRobotFormatError(f"episode {index}: image feature {key!r} missing from the data")
        for required in ("frame_index", "task_index"):
            if required not in columns:
                raise LeRobotFormatError(f"episode {index}: the data has no {required!r} column")
        try:
            tasks = [self.task_texts[int(i)] for i in columns["task_index"]]
        except KeyError as error:
            raise LeRobotFormatError(
                f"episode {index}: task_index {error} is not in the tasks table"
            ) from None
        return LeRobotEpisode(index, columns, frames, tasks, row)

    def _episode_table(self, row: dict) -> Any:
        import pyarrow.compute as pc

        index = row["episode_index"]
        if self.legacy:
            chunk = index // int(self.info.get("chunks_size", CHUNK_SIZE))
            path = self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=index)
            return _parquet(path)
        try:
            path = self.root / self.info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
            )
        except KeyError as error:
            raise LeRobotFormatError(f"episode {index}: its episodes row has no {error} column") from None
        if self._table_cache is None or self._table_cache[0] != path:
            self._table_cache = (path, _parquet(path))
        table = self._table_cache[1]
        if "episode_index" not in table.column_names:
            raise LeRobotFormatError(f"{path}: no episode_index column")
        return table.filter(pc.equal(table.column("episode_index"), index))

    def _decode_images(self, cells: list, key: str, index: int) -> np.ndarray:
        images = []
        for cell in cells:
            data = cell.get("bytes") if isinstance(cell, dict) else None
            path = cell.get("path") if isinstance(cell, dict) else None
            try:
                source = io.BytesIO(data) if data else (self.root / path if path else None)
                if source is None:
                    raise OSError("neither bytes nor a path")
                images.append(np.asarray(PILImage.open(source).convert("RGB")))
            except OSError as error:
                raise LeRobotFormatError(
                    f"episode {index}: an image of {key!r} does not decode ({error})"
                ) from None
        return _stack_frames(images, key, index)

    def _decode_video(self, row: dict, key: str, timestamps: np.ndarray | None, index: int) -> np.ndarray:
        if timestamps is None:
            raise LeRobotFormatError(
                f"episode {index}: the data has no 'timestamp' column (needed for {key!r})"
            )
        template = self.info.get("video_path")
        if not isinstance(template, str):
            raise LeRobotFormatError(
                f"{self.root / 'meta' / 'info.json'}: video feature {key!r} but no video_path"
            )
        if self.legacy:
            chunk = index // int(self.info.get("chunks_size", CHUNK_SIZE))
            path = self.root / template.format(episode_chunk=chunk, video_key=key, episode_index=index)
            start = 0.0
        else:
            try:
                path = self.root / template.format(
                    video_key=key,
                    chunk_index=row[f"videos/{key}/chunk_index"],
                    file_index=row[f"videos/{key}/file_index"],
                )
                start = float(row[f"videos/{key}/from_timestamp"])
            except KeyError as error:
                raise LeRobotFormatError(f"episode {index}: its episodes row has no {error} column") from None
        wanted = start + timestamps.astype(np.float64)
        return decode_video_frames(path, wanted, tolerance=1.0 / self.fps, label=f"episode {index} {key!r}")


def decode_video_frames(path: Path, times: np.ndarray, tolerance: float, label: str) -> np.ndarray:
    """The RGB frames of ``path`` nearest to each of ``times`` (seconds), each within ``tolerance``."""
    import av

    if not path.is_file():
        raise LeRobotFormatError(f"{label}: video {path} missing")
    decoded_times: list[float] = []
    decoded: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            first, last = float(times.min()), float(times.max())
            if first > tolerance and stream.time_base is not None:
                container.seek(int((first - tolerance) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time > last + tolerance:
                    break
                if frame.time >= first - tolerance:
                    decoded_times.append(float(frame.time))
                    decoded.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, OSError) as error:
        raise LeRobotFormatError(f"{label}: video {path} does not decode ({error})") from None
    if not decoded:
        raise LeRobotFormatError(
            f"{label}: video {path} has no frames between {first:.3f} s and {last:.3f} s"
        )
    known = np.array(decoded_times)
    nearest = np.abs(known[None, :] - times[:, None]).argmin(1)
    off = np.abs(known[nearest] - times)
    if off.max() > tolerance:
        worst = int(off.argmax())
        raise LeRobotFormatError(
            f"{label}: no frame of {path.name} within {tolerance:.3f} s of {times[worst]:.3f} s"
        )
    return _stack_frames([decoded[i] for i in nearest], label, -1)


def _stack_frames(images: list[np.ndarray], key: str, index: int) -> np.ndarray:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        where = f"episode {index} " if index >= 0 else ""
        raise LeRobotFormatError(f"{where}{key}: frames of different sizes {sorted(shapes)}")
    return np.stack(images).astype(np.uint8)


def _column_array(column: Any, name: str, index: int) -> np.ndarray:
    import pyarrow as pa

    try:
        kind = column.type
        while pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
            kind = kind.value_type
        if kind != column.type:
            return np.asarray(column.to_pylist(), dtype=kind.to_pandas_dtype())
        return column.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, NotImplementedError, TypeError, ValueError) as error:
        raise LeRobotFormatError(f"episode {index}: column {name!r} is not numeric ({error})") from None
