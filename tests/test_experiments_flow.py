"""The experiments layer end to end on a tiny budget: collect → BC prior → one RECAP iteration, all via the store."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from envs import EnvConfig, EnvSettings, SimulatedHumanConfig
from envs.tasks import task_prompt
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from experiments.evaluation import summarize, wilson_interval
from experiments.paths import default_mlflow_uri
from experiments.recap_iteration import RecapIterationConfig, run_recap_iteration
from experiments.training import (
    BCConfig,
    TrainedPolicy,
    load_training_episodes,
    to_episode_arrays,
    train_vla,
)
from policies.training import build_dataset
from recap import RelabelConfig, ValueConfig
from storage import EpisodeQuery, ExperienceStore

TASK = "reach-v3"
ENV = EnvConfig(task=TASK, cameras=("corner2",), width=48, height=48, max_episode_steps=40)
TINY_BC = BCConfig(
    env=EnvSettings(cameras=("corner2",), image_size=48, max_episode_steps=40),
    steps=15,
    batch_size=8,
    eval_episodes=2,
)


def test_wilson_interval_is_sane():
    low, high = wilson_interval(35, 50)
    assert 0.55 < low < 0.7 < high < 0.82
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> tuple[ExperienceStore, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('flow') / 'flow.db'}"
    report = run_collection(
        CollectConfig(env=ENV, policy="scripted", noise=0.8, episodes=6, store_url=url, run_id="demos"),
        progress=False,
    )
    assert report.episodes == 6
    return ExperienceStore(url), url


def test_collection_is_idempotent_by_run_id(demo_store):
    store, url = demo_store
    again = run_collection(
        CollectConfig(env=ENV, policy="scripted", noise=0.8, episodes=6, store_url=url, run_id="demos"),
        progress=False,
    )
    assert again.episodes == 6 and store.count_episodes(run_id="demos") == 6


def test_train_vla_from_store_registers_and_evaluates(demo_store, tmp_path):
    store, _ = demo_store
    trained = train_vla(
        store, EpisodeQuery(tasks=[TASK], run_ids=["demos"]), TINY_BC, tmp_path, progress=False
    )
    assert trained.episodes_used == 6 and trained.checkpoint.is_dir()
    versions = {row["version"]: row for row in store.policy_versions()}
    assert versions[trained.version]["kind"] == "vla"
    assert versions[trained.version]["uri"] == str(trained.checkpoint.resolve())
    [evaluation] = trained.evaluations
    assert evaluation.n == 2 and evaluation.policy_version == trained.version
    assert store.list_evaluations()[-1].policy_version == trained.version
    losses = [row["loss"] for row in trained.train.history]
    assert losses and all(math.isfinite(loss) for loss in losses), losses


def test_train_vla_evaluates_in_the_env_every_k_steps_and_records_each(demo_store, tmp_path):
    store, _ = demo_store
    config = BCConfig.model_validate(TINY_BC.model_dump() | {"steps": 7, "eval_every": 3, "eval_episodes": 1})
    trained = train_vla(
        store, EpisodeQuery(tasks=[TASK], run_ids=["demos"]), config, tmp_path, progress=False
    )
    assert [row["step"] for row in trained.train.evaluations] == [3, 6, 7]  # every k steps, and the end
    for row in trained.train.evaluations:
        assert 0.0 <= row[f"{TASK}/ci_low"] <= row[f"{TASK}/success"] <= row[f"{TASK}/ci_high"] <= 1.0
    assert [step for step, _ in trained.evaluation_curve] == [3, 6, 7]
    assert [row[f"{TASK}/success"] for row in trained.train.evaluations] == [
        result.success_rate for _, result in trained.evaluation_curve
    ]
    assert trained.evaluations == [trained.evaluation_curve[-1][1]]  # the final one is the last point
    [stored] = store.list_evaluations(policy_version=trained.version)  # only the registered weights' one
    assert (stored.task, stored.n, stored.successes) == (TASK, 1, trained.evaluations[0].successes)
    [version] = [row for row in store.policy_versions() if row["version"] == trained.version]
    curve = version["metadata"]["evaluation_curve"]
    assert [(point["step"], point["task"], point["n"]) for point in curve] == [
        (step, TASK, 1) for step in (3, 6, 7)
    ]
    assert [point["successes"] for point in curve] == [r.successes for _, r in trained.evaluation_curve]


def test_one_model_trains_on_two_tasks_and_the_prompt_selects_the_task(tmp_path):
    url, tasks = f"sqlite:///{tmp_path / 'multi.db'}", [TASK, "button-press-topdown-v3"]
    for task in tasks:
        env = EnvConfig(task=task, cameras=("corner2",), width=48, height=48, max_episode_steps=30)
        run_collection(
            CollectConfig(env=env, policy="scripted", noise=0.1, episodes=2, store_url=url, run_id=task),
            progress=False,
        )
    store, selection = ExperienceStore(url), EpisodeQuery(tasks=tasks)
    config = BCConfig(
        env=EnvSettings(image_size=48, max_episode_steps=30), steps=3, batch_size=8, eval_episodes=1
    )
    trained = train_vla(store, selection, config, tmp_path, progress=False)
    assert [row["version"] for row in store.policy_versions() if row["kind"] == "vla"] == [trained.version]
    assert [(e.task, e.n) for e in trained.evaluations] == [(task, 1) for task in tasks]
    assert [(e.task, e.policy_version) for e in store.list_evaluations()] == [
        (task, trained.version) for task in tasks
    ]
    dataset = build_dataset(to_episode_arrays(load_training_episodes(store, selection)), 10)
    assert set(dataset.prompts) == {task_prompt(task) for task in tasks}
    observation = {"images": {"corner2": dataset.images["corner2"][:1]}, "state": dataset.state[:1]}
    noise = np.random.default_rng(0).normal(size=(1, 10, dataset.actions.shape[2])).astype(np.float32)
    reach, press = (
        trained.policy.infer({**observation, "prompt": [task_prompt(task)]}, noise=noise).actions
        for task in tasks
    )
    assert not np.allclose(reach, press)


def test_train_bc_cli_trains_registers_and_evaluates_every_k_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'cli-bc.db'}"
    env = EnvConfig(task=TASK, cameras=("corner2",), width=48, height=48, max_episode_steps=30)
    run_collection(
        CollectConfig(env=env, policy="scripted", noise=0.1, episodes=2, store_url=url, run_id="demos"),
        progress=False,
    )
    runner = CliRunner()
    base = ["train", "bc", "--task", TASK, "--db", url, "--image-size", "48", "--steps", "2"]
    base += ["--batch-size", "4", "--eval-episodes", "1", "--max-episode-steps", "30", "--seed", "0"]
    too_sparse = runner.invoke(app, [*base, "--eval-every", "3"], env={"COLUMNS": "200"})
    assert too_sparse.exit_code == 2 and "eval_every: expected at most steps=2" in too_sparse.output
    result = runner.invoke(app, [*base, "--eval-every", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    store = ExperienceStore(url)
    [registered] = [row for row in store.policy_versions() if row["kind"] == "vla"]
    assert f"trained on 2 episodes → {registered['version']} at" in result.output
    assert registered["uri"].startswith(str((tmp_path / "home").resolve()))
    assert registered["metadata"]["bc_config"]["eval_every"] == 1
    assert registered["metadata"]["bc_config"]["env"]["max_episode_steps"] == 30
    assert [(e.task, e.n) for e in store.list_evaluations(policy_version=registered["version"])] == [
        (TASK, 1)
    ]
    assert [point["step"] for point in registered["metadata"]["evaluation_curve"]] == [1, 2]
    [logged] = _logged_runs("train-bc")  # MLflow: the embedded tracking store beside the data folder
    assert logged.data.tags["policy_version"] == registered["version"]
    assert logged.data.params["bc.steps"] == "2" and logged.data.metrics[f"{TASK}/n"] == 1


def _logged_runs(command: str) -> list:
    """The runs ``flywheel <command>`` logged to the configured tracking store."""
    client = MlflowClient(default_mlflow_uri())
    experiment = client.get_experiment_by_name(f"flywheel/{command}")
    assert experiment is not None, f"flywheel {command} logged no run"
    return client.search_runs([experiment.experiment_id])


def _tiny_prior(store: ExperienceStore, output_dir) -> TrainedPolicy:
    """A few BC steps on the demos (no evaluation): the prior the RECAP tests improve."""
    selection = EpisodeQuery(tasks=[TASK], run_ids=["demos"])
    return train_vla(
        store, selection, TINY_BC.model_copy(update={"eval_episodes": 0}), output_dir, progress=False
    )


def test_one_recap_iteration_end_to_end(demo_store, tmp_path):
    store, url = demo_store
    prior = _tiny_prior(store, tmp_path)
    config = RecapIterationConfig(
        task=TASK,
        policy=prior.version,
        store_url=url,
        collect_episodes=4,
        human=SimulatedHumanConfig(no_progress_steps=5, takeover_steps=8),
        relabel=RelabelConfig(value=ValueConfig(train_steps=30, hidden_dim=32, inputs="privileged")),
        bc=TINY_BC.model_copy(update={"condition_dropout": 0.3, "eval_episodes": 0}),
        eval_episodes=2,
    )
    result = run_recap_iteration(config, tmp_path, progress=False)
    assert result.collection.episodes == 4
    stored = store.load_relabel(result.relabel.relabel_id)
    assert len(stored.labels) == store.count_episodes(task=TASK) - store.count_episodes(
        task=TASK, outcome="error"
    )
    human_steps = 0
    for labels in stored.labels:  # interventions are always positive
        episode = store.load_episode(labels.episode_uuid, images=False)
        human = episode.sources == 1
        human_steps += int(human.sum())
        assert labels.indicators[human].all()
    assert human_steps > 0
    versions = {row["version"]: row for row in store.policy_versions()}
    assert versions[result.trained.version]["parent"] == prior.version
    assert (
        result.before.policy_version == prior.version
        and result.after.policy_version == result.trained.version
    )
    assert summarize([], TASK, "none").n == 0


def test_collect_cli_rejects_bad_settings_with_one_line(tmp_path):
    runner = CliRunner()
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    base = ["collect", "--task", "reach-v3", "--episodes", "1", "--no-images", "--db", db]
    bad_mode = runner.invoke(app, [*base, "--execution", "warp"])
    assert bad_mode.exit_code == 2 and "mode" in bad_mode.output
    too_long_delay = runner.invoke(app, [*base, "--execution", "rtc", "--delay", "2"])
    assert too_long_delay.exit_code == 2 and "s + d <= H" in too_long_delay.output
    unknown = runner.invoke(app, [*base, "--policy", "no-such-policy"])
    assert unknown.exit_code == 2 and "no-such-policy" in unknown.output
    typo = runner.invoke(app, ["collect", "--task", "pick-plase-v3", "--db", db])
    assert typo.exit_code == 2 and "pick-place-v3" in typo.output
    assert ExperienceStore(db).count_episodes() == 0


def test_recap_iterate_cli_retrains_from_the_pretrained_checkpoint(demo_store, tmp_path, monkeypatch):
    store, url = demo_store
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    prior = _tiny_prior(store, tmp_path)
    runner = CliRunner()
    base = ["recap", "iterate", "--task", TASK, "--policy", prior.version, "--db", url, "--image-size", "48"]
    base += ["--episodes", "2", "--steps", "3", "--eval-episodes", "1", "--value-steps", "20"]
    too_short = runner.invoke(app, [*base, "--max-episode-steps", "30"], env={"COLUMNS": "200"})
    assert too_short.exit_code == 2 and "error: episode" in too_short.output
    assert "exceeds max_episode_length 30" in too_short.output
    base += ["--max-episode-steps", "40"]
    missing = runner.invoke(app, [*base, "--retrain-from", "no-such-version"], env={"COLUMNS": "200"})
    assert missing.exit_code == 2 and missing.output.startswith(
        "error: --retrain-from: policy 'no-such-version'"
    )
    result = runner.invoke(app, [*base, "--retrain-from", prior.version], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    retrained = [row for row in store.policy_versions() if row["parent"] == prior.version]
    registered = next(row["uri"] for row in store.policy_versions() if row["version"] == prior.version)
    assert (
        retrained and retrained[-1]["metadata"]["init_from"] == registered
    )  # identical weights share a version
    assert retrained[-1]["metadata"]["bc_config"]["steps"] == 3
    [logged] = _logged_runs("recap-iterate")
    assert logged.data.tags["policy_version"] == retrained[-1]["version"]
    assert logged.data.params["task"] == TASK and logged.data.metrics["after/n"] == 1
