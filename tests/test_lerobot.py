"""LeRobot datasets in and out without an env: a hand-built v2.1 dataset (the layout LeRobot documents for
v2.1: meta/info.json, tasks.jsonl, episodes.jsonl, data/chunk-000/episode_*.parquet, videos/chunk-000/<key>/
episode_*.mp4) imported as demonstrations; a v3.0 export with video cameras imported back; a mixed store
refused or split per camera set; malformed datasets refused in one line. (The Meta-World export → import round
trip with relabels is in test_export.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from experiments.cli import app
from experiments.lerobot import LeRobotReader
from storage import EpisodeQuery, ExperienceStore, Outcome, StepSource
from tests.storage_fixtures import make_episode

TASK_TEXT = "Put the red cube in the bowl"


def _frames(length: int, side: int, phase: float = 0.0) -> np.ndarray:
    """Smooth moving gradients (what a camera sees; video codecs keep them close)."""
    y, x = np.mgrid[0:side, 0:side] / side
    t = np.arange(length)[:, None, None] / max(length, 1)
    channels = [np.sin(2 * np.pi * (x + t + phase)), np.cos(2 * np.pi * (y - t)), x * y + 0 * t]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def build_v21(root: Path, lengths: tuple[int, ...] = (12, 9), fps: int = 15) -> dict:
    """A LeRobot v2.1 dataset of teleoperated episodes: 6-D state, 7-D action, a wrist camera stored as PNG
    images and a front camera as one mp4 per episode. Returns the arrays written."""
    rng = np.random.default_rng(3)
    written: dict = {"states": [], "actions": [], "wrist": [], "front": []}
    features = {
        "observation.state": {"dtype": "float32", "shape": [6], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None},
        "observation.images.wrist": {"dtype": "image", "shape": [20, 20, 3], "names": ["h", "w", "c"]},
        "observation.images.front": {"dtype": "video", "shape": [24, 32, 3], "names": ["h", "w", "c"]},
    } | {
        name: {"dtype": d, "shape": [1], "names": None}
        for name, d in (
            ("timestamp", "float32"),
            ("frame_index", "int64"),
            ("episode_index", "int64"),
            ("index", "int64"),
            ("task_index", "int64"),
        )
    }
    info = {
        "codebase_version": "v2.1",
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": sum(lengths),
        "total_tasks": 2,
        "total_videos": len(lengths),
        "total_chunks": 1,
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = [{"task_index": 0, "task": "Wave hello"}, {"task_index": 1, "task": TASK_TEXT}]
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tasks))
    episodes, start = [], 0
    for index, length in enumerate(lengths):
        states = rng.standard_normal((length, 6)).astype(np.float32)
        actions = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
        wrist, front = _frames(length, 20), _frames(length, 32, phase=0.3)[:, :24]
        steps = np.arange(length)
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table = pa.table(
            {
                "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(states.ravel()), 6),
                "action": pa.array(list(actions)),  # a variable-size list column, as older writers made
                "observation.images.wrist": pa.array(
                    [{"bytes": _png(f), "path": None} for f in wrist], image_type
                ),
                "timestamp": pa.array((steps / fps).astype(np.float32)),
                "frame_index": pa.array(steps),
                "episode_index": pa.array(np.full(length, index)),
                "index": pa.array(start + steps),
                "task_index": pa.array(np.full(length, 1)),
            }
        )
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{index:06d}.parquet")
        _write_mp4(
            root / "videos" / "chunk-000" / "observation.images.front" / f"episode_{index:06d}.mp4",
            front,
            fps,
        )
        episodes.append({"episode_index": index, "tasks": [TASK_TEXT], "length": length})
        for key, value in (("states", states), ("actions", actions), ("wrist", wrist), ("front", front)):
            written[key].append(value)
        start += length
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in episodes))
    return written


def test_import_v21_teleop_dataset(tmp_path):
    root = tmp_path / "so100_teleop"
    written = build_v21(root)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    runner = CliRunner()
    result = runner.invoke(
        app, ["import", str(root), "--task", "cube-in-bowl", "--repo-id", "me/so100_teleop", "--db", url]
    )
    assert result.exit_code == 0, result.output
    assert "imported 2 episodes (21 frames, 0 already stored) from LeRobot v2.1" in result.output
    store = ExperienceStore(url)
    summaries = store.list_episodes(task="cube-in-bowl", run_id="import-so100_teleop")
    episodes = [store.load_episode(s.uuid, images=True) for s in summaries]
    assert len(episodes) == 2
    for index, episode in enumerate(episodes):
        np.testing.assert_array_equal(episode.states, written["states"][index])
        np.testing.assert_array_equal(episode.actions, written["actions"][index])
        np.testing.assert_array_equal(episode.images["wrist"], written["wrist"][index])  # PNG: lossless
        front = episode.images["front"].astype(int)
        assert front.shape == written["front"][index].shape
        assert np.abs(front - written["front"][index]).mean() < 4  # H.264 at crf 10
        assert (episode.sources == StepSource.HUMAN).all() and episode.policy_version is None
        assert episode.outcome == Outcome.SUCCESS and episode.terminated[-1] and not episode.truncated.any()
        assert episode.prompt == TASK_TEXT
        assert episode.metadata["demonstration"] is True
        assert episode.metadata["fps"] == 15 and episode.metadata["robot_type"] == "so100"
        assert episode.metadata["source"] | {"path": None} == {
            "format": "lerobot",
            "path": None,
            "repo_id": "me/so100_teleop",
            "codebase_version": "v2.1",
            "episode_index": index,
        }
    again = runner.invoke(
        app, ["import", str(root), "--task", "cube-in-bowl", "--repo-id", "me/so100_teleop", "--db", url]
    )
    assert again.exit_code == 0 and "imported 0 episodes (0 frames, 2 already stored)" in again.output
    resized = runner.invoke(
        app,
        [
            "import",
            str(root),
            "--task",
            "cube-in-bowl",
            "--image-size",
            "16",
            "--run-id",
            "small",
            "--db",
            url,
        ],
    )
    assert resized.exit_code == 0, resized.output
    small = store.load_episode(next(iter(store.list_episodes(run_id="small"))).uuid, images=True)
    assert small.images["front"].shape[1:] == (16, 16, 3) and small.images["wrist"].shape[1:] == (16, 16, 3)
    assert store.count_episodes() == 4


def _store_with(tmp_path: Path, sizes: tuple[int, ...]) -> str:
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    rng = np.random.default_rng(0)
    for index, side in enumerate(sizes):
        episode = make_episode(
            rng, 8, task="reach-v3", policy_version=None, image_size=side, run_id=f"run{side}"
        )
        episode.images = {"corner": _frames(8, side, phase=index / 4)}
        episode.prompt = "reach the goal position"
        store.write_episode(episode)
    return url


def test_video_export_round_trip_and_mixed_sets(tmp_path):
    url = _store_with(tmp_path, (16, 16, 24))
    runner = CliRunner()
    mixed = runner.invoke(
        app, ["export", "--format", "lerobot", "--output", str(tmp_path / "all"), "--db", url]
    )
    assert mixed.exit_code == 2
    assert (
        "mixes 2 camera/image-size sets (corner-16x16: 2 episodes of reach-v3 in run(s) run16; corner-24x24: 1 episodes of reach-v3 in run(s) run24)"
        in mixed.output
    )
    assert "--split" in mixed.output and not (tmp_path / "all").exists()

    split = runner.invoke(
        app,
        [
            "export",
            "--format",
            "lerobot",
            "--split",
            "--video",
            "--output",
            str(tmp_path / "all"),
            "--db",
            url,
        ],
    )
    assert split.exit_code == 0, split.output
    sixteen = tmp_path / "all" / "corner-16x16"
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["corner-16x16", "corner-24x24"]
    info = json.loads((sixteen / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.corner"]["dtype"] == "video" and info["total_episodes"] == 2
    assert (sixteen / "videos" / "observation.images.corner" / "chunk-000" / "file-000.mp4").is_file()
    rows = pq.read_table(sixteen / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [r["videos/observation.images.corner/from_timestamp"] for r in rows] == [0.0, 8 / 80]
    reader = LeRobotReader(sixteen)
    assert reader.version == "v3.0" and reader.fps == 80 and len(reader) == 2

    imported = runner.invoke(app, ["import", str(sixteen), "--db", f"sqlite:///{tmp_path / 'back.db'}"])
    assert imported.exit_code == 0, imported.output
    store, back = ExperienceStore(url), ExperienceStore(f"sqlite:///{tmp_path / 'back.db'}")
    originals = [store.load_episode(s.uuid, images=True) for s in store.list_episodes(run_id="run16")]
    copies = [back.load_episode(s.uuid, images=True) for s in back.list_episodes()]
    for original, copy in zip(originals, copies, strict=True):
        np.testing.assert_array_equal(copy.actions, original.actions)
        np.testing.assert_array_equal(copy.sources, original.sources)
        assert copy.metadata["demonstration"] is False  # flywheel's intervention column says who acted
        assert copy.prompt == "reach the goal position" and copy.task == "reach-v3"
        error = np.abs(copy.images["corner"].astype(int) - original.images["corner"].astype(int))
        assert error.mean() < 6, error.mean()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "meta" / "info.json").unlink(), "meta/info.json: missing"),
        (
            lambda root: (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v1.6"})),
            "codebase_version 'v1.6' is not one of v2.0, v2.1, v3.0",
        ),
        (
            lambda root: (root / "data" / "chunk-000" / "episode_000001.parquet").unlink(),
            "episode_000001.parquet: missing",
        ),
        (
            lambda root: (root / "meta" / "episodes.jsonl").write_text(
                '{"episode_index": 0, "tasks": [], "length": 5}\n'
            ),
            "episode 0: 12 frames in the data, 5 in meta",
        ),
        (
            lambda root: (
                root / "videos" / "chunk-000" / "observation.images.front" / "episode_000000.mp4"
            ).write_bytes(b"no"),
            "does not decode",
        ),
    ],
)
def test_malformed_datasets_are_one_line_errors(tmp_path, damage, message):
    root = tmp_path / "broken"
    build_v21(root)
    damage(root)
    result = CliRunner().invoke(app, ["import", str(root), "--db", f"sqlite:///{tmp_path / 's.db'}"])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def _imported_teleop(tmp_path: Path) -> str:
    root = tmp_path / "teleop"
    build_v21(root)
    url = f"sqlite:///{tmp_path / 'teleop.db'}"
    result = CliRunner().invoke(
        app, ["import", str(root), "--task", "cube-in-bowl", "--image-size", "48", "--db", url]
    )
    assert result.exit_code == 0, result.output
    return url


def test_imported_demonstrations_are_a_training_selection(tmp_path):
    from experiments.training import stored_image_layout

    store = ExperienceStore(_imported_teleop(tmp_path))
    selection = EpisodeQuery(tasks=["cube-in-bowl"], run_ids=["import-teleop"], outcomes=["success"])
    assert stored_image_layout(store, selection) == (("front", "wrist"), 48)


@pytest.mark.slow
def test_train_bc_on_an_imported_teleop_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = _imported_teleop(tmp_path)
    args = ["train", "bc", "--task", "cube-in-bowl", "--run-id", "import-teleop", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--eval-episodes", "0", "--db", url])
    assert result.exit_code == 0, result.output
    assert "trained on 2 episodes" in result.output
    (version,) = [v["version"] for v in ExperienceStore(url).policy_versions()]
    assert version.startswith("vla-tiny-")
