"""RECAP advantages: N-step and Monte-Carlo estimates on hand-computed episodes, thresholds and indicators."""

from __future__ import annotations

import numpy as np
import pytest

from recap import AdvantageConfig, RewardConfig, monte_carlo_advantages, n_step_advantages, quantile_threshold
from recap.advantage import advantages, indicators, is_demonstration, task_thresholds, window_ends
from recap.rewards import step_rewards
from recap.synthetic import make_episode
from storage.records import EpisodeRecord, Outcome, StepSource


def episode(task: str, length: int, outcome: Outcome, human: tuple[int, ...] = ()) -> EpisodeRecord:
    sources = np.full(length, StepSource.POLICY, dtype=np.uint8)
    sources[list(human)] = StepSource.HUMAN
    return make_episode(task, np.zeros((length, 2)), np.zeros((length, 1)), outcome, sources=sources)


def test_n_step_advantage_matches_hand_computation() -> None:
    config = RewardConfig(max_episode_length=4, fail_penalty=4)  # return scale 8
    rewards = step_rewards(episode("t", 4, Outcome.SUCCESS), 4, config)
    values = np.array([-0.4, -0.3, -0.2, -0.1])
    # A_0 = r0 + r1 + V2 − V0; A_2 and A_3 run past the end: no bootstrap (terminal success).
    expected = [-0.25 - 0.2 + 0.4, -0.25 - 0.1 + 0.3, -0.125 + 0.2, 0.0 + 0.1]
    np.testing.assert_allclose(n_step_advantages(rewards, values, 2), expected)


def test_n_step_longer_than_episode_truncates_to_monte_carlo() -> None:
    config = RewardConfig(max_episode_length=4, fail_penalty=4)
    rewards = step_rewards(episode("t", 3, Outcome.FAILURE), 4, config)
    np.testing.assert_allclose(rewards, [-1 / 8, -1 / 8, -4 / 8])
    values = np.array([-0.7, -0.6, -0.45])
    expected = np.array([-6 / 8, -5 / 8, -4 / 8]) - values
    np.testing.assert_allclose(n_step_advantages(rewards, values, 50), expected)
    np.testing.assert_allclose(monte_carlo_advantages(rewards, values), expected)
    with pytest.raises(ValueError, match="episode length"):
        n_step_advantages(rewards, values[:2], 2)


@pytest.mark.parametrize("fraction", [0.3, 0.4, 0.75])
def test_quantile_threshold_gives_requested_positive_fraction(fraction: float) -> None:
    advantages = np.random.default_rng(0).normal(size=1001)
    threshold = quantile_threshold(advantages, fraction)
    assert (advantages > threshold).sum() == round(fraction * 1001)
    assert quantile_threshold(advantages, 0.9999) == float("-inf")
    assert quantile_threshold(np.array([]), 0.4) == float("inf")


def test_phase_defaults() -> None:
    assert (AdvantageConfig().estimator, AdvantageConfig().positive_fraction, AdvantageConfig().n_step) == (
        "n_step",
        0.4,
        None,
    )
    # N from the horizon: a tenth, clipped to [10, 25]; an explicit n_step wins.
    assert [AdvantageConfig().window(h) for h in (30, 100, 150, 200, 500)] == [10, 10, 15, 20, 25]
    assert AdvantageConfig(n_step=50).window(150) == 50
    pretrain = AdvantageConfig(phase="pretrain")
    assert (pretrain.estimator, pretrain.positive_fraction) == ("monte_carlo", 0.3)
    with pytest.raises(ValueError, match="positive_fraction"):
        AdvantageConfig(positive_fraction=1.5)


def test_interventions_forced_positive_and_excluded_from_threshold() -> None:
    rng = np.random.default_rng(1)
    episodes = [episode("t", 50, Outcome.SUCCESS, human=tuple(range(10, 20))) for _ in range(4)]
    advantages = [rng.normal(size=50) for _ in episodes]
    for values in advantages:
        values[10:20] = -100.0  # terrible advantages on human steps: still positive
    config = AdvantageConfig()
    thresholds = task_thresholds(episodes, advantages, config)
    flags = [
        indicators(ep, adv, thresholds["t"], config) for ep, adv in zip(episodes, advantages, strict=True)
    ]
    assert all(flag[10:20].all() for flag in flags)
    autonomous = np.concatenate([np.r_[flag[:10], flag[20:]] for flag in flags])
    assert autonomous.mean() == pytest.approx(0.4, abs=1 / autonomous.size)
    unforced = AdvantageConfig(interventions_positive=False)
    flags = indicators(episodes[0], advantages[0], thresholds["t"], unforced)
    assert not flags[10:20].any()


def test_windows_stop_at_the_episode_end_and_at_a_source_change() -> None:
    config = RewardConfig(max_episode_length=6, fail_penalty=6)  # return scale 12: r = −1/12 per step
    human = (2, 3)  # policy 0-1, human 2-3, policy 4-5
    ep = episode("t", 6, Outcome.FAILURE, human=human)
    rewards = step_rewards(ep, 6, config)
    r, fail = -1 / 12, -6 / 12
    np.testing.assert_allclose(rewards, [r, r, r, r, r, fail])
    values = np.array([-0.6, -0.5, -0.4, -0.3, -0.2, -0.1])
    np.testing.assert_array_equal(window_ends(6, 3, ep.sources), [2, 2, 4, 4, 6, 6])
    expected = [
        2 * r + values[2] - values[0],  # stops where the human takes over, bootstraps V there
        r + values[2] - values[1],
        2 * r + values[4] - values[2],  # the human's window stops where the policy resumes
        r + values[4] - values[3],
        r + fail - values[4],  # reaches the episode's end: the terminal reward, nothing bootstrapped
        fail - values[5],
    ]
    np.testing.assert_allclose(n_step_advantages(rewards, values, 3, ep.sources), expected)
    across = [3 * r + values[3] - values[0], 3 * r + values[4] - values[1]]  # today's windows run across
    np.testing.assert_allclose(n_step_advantages(rewards, values, 3)[:2], across)
    ignore = AdvantageConfig(n_step=3, stop_at_source_change=False)
    np.testing.assert_allclose(advantages(rewards, values, ignore, 6, ep.sources)[:2], across)
    np.testing.assert_allclose(
        advantages(rewards, values, AdvantageConfig(n_step=3), 6, ep.sources), expected
    )


def test_demonstrations_forced_positive_as_an_option() -> None:
    demo = episode("t", 8, Outcome.SUCCESS)
    demo.policy_version = "scripted-noise0.1"
    rollout = episode("t", 8, Outcome.SUCCESS, human=(6, 7))
    rollout.policy_version = "vla-abc"
    assert is_demonstration(demo) and not is_demonstration(rollout)
    assert is_demonstration(episode("t", 4, Outcome.SUCCESS, human=(0, 1, 2, 3)))  # all-human: a teleop demo
    values = [np.full(8, -5.0), np.linspace(-1, 1, 8)]  # the demo's advantages are terrible
    forced = AdvantageConfig(demonstrations_positive=True)
    thresholds = task_thresholds([demo, rollout], values, forced)
    assert indicators(demo, values[0], thresholds["t"], forced).all()
    flags = indicators(rollout, values[1], thresholds["t"], forced)
    # the threshold is taken over the rollout's own policy steps only
    assert flags[6:].all() and flags[:6].sum() == round(0.4 * 6)
    assert not indicators(demo, values[0], thresholds["t"], AdvantageConfig()).any()  # off by default
