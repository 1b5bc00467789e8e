"""Rollout worker in-process: episodes land in the store whole, with provenance, versions and chunk bookkeeping."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
from typer.testing import CliRunner

from actors.execution import ExecutionConfig
from actors.rollout import RolloutWorker
from actors.sinks import StoreSink
from envs import EnvConfig, SimulatedHumanConfig, make_env
from envs.scripted import ScriptedPolicy
from experiments.cli import app
from storage import ExperienceStore, Outcome, StepSource

STATE_ONLY = EnvConfig(task="reach-v3", render=False, max_episode_steps=60)


@pytest.fixture
def store_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'rollout.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    return url


def _worker(
    store_url: str, policy, *, env_config=STATE_ONLY, human=None, envs=2, factory=None
) -> RolloutWorker:
    store = ExperienceStore(store_url)
    store.register_policy_version(policy.version, kind="scripted")
    env_factory = factory or functools.partial(make_env, env_config, human)
    return RolloutWorker([env_factory] * envs, policy, StoreSink(store_url), task=env_config.task, seed=3)


def test_worker_commits_whole_episodes_with_chunk_bookkeeping(store_url):
    policy = ScriptedPolicy("reach-v3", action_horizon=5, version="expert-h5")
    stats = _worker(store_url, policy).run(episodes=4)
    store = ExperienceStore(store_url)
    assert stats.episodes == 4 == store.count_episodes()
    for uuid in stats.episode_uuids:
        episode = store.load_episode(uuid)
        assert episode.outcome in (Outcome.SUCCESS, Outcome.FAILURE)
        assert episode.length == len(episode.states) > 0
        assert set(episode.policy_versions) == {"expert-h5"}
        # every executed action is the chunk's action at the recorded offset
        np.testing.assert_allclose(
            episode.actions, episode.chunks[episode.chunk_ids, episode.chunk_offsets], atol=1e-6
        )
        assert np.all(episode.chunk_offsets < 5)
        assert episode.chunks.shape[1:] == (5, 4)
        assert episode.privileged is not None and episode.privileged.shape == (episode.length, 39)


def test_worker_records_intervention_provenance(store_url):
    class StandStill(ScriptedPolicy):
        """A policy that never moves: the simulated human must take over."""

        def infer(self, batch):
            chunk = super().infer(batch)
            chunk.actions[:] = 0.0
            return chunk

    human = SimulatedHumanConfig(no_progress_steps=5, takeover_steps=10)
    worker = _worker(store_url, StandStill("reach-v3", version="still"), human=human, envs=1)
    stats = worker.run(episodes=2)
    store = ExperienceStore(store_url)
    assert stats.human_steps > 0
    for uuid in stats.episode_uuids:
        episode = store.load_episode(uuid, images=False)
        human_steps = episode.sources == StepSource.HUMAN
        assert human_steps.any() and episode.interventions
        for segment in episode.interventions:
            assert np.all(human_steps[segment.t_start : segment.t_end])
        assert human_steps.sum() == sum(s.t_end - s.t_start for s in episode.interventions)
        # human steps come from no chunk and carry no policy version
        assert np.all(episode.chunk_ids[human_steps] == -1)
        assert all(episode.policy_versions[t] is None for t in np.flatnonzero(human_steps))
        assert np.all(episode.actions[~human_steps] == 0.0)


def test_new_policy_version_applies_at_chunk_boundaries(store_url):
    first = ScriptedPolicy("reach-v3", action_horizon=4, version="v-old")
    worker = _worker(store_url, first, envs=2)
    ExperienceStore(store_url).register_policy_version("v-new", kind="scripted")
    worker.run(env_steps=10)  # episodes are mid-way when the new version arrives
    worker.set_policy(ScriptedPolicy("reach-v3", action_horizon=4, version="v-new"))
    stats = worker.run(episodes=4)
    store = ExperienceStore(store_url)
    mixed = 0
    for uuid in stats.episode_uuids:
        episode = store.load_episode(uuid, images=False)
        versions = np.array(episode.policy_versions)
        switches = np.flatnonzero(versions[1:] != versions[:-1]) + 1
        for t in switches:
            assert versions[t - 1] == "v-old" and versions[t] == "v-new"
            assert episode.chunk_offsets[t] == 0, "a version may only change at a chunk boundary"
        mixed += len(switches)
    assert mixed >= 1


class _RaisesAfter(gym.Wrapper):
    """An env that breaks down after ``steps`` steps of its first episode."""

    def __init__(self, env: gym.Env, steps: int) -> None:
        super().__init__(env)
        self.steps = steps
        self.count = 0

    def step(self, action):
        self.count += 1
        if self.count == self.steps:
            raise RuntimeError("motor driver fault")
        return self.env.step(action)


def test_raising_env_is_recorded_as_error_and_worker_goes_on(store_url):
    factory = functools.partial(lambda: _RaisesAfter(make_env(STATE_ONLY), steps=7))
    worker = _worker(store_url, ScriptedPolicy("reach-v3"), envs=1, factory=factory)
    stats = worker.run(episodes=3)
    store = ExperienceStore(store_url)
    errors = store.list_episodes(outcome="error")
    assert stats.errors == 1 and len(errors) == 1
    broken = store.load_episode(errors[0].uuid, images=False)
    assert broken.length == 6 and "motor driver fault" in broken.error
    assert store.count_episodes(outcome="success") == 2


def test_version_switch_under_async_execution_happens_at_a_chunk_switch(store_url):
    execution = ExecutionConfig(mode="naive_async", delay=1, execute_horizon=2)
    store = ExperienceStore(store_url)
    for version in ("a-old", "a-new"):
        store.register_policy_version(version, kind="scripted")
    factory = functools.partial(make_env, STATE_ONLY)
    worker = RolloutWorker(
        [factory] * 2,
        ScriptedPolicy("reach-v3", action_horizon=4, version="a-old"),
        StoreSink(store_url),
        task="reach-v3",
        seed=4,
        execution=execution,
    )
    worker.run(env_steps=9)
    worker.set_policy(ScriptedPolicy("reach-v3", action_horizon=4, version="a-new"))
    stats = worker.run(episodes=3)
    switches = 0
    for uuid in stats.episode_uuids:
        episode = store.load_episode(uuid, images=False)
        versions = np.array(episode.policy_versions)
        for t in np.flatnonzero(versions[1:] != versions[:-1]) + 1:
            assert episode.chunk_ids[t] != episode.chunk_ids[t - 1], "a version changes only with the chunk"
            switches += 1
        later = episode.chunk_ids > np.min(episode.chunk_ids[episode.chunk_ids >= 0])
        assert set(episode.chunk_offsets[later]) <= {1, 2}, "async chunks run at offsets d..s+d-1"
        assert episode.metadata["execution_mode"] == "naive_async"
    assert switches >= 1


def test_rebuilt_worker_commits_the_open_episodes_its_predecessor_journaled(store_url, tmp_path):
    policy = ScriptedPolicy("reach-v3", action_horizon=3, version="journaled")
    ExperienceStore(store_url).register_policy_version(policy.version, kind="scripted")
    build = functools.partial(
        RolloutWorker,
        [functools.partial(make_env, STATE_ONLY)] * 2,
        policy,
        StoreSink(store_url),
        task="reach-v3",
        journal_dir=str(tmp_path / "journal"),
    )
    first = build()
    assert first.recovered_episodes == 0
    first.run(env_steps=20)  # both envs are 10 steps into their first episode; `first` is never closed
    second = build()  # what Ray does after the process died: the same worker id, rebuilt from its arguments
    store = ExperienceStore(store_url)
    errors = store.list_episodes(outcome="error")
    assert second.recovered_episodes == 2 == len(errors) == store.count_episodes()
    for summary in errors:
        assert "rollout worker 0" in summary.error and "died mid-episode" in summary.error
        episode = store.load_episode(summary.uuid, images=False)
        # journaled at the chunk boundary before step 10: steps 0..8 (three chunks of 3)
        assert episode.length == 9 and episode.truncated[-1] and not episode.terminated.any()
        np.testing.assert_allclose(
            episode.actions, episode.chunks[episode.chunk_ids, episode.chunk_offsets], atol=1e-6
        )
    assert build().recovered_episodes == 0, "recovered episodes leave the journal"
    second.run(episodes=2)
    second.close()
    assert build().recovered_episodes == 0, "finished and abandoned episodes are not recovered"
    assert store.count_episodes() == 4


def test_collect_cli_to_an_env_step_target(tmp_path):
    db = f"sqlite:///{tmp_path / 'steps.db'}"
    args = ["collect", "--task", "reach-v3", "--no-images", "--db", db, "--run-id", "steps"]
    both = CliRunner().invoke(app, [*args, "--episodes", "2", "--env-steps", "50"])
    assert both.exit_code == 2 and "not both" in both.output
    in_process = CliRunner().invoke(app, [*args, "--episodes", "2", "--on-worker-death", "record"])
    assert in_process.exit_code == 2 and "needs Ray workers" in in_process.output
    result = CliRunner().invoke(app, [*args, "--env-steps", "120"])
    assert result.exit_code == 0, result.output
    assert "step/s" in result.output, "the progress bar counts env steps"
    summaries = ExperienceStore(db).list_episodes(run_id="steps")
    committed = sum(s.length for s in summaries)
    # episodes are committed whole: the target is passed by less than one episode of the single env
    assert 120 <= committed < 120 + max(s.length for s in summaries)
    assert f"({committed} steps)" in result.output
