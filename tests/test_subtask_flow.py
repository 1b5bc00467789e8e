"""Subtasks from store to training to rollout and back: provenance, human corrections, the CLI, failure phases."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from actors.recorder import EpisodeRecorder, source_segments, subtask_sources
from envs import EnvConfig, EnvSettings, InterventionWrapper, SimulatedHuman, SimulatedHumanConfig, make_env
from envs.experts import expert_phases
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from experiments.context import (
    DESIRED_METADATA,
    SubtaskTrainConfig,
    phase_outcomes,
    subtask_labels,
    train_hierarchical,
)
from experiments.policy_loader import load
from experiments.training import BCConfig
from policies.hierarchical import HierarchicalPolicy, load_hierarchical
from storage import EpisodeQuery, ExperienceStore, Outcome, StepSource

TASK = "pick-place-v3"
runner = CliRunner()


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two scripted pick-place demos (48 px) labelled with the expert's phases, in a SQLite store."""
    root = tmp_path_factory.mktemp("subtasks")
    url = f"sqlite:///{root / 'store.db'}"
    env = EnvConfig(task=TASK, width=48, height=48, max_episode_steps=60)
    run_collection(
        CollectConfig(
            env=env, policy="scripted", episodes=2, store_url=url, run_id="demos", subtask_labels=True
        ),
        progress=False,
    )
    return root, url, env


def test_source_segments_round_trip_through_the_recorder():
    assert source_segments([None, "policy", "policy", "human", None, "policy"]) == [
        {"source": "policy", "t_start": 1, "t_end": 3},
        {"source": "human", "t_start": 3, "t_end": 4},
        {"source": "policy", "t_start": 5, "t_end": 6},
    ]
    recorder = EpisodeRecorder(task=TASK, env_id="e", seed=0, record_images=False)
    observation = {"images": {}, "state": np.zeros(3, np.float32)}
    labels = [("reach", "policy"), (None, None), ("grasp", "human"), ("grasp", "policy")]
    for subtask, source in labels:
        step_source = StepSource.HUMAN if source == "human" else StepSource.POLICY
        recorder.add_step(
            observation, np.zeros(4, np.float32), 0.0, False, False, source=step_source,
            policy_version=None, chunk_id=-1, chunk_offset=-1, latency_ms=0.0,
            subtask=subtask, subtask_source=source,
        )  # fmt: skip
    record = recorder.finish(Outcome.FAILURE)
    assert record.subtasks == ["reach", None, "grasp", "grasp"]
    assert subtask_sources(record) == ["policy", None, "human", "policy"]
    with pytest.raises(ValueError, match="subtask_source: expected a source exactly when"):
        recorder.add_step(
            observation, np.zeros(4, np.float32), 0.0, False, False, source=StepSource.POLICY,
            policy_version=None, chunk_id=-1, chunk_offset=-1, latency_ms=0.0, subtask="reach",
        )  # fmt: skip


def test_simulated_human_names_the_expert_phase_it_executes():
    env = InterventionWrapper(
        make_env(EnvConfig(task=TASK, render=False, max_episode_steps=30)),
        SimulatedHuman(TASK, SimulatedHumanConfig(no_progress_steps=None, random_rate=0.3, takeover_steps=3)),
    )
    observation, _ = env.reset(seed=3)
    seen = {StepSource.HUMAN: 0, StepSource.POLICY: 0}
    for _ in range(30):
        phase = expert_phases(TASK, observation["privileged"][None])[0]
        observation, _, terminated, truncated, info = env.step(np.zeros(4, np.float32))
        seen[info["source"]] += 1
        assert info["subtask"] == (phase if info["source"] == StepSource.HUMAN else None)
        if terminated or truncated:
            break
    assert seen[StepSource.HUMAN] > 0 and seen[StepSource.POLICY] > 0


