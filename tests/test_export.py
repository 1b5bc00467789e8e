"""`flywheel export` round trips: stored episodes (images, actions, interventions, a relabel) → LeRobot v3.0
(read back with pyarrow + PIL, then `flywheel import`ed into a fresh store) and → Minari (read back with
``minari.load_dataset``)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from envs import EnvConfig, SimulatedHumanConfig
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from storage import EpisodeLabels, ExperienceStore, RelabelRecord

TASK = "reach-v3"


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[str, str, list]:
    url = f"sqlite:///{tmp_path_factory.mktemp('export') / 'store.db'}"
    run_collection(
        CollectConfig(
            env=EnvConfig(task=TASK, width=32, height=32, max_episode_steps=25),
            policy="scripted",
            noise=1.0,
            episodes=3,
            human=SimulatedHumanConfig(random_rate=0.1, takeover_steps=5, seed=1),
            store_url=url,
            run_id="export-run",
        ),
        progress=False,
    )
    store = ExperienceStore(url)
    episodes = [store.load_episode(s.uuid, images=True) for s in store.list_episodes(run_id="export-run")]
    rng = np.random.default_rng(0)
    labels = [
        EpisodeLabels(
            episode_uuid=e.uuid,
            values=rng.uniform(-1, 0, e.length).astype(np.float32),
            advantages=rng.normal(size=e.length).astype(np.float32),
            indicators=rng.random(e.length) < 0.4,
        )
        for e in episodes
    ]
    relabel_id = store.write_relabel(RelabelRecord(method="recap", labels=labels))
    return url, relabel_id, episodes


def test_lerobot_round_trip(stored, tmp_path):
    """The v3.0 layout LeRobot documents (lerobot.datasets.utils): meta/info.json, stats.json, tasks.parquet,
    episodes/chunk-000/file-000.parquet, data/chunk-000/file-000.parquet; then `flywheel import` brings it back
    into a fresh store with the same arrays, prompts, sources and outcomes, and a second import adds nothing."""
    import pandas as pd

    url, relabel_id, episodes = stored
    out = tmp_path / "lerobot"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--format",
            "lerobot",
            "--output",
            str(out),
            "--runs",
            "export-run",
            "--relabel",
            relabel_id,
            "--db",
            url,
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == len(episodes)
    assert info["total_frames"] == sum(e.length for e in episodes)
    assert info["fps"] == 80 and info["robot_type"] == "sawyer"  # Meta-World's step rate and arm
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["features"]["observation.images.corner2"]["dtype"] == "image"
    assert info["features"]["action"]["shape"] == [episodes[0].actions.shape[1]]
    tasks = pd.read_parquet(out / "meta" / "tasks.parquet")
    assert list(tasks.index) == ["reach the goal position"] and tasks.index.name == "task"
    assert tasks["task_index"].tolist() == [0]
    stats = json.loads((out / "meta" / "stats.json").read_text())
    assert stats["action"]["count"] == [info["total_frames"]] and len(stats["action"]["q99"]) == 4
    assert np.asarray(stats["observation.images.corner2"]["mean"]).shape == (3, 1, 1)
    meta = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    data = pq.read_table(out / info["data_path"].format(chunk_index=0, file_index=0)).to_pydict()
    relabel = {labels.episode_uuid: labels for labels in ExperienceStore(url).load_relabel(relabel_id).labels}
    assert sum(e.sources.sum() for e in episodes) > 0  # the export carries real interventions
    for index, episode in enumerate(episodes):
        row = meta[index]
        assert row["flywheel_uuid"] == str(episode.uuid) and row["length"] == episode.length
        assert row["tasks"] == ["reach the goal position"] and row["data/file_index"] == 0
        rows = slice(row["dataset_from_index"], row["dataset_to_index"])
        assert data["episode_index"][rows] == [index] * episode.length
        np.testing.assert_allclose(np.array(data["action"][rows]), episode.actions, rtol=1e-6)
        np.testing.assert_allclose(np.array(data["observation.state"][rows]), episode.states, rtol=1e-6)
        assert data["intervention"][rows] == episode.sources.astype(int).tolist()
        assert data["frame_index"][rows] == list(range(episode.length))
        np.testing.assert_allclose(data["advantage"][rows], relabel[episode.uuid].advantages, rtol=1e-6)
        assert data["advantage_positive"][rows] == relabel[episode.uuid].indicators.tolist()
        cell = data["observation.images.corner2"][rows][3]
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(cell["bytes"]))), episode.images["corner2"][3]
        )
        assert row["stats/action/count"] == [episode.length]

    fresh = f"sqlite:///{tmp_path / 'imported.db'}"
    imported = CliRunner().invoke(app, ["import", str(out), "--db", fresh])
    assert imported.exit_code == 0, imported.output
    assert f"imported {len(episodes)} episodes" in imported.output and "task reach-v3" in imported.output
    store = ExperienceStore(fresh)
    back = [store.load_episode(s.uuid, images=True) for s in store.list_episodes(run_id="import-lerobot")]
    assert len(back) == len(episodes)
    for episode, copy in zip(episodes, back, strict=True):
        np.testing.assert_array_equal(copy.actions, episode.actions)
        np.testing.assert_array_equal(copy.states, episode.states)
        np.testing.assert_array_equal(copy.rewards, episode.rewards)
        np.testing.assert_array_equal(copy.sources, episode.sources)
        np.testing.assert_array_equal(copy.terminated, episode.terminated)
        np.testing.assert_array_equal(copy.images["corner2"], episode.images["corner2"])
        assert copy.task == episode.task and copy.outcome == episode.outcome
        assert copy.prompt == "reach the goal position"
        assert copy.metadata["source"]["codebase_version"] == "v3.0"
        assert copy.metadata["source"]["flywheel_uuid"] == str(episode.uuid)
        assert copy.metadata["fps"] == 80 and copy.metadata["robot_type"] == "sawyer"
    again = CliRunner().invoke(app, ["import", str(out), "--db", fresh])
    assert again.exit_code == 0 and f"{len(episodes)} already stored" in again.output
    assert store.count_episodes() == len(episodes)
    not_empty = CliRunner().invoke(app, ["export", "--format", "lerobot", "--output", str(out), "--db", url])
    assert not_empty.exit_code == 2 and "not empty" in not_empty.output


def test_minari_round_trip(stored, tmp_path, monkeypatch):
    import minari

    url, relabel_id, episodes = stored
    out = tmp_path / "minari"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--format",
            "minari",
            "--output",
            str(out),
            "--relabel",
            relabel_id,
            "--dataset-id",
            "flywheel/reach-v0",
            "--db",
            url,
        ],
    )
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("flywheel/reach-v0")
    assert dataset.total_episodes == len(episodes) and dataset.total_steps == sum(e.length for e in episodes)
    for episode, loaded in zip(episodes, dataset.iterate_episodes(), strict=True):
        np.testing.assert_allclose(loaded.actions, episode.actions, rtol=1e-6)
        np.testing.assert_array_equal(loaded.observations["corner2"][:-1], episode.images["corner2"])
        np.testing.assert_allclose(loaded.observations["state"][:-1], episode.states, rtol=1e-6)
        np.testing.assert_allclose(loaded.rewards, episode.rewards, rtol=1e-6)
        assert loaded.infos["intervention"][:-1].tolist() == episode.sources.astype(int).tolist()
        assert "advantage" in loaded.infos
    assert os.environ["MINARI_DATASETS_PATH"] == str(out)


def test_export_bad_input(stored, tmp_path):
    url, _, _ = stored
    runner = CliRunner()
    empty = runner.invoke(
        app, ["export", "--format", "lerobot", "--output", str(tmp_path / "x"), "--runs", "nope", "--db", url]
    )
    assert empty.exit_code == 2 and "no stored episodes match" in empty.output
    bad = runner.invoke(app, ["export", "--format", "rlds", "--output", str(tmp_path / "y"), "--db", url])
    assert bad.exit_code == 2 and "format" in bad.output
