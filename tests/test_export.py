"""`flywheel export` round trips: stored episodes (images, actions, interventions, a relabel) → LeRobot v2.1
parquet (read back with pyarrow + PIL) and → Minari (read back with ``minari.load_dataset``)."""

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
    assert info["codebase_version"] == "v2.1" and info["total_episodes"] == len(episodes)
    assert info["total_frames"] == sum(e.length for e in episodes)
    assert info["features"]["observation.images.corner2"]["dtype"] == "image"
    assert info["features"]["action"]["shape"] == [episodes[0].actions.shape[1]]
    meta = [json.loads(line) for line in (out / "meta" / "episodes.jsonl").read_text().splitlines()]
    relabel = {labels.episode_uuid: labels for labels in ExperienceStore(url).load_relabel(relabel_id).labels}
    assert sum(e.sources.sum() for e in episodes) > 0  # the export carries real interventions
    for index, episode in enumerate(episodes):
        assert meta[index]["flywheel_uuid"] == str(episode.uuid) and meta[index]["length"] == episode.length
        path = out / info["data_path"].format(episode_chunk=0, episode_index=index)
        table = pq.read_table(path).to_pydict()
        np.testing.assert_allclose(np.array(table["action"]), episode.actions, rtol=1e-6)
        np.testing.assert_allclose(np.array(table["observation.state"]), episode.states, rtol=1e-6)
        assert table["intervention"] == episode.sources.astype(int).tolist()
        assert table["frame_index"] == list(range(episode.length))
        np.testing.assert_allclose(table["advantage"], relabel[episode.uuid].advantages, rtol=1e-6)
        assert table["advantage_positive"] == relabel[episode.uuid].indicators.tolist()
        frame = np.asarray(Image.open(io.BytesIO(table["observation.images.corner2"][3]["bytes"])))
        np.testing.assert_array_equal(frame, episode.images["corner2"][3])
    tasks = [json.loads(line) for line in (out / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 1 and tasks[0]["task_index"] == 0
    again = CliRunner().invoke(app, ["export", "--format", "lerobot", "--output", str(out), "--db", url])
    assert again.exit_code == 2 and "not empty" in again.output


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
