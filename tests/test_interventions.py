"""Simulated human interventions: triggers, provenance of every step, segments, and replaceable teleop devices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from pydantic import ValidationError

from core.teleop import TakeoverSegments
from core.types import InterventionSegment, StepSource
from envs import (
    EnvConfig,
    InterventionWrapper,
    MetaWorldEnv,
    ScriptedExpert,
    SimulatedHuman,
    SimulatedHumanConfig,
    TeleopCommand,
    TeleopContext,
    TeleopDevice,
    make_env,
)

ZERO = np.zeros(4, dtype=np.float32)


@dataclass
class Episode:
    """What one episode under the wrapper produced, step by step."""

    sources: list[int] = field(default_factory=list)
    executed: list[np.ndarray] = field(default_factory=list)
    proposed: list[np.ndarray] = field(default_factory=list)
    triggers: list[str | None] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)
    success: bool = False


def run_episode(env, seed: int, policy=lambda obs: ZERO) -> Episode:
    """One episode in ``env`` with ``policy`` (observation → action)."""
    episode = Episode()
    obs, _ = env.reset(seed=seed)
    while True:
        action = policy(obs)
        obs, _, terminated, truncated, info = env.step(action)
        episode.sources.append(info["source"])
        episode.executed.append(info["executed_action"])
        episode.proposed.append(info["policy_action"])
        episode.triggers.append(info["intervention_trigger"])
        if terminated or truncated:
            episode.segments, episode.success = info["interventions"], info["success"]
            return episode


def assert_provenance_is_consistent(episode: Episode) -> None:
    """Sources, executed actions and segments tell the same story."""
    human_steps = {t for s in episode.segments for t in range(s["t_start"], s["t_end"])}
    assert human_steps == {t for t, source in enumerate(episode.sources) if source == StepSource.HUMAN}
    for first, second in zip(episode.segments, episode.segments[1:], strict=False):
        assert first["t_end"] < second["t_start"], "segments are disjoint and separated by policy steps"
    for t, source in enumerate(episode.sources):
        if source == StepSource.POLICY:
            np.testing.assert_array_equal(episode.executed[t], episode.proposed[t])
            assert episode.triggers[t] is None
        else:
            assert episode.triggers[t] is not None


def test_zero_policy_gets_no_progress_takeovers_that_make_it_succeed():
    config = EnvConfig(task="push-v3", render=False)
    human = SimulatedHumanConfig(no_progress_steps=15, takeover_steps=20, seed=3)
    watched = make_env(config, human)
    alone = MetaWorldEnv(config)
    try:
        with_human = [run_episode(watched, seed) for seed in range(4)]
        without = []
        for seed in range(4):
            alone.reset(seed=seed)
            for _ in range(alone.max_episode_steps):
                *_, terminated, truncated, info = alone.step(ZERO)
                if terminated or truncated:
                    break
            without.append(info["success"])
    finally:
        watched.close()
        alone.close()
    for episode in with_human:
        assert_provenance_is_consistent(episode)
        assert episode.segments and all(s["trigger"] == "no_progress" for s in episode.segments)
        assert episode.segments[0]["t_start"] == 15  # 15 steps without progress, then the human takes over
        assert all(s["t_end"] - s["t_start"] <= 20 for s in episode.segments)
        human_actions = [episode.executed[t] for t, src in enumerate(episode.sources) if src == StepSource.HUMAN]
        assert all(np.any(action != 0) for action in human_actions)
    assert np.mean([e.success for e in with_human]) >= np.mean(without) + 0.5


def test_random_trigger_fires_at_the_configured_rate():
    human = SimulatedHumanConfig(no_progress_steps=None, random_rate=0.1, takeover_steps=1, seed=5)
    env = make_env(EnvConfig(task="reach-v3", render=False, max_episode_steps=250), human)
    try:
        episodes = [run_episode(env, seed) for seed in range(4)]
    finally:
        env.close()
    sources = np.concatenate([e.sources for e in episodes])
    triggers = [t for e in episodes for t in e.triggers if t is not None]
    assert len(sources) >= 600 and set(triggers) == {"random"}
    # one human step per firing: the human share of steps estimates the per-step rate
    assert 0.07 <= np.mean(sources == StepSource.HUMAN) <= 0.13
    for episode in episodes:
        assert_provenance_is_consistent(episode)


def test_deviation_trigger_fires_only_for_a_policy_that_disagrees_with_the_expert():
    human = SimulatedHumanConfig(no_progress_steps=None, deviation_threshold=0.5, takeover_steps=5)
    env = make_env(EnvConfig(task="pick-place-v3", render=False, max_episode_steps=100), human)
    expert = ScriptedExpert("pick-place-v3")
    calls = []

    def opposing_at_first(obs):
        """Proposes the opposite of the expert for 3 steps, then agrees with it."""
        calls.append(1)
        sign = -1.0 if len(calls) <= 3 else 1.0
        return sign * expert.clean_action(obs["privileged"])

    try:
        agreeing = run_episode(env, 0, lambda obs: expert.clean_action(obs["privileged"]))
        corrected = run_episode(env, 0, opposing_at_first)
        opposing = run_episode(env, 0, lambda obs: -expert.clean_action(obs["privileged"]))
    finally:
        env.close()
    assert agreeing.segments == [] and agreeing.success
    assert corrected.segments == [{"t_start": 0, "t_end": 5, "trigger": "deviation"}] and corrected.success
    # a policy that keeps deviating is vetoed at every hand-back: one segment of contiguous human steps
    assert opposing.segments == [{"t_start": 0, "t_end": len(opposing.sources), "trigger": "deviation"}]
    for episode in (corrected, opposing):
        assert_provenance_is_consistent(episode)


def test_release_grip_lets_the_human_regrasp_after_the_policy_closed_the_gripper():
    """Pick-place: the policy closes the gripper beside the object; the human takes over from step 10 on. The
    Meta-World expert never opens a gripper (grab effort 0 away from the object), so only with ``release_grip``
    can it pick the object up."""
    closing = np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)
    outcomes = {}
    for release in (False, True):
        human = SimulatedHumanConfig(
            no_progress_steps=None, random_rate=1.0, late_after_step=10, takeover_steps=200, release_grip=release
        )
        env = make_env(EnvConfig(task="pick-place-v3", render=False, max_episode_steps=150), human)
        try:
            episodes = [run_episode(env, seed, lambda obs: closing) for seed in range(2)]
        finally:
            env.close()
        for episode in episodes:
            assert_provenance_is_consistent(episode)
            assert episode.segments[0]["t_start"] == 10
            human_efforts = [episode.executed[t][3] for t, src in enumerate(episode.sources) if src]
            assert (min(human_efforts) == -1.0) == release  # the released grip is in the stored action
        outcomes[release] = [episode.success for episode in episodes]
    assert outcomes == {False: [False, False], True: [True, True]}


def test_a_takeover_running_at_episode_end_is_closed_there():
    human = SimulatedHumanConfig(no_progress_steps=5, takeover_steps=100)
    env = make_env(EnvConfig(task="push-v3", render=False, max_episode_steps=30), human)
    try:
        episode = run_episode(env, 0)
    finally:
        env.close()
    assert episode.segments == [{"t_start": 5, "t_end": len(episode.sources), "trigger": "no_progress"}]
    assert_provenance_is_consistent(episode)


@dataclass
class ScriptedKeyboard:
    """A stand-in for a real teleop device: holds a key from step ``start`` to ``end`` (exclusive)."""

    start: int
    end: int
    action: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0, -1.0], dtype=np.float32))
    resets: int = 0

    def reset(self, seed: int | None = None) -> None:
        self.resets += 1

    def poll(self, context: TeleopContext) -> TeleopCommand | None:
        if self.start <= context.t < self.end:
            return TeleopCommand(takeover=True, action=self.action * 2.0, reason="keyboard")
        return TeleopCommand(takeover=False)


def test_any_teleop_device_can_replace_the_simulated_human():
    keyboard = ScriptedKeyboard(start=3, end=7)
    assert isinstance(keyboard, TeleopDevice) and isinstance(SimulatedHuman("reach-v3"), TeleopDevice)
    env = InterventionWrapper(
        MetaWorldEnv(EnvConfig(task="reach-v3", render=False, max_episode_steps=10)), keyboard
    )
    try:
        policy_action = np.array([0.3, 0.0, 0.0, 0.0], dtype=np.float32)
        episode = run_episode(env, 0, lambda obs: policy_action)
    finally:
        env.close()
    assert keyboard.resets == 1
    assert episode.segments == [{"t_start": 3, "t_end": 7, "trigger": "keyboard"}]
    assert episode.sources == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(episode.executed[4], [0.0, 0.0, 1.0, -1.0])  # clipped to the action space
    np.testing.assert_array_equal(episode.executed[8], policy_action)
    assert_provenance_is_consistent(episode)


def test_bad_devices_and_configs_are_rejected_with_the_field_named():
    env = MetaWorldEnv(EnvConfig(task="reach-v3", render=False))
    with pytest.raises(TypeError, match="device: expected a TeleopDevice"):
        InterventionWrapper(env, object())

    class SilentTakeover:
        def reset(self, seed=None):
            pass

        def poll(self, context):
            return TeleopCommand(takeover=True)

    wrapper = InterventionWrapper(env, SilentTakeover())
    wrapper.reset(seed=0)
    with pytest.raises(ValueError, match=r"TeleopCommand\.action"):
        wrapper.step(ZERO)
    env.close()
    with pytest.raises(ValidationError, match="random_rate"):
        SimulatedHumanConfig(random_rate=1.5)
    with pytest.raises(ValidationError, match="takeover_steps"):
        SimulatedHumanConfig(takeover_steps=0)


def test_takeover_segments_open_close_and_report_an_open_one_up_to_now() -> None:
    segments = TakeoverSegments()
    segments.start(3, "stall")
    segments.start(4, "other")  # already open: the first reason stays
    assert segments.until(6) == [InterventionSegment(3, 6, "stall")]
    segments.stop(7)
    segments.stop(8)  # nothing open: no empty segment
    segments.start(10, "near")
    assert segments.closed == [InterventionSegment(3, 7, "stall")]
    assert segments.until(12) == [InterventionSegment(3, 7, "stall"), InterventionSegment(10, 12, "near")]
