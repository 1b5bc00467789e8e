"""One outcome rule (``core.types.episode_outcome``) for every episode writer: success wins, a time limit is
TRUNCATED, an env that ends the episode without success is FAILURE — checked on the rule itself and on what the
rollout worker and the robot runtime record for the same situations."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from actors.robot import StepFeedback
from actors.robot_runtime import ChunkReply, RobotRuntime, RuntimeConfig
from actors.rollout import RolloutWorker
from actors.sinks import StoreSink
from core.types import ActionChunk, Outcome, episode_outcome, monte_carlo_returns
from envs import EnvConfig, make_env
from storage import ExperienceStore
from storage.spool import EpisodeSpool

TASK = "reach-v3"


@pytest.mark.parametrize(
    ("success", "terminated", "truncated", "outcome"),
    [
        (True, False, False, Outcome.SUCCESS),
        (True, False, True, Outcome.SUCCESS),
        (False, False, True, Outcome.TRUNCATED),
        (False, True, False, Outcome.FAILURE),
        (False, True, True, Outcome.FAILURE),
        (False, False, False, Outcome.FAILURE),
    ],
)
def test_the_rule(success: bool, terminated: bool, truncated: bool, outcome: Outcome) -> None:
    assert episode_outcome(success, terminated, truncated) == outcome


def test_monte_carlo_returns_discounted_and_not() -> None:
    rewards = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(monte_carlo_returns(rewards), [6.0, 5.0, 3.0])
    np.testing.assert_allclose(monte_carlo_returns(rewards, 0.5), [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])


class StandStill:
    """A policy that never moves: a Meta-World episode can only end at its time limit."""

    version, action_horizon, action_dim = "still-v1", 4, 4

    def infer(self, batch: dict) -> ActionChunk:
        return ActionChunk(np.zeros((len(batch["prompt"]), self.action_horizon, self.action_dim), np.float32))

    def reset(self) -> None:
        pass


def test_rollout_worker_records_a_time_limit_as_truncated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rule.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    store.register_policy_version(StandStill.version, kind="scripted")
    factory = functools.partial(make_env, EnvConfig(task=TASK, render=False, max_episode_steps=6), None)
    stats = RolloutWorker([factory], StandStill(), StoreSink(url), task=TASK, seed=0).run(episodes=1)
    (episode,) = [store.load_episode(uuid, images=False) for uuid in stats.episode_uuids]
    assert (episode.length, bool(episode.truncated[-1]), episode.outcome) == (6, True, Outcome.TRUNCATED)


class ScriptedRobot:
    """A robot whose every step reports the same feedback (no simulator)."""

    action_dim = 4

    def __init__(self, feedback: StepFeedback) -> None:
        self.feedback = feedback

    def reset(self, seed: int | None = None) -> dict:
        return self.observe()

    def observe(self) -> dict:
        return {"images": {}, "state": np.zeros(4, np.float32), "prompt": "stand still"}

    def act(self, action: np.ndarray) -> StepFeedback:
        return self.feedback

    def e_stop(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("feedback", "outcome"),
    [
        (StepFeedback(), Outcome.TRUNCATED),  # ran to the runtime's max_steps
        (StepFeedback(terminated=True), Outcome.FAILURE),
        (StepFeedback(success=True, terminated=True), Outcome.SUCCESS),
    ],
)
def test_robot_runtime_follows_the_rule(tmp_path: Path, feedback: StepFeedback, outcome: Outcome) -> None:
    chunks = lambda observation, rtc=None: ChunkReply(np.zeros((4, 4), np.float32), "still-v1", 1.0)  # noqa: E731
    config = RuntimeConfig(rate_hz=500.0, max_steps=5, mode="sync", record_images=False)
    runtime = RobotRuntime(
        ScriptedRobot(feedback), chunks, EpisodeSpool(tmp_path / "spool.db"), config, task=TASK, env_id="test"
    )
    try:
        record = runtime.run_episode(seed=0).record
    finally:
        runtime.close()
    assert record.outcome == outcome