def test_hierarchical_rollouts_record_both_levels_with_provenance_and_retrain(demos):
    root, url, env = demos
    store = ExperienceStore(url)
    stored = list(store.iter_episodes(run_id="demos"))
    assert all(subtask_sources(e) == ["expert_phase"] * e.length for e in stored)
    config = BCConfig(env=EnvSettings(image_size=48), steps=3, batch_size=4)
    selection = EpisodeQuery(tasks=[TASK], run_ids=["demos"])
    trained = train_hierarchical(
        store, selection, config, root, subtask=SubtaskTrainConfig(steps=3, history=2), progress=False
    )
    assert load_hierarchical(trained.checkpoint).high_level.history == 2
    assert {"version": trained.version, "kind": "hierarchical"}.items() <= {
        k: v for row in store.policy_versions() if row["version"] == trained.version for k, v in row.items()
    }.items()
    human = SimulatedHumanConfig(no_progress_steps=None, random_rate=0.15, takeover_steps=4, seed=1)
    run_collection(
        CollectConfig(
            env=env.model_copy(update={"max_episode_steps": 40}), policy=str(trained.checkpoint), episodes=2,
            store_url=url, run_id="rollouts", human=human,
        ),
        progress=False,
    )  # fmt: skip
    provenance = set()
    for episode in store.iter_episodes(run_id="rollouts"):
        assert episode.policy_version == trained.version
        phases = expert_phases(TASK, episode.privileged)
        for t, (subtask, source) in enumerate(zip(episode.subtasks, subtask_sources(episode), strict=True)):
            if episode.sources[t] == StepSource.HUMAN:
                assert (source, subtask) == ("human", phases[t]), "a human step stores the corrected subtask"
            else:
                assert source == "policy" and subtask in trained.subtasks
            provenance.add(source)
    assert provenance == {"policy", "human"}
    rollouts = EpisodeQuery(tasks=[TASK], run_ids=["rollouts"])
    retrained = train_hierarchical(
        store, rollouts, config, root, subtask=SubtaskTrainConfig(steps=2), progress=False
    )
    assert set(retrained.subtasks) <= set(trained.subtasks) | set(phases)


def test_labels_are_derived_from_expert_phases_when_not_stored(demos):
    _, url, _ = demos
    episode = next(ExperienceStore(url).iter_episodes(run_id="demos"))
    stored = list(episode.subtasks)
    episode.subtasks = None
    assert subtask_labels(episode) == stored
    episode.privileged = None
    with pytest.raises(ValueError, match="no stored subtasks and no privileged state"):
        subtask_labels(episode)


def test_phase_outcomes_of_expert_labelled_episodes(demos):
    _, url, _ = demos
    episodes = list(ExperienceStore(url).iter_episodes(run_id="demos"))
    for episode in episodes:
        episode.outcome = Outcome.FAILURE  # describe every episode as if it had failed
    where = phase_outcomes(episodes, TASK)
    assert where["failures"] == 2 and where["subtask_agreement"] == 1.0
    assert sum(where["furthest_phase"].values()) == sum(where["final_phase"].values()) == 2
    assert where["final_named_subtask"] == where["final_phase"]


def test_cli_trains_and_evaluates_hierarchical_and_metadata_policies(demos, tmp_path, monkeypatch):
    _, url, _ = demos
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    common = ["--task", TASK, "--run-id", "demos", "--steps", "2", "--batch-size", "4", "--image-size", "48"]
    common += ["--eval-episodes", "0", "--db", url]
    result = runner.invoke(app, ["train", "bc", *common, "--subtasks", "--subtask-steps", "2"])
    assert result.exit_code == 0, result.output
    store = ExperienceStore(url)
    version = next(r["version"] for r in reversed(store.policy_versions()) if r["kind"] == "hierarchical")
    assert version in result.output
    evaluate = ["train", "eval", "--task", TASK, "--db", url]
    evaluated = runner.invoke(
        app, [*evaluate, "--policy", version, "--episodes", "2", "--max-episode-steps", "10"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "failures 2" in evaluated.output and "named subtask = expert phase" in evaluated.output
    assert [e.n for e in store.list_evaluations(policy_version=version)] == [2]

    result = runner.invoke(app, ["train", "bc", *common, "--metadata"])
    assert result.exit_code == 0, result.output
    metadata_version = store.policy_versions()[-1]["version"]
    policy = load(metadata_version, task=TASK, store=store)
    assert policy.conditions == DESIRED_METADATA and not isinstance(policy, HierarchicalPolicy)
    evaluated = runner.invoke(
        app, [*evaluate, "--policy", metadata_version, "--episodes", "1", "--max-episode-steps", "5"]
    )
    assert evaluated.exit_code == 0, evaluated.output


def test_cli_rejects_bad_combinations_with_one_line(demos):
    _, url, _ = demos
    both = runner.invoke(app, ["train", "bc", "--task", TASK, "--metadata", "--subtasks", "--db", url])
    assert both.exit_code == 2 and "choose one condition per policy" in both.output
    missing = runner.invoke(
        app, ["train", "eval", "--policy", "no-such-version", "--task", TASK, "--db", url]
    )
    assert missing.exit_code == 2 and "no-such-version" in missing.output
    help_text = runner.invoke(app, ["train", "bc", "--help"]).output
    assert "--subtasks" in help_text and "--metadata" in help_text and "subtask-steps" in help_text
