"""Scripted experts and ``ScriptedPolicy``: success with images, the noise knob, phases, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from envs import EnvConfig, MetaWorldEnv, ScriptedExpert, expert_phases
from envs.scripted import ScriptedPolicy
from policies.base import Policy, stack_observations

# Every rendered step costs ~15 ms of CPU whatever the image size, so the default run uses five tasks whose clean
# expert finishes in 30-55 steps (docs/envs.md, MT50 table); the slow run adds longer ones.
EXPERT_TASKS = ("reach-v3", "pick-place-v3", "handle-press-v3", "coffee-button-v3", "door-unlock-v3")
LONGER_EXPERT_TASKS = ("push-v3", "drawer-open-v3", "button-press-topdown-v3")


def run_episodes(env: MetaWorldEnv, policy: ScriptedPolicy, seeds: range) -> list[bool]:
    """Run one episode per seed with ``policy``; return whether each succeeded."""
    outcomes = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        policy.reset()
        while True:
            chunk = policy.infer(stack_observations([obs])).actions[0]
            for action in chunk:
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
            if terminated or truncated:
                break
        assert_rendered(env, obs)
        outcomes.append(info["success"])
    return outcomes


def assert_rendered(env: MetaWorldEnv, obs: dict) -> None:
    """With rendering on, the observation carries a non-blank frame of the configured size per camera."""
    config = env.config
    if not config.render:
        return
    assert set(obs["images"]) == set(config.cameras)
    for image in obs["images"].values():
        assert image.shape == (config.height, config.width, 3) and image.std() > 5


def expert_successes(task: str, episodes: int, size: int) -> list[bool]:
    """Clean-expert outcomes of ``episodes`` seeded episodes with ``size``×``size`` ``corner2`` images."""
    env = MetaWorldEnv(EnvConfig(task=task, cameras=("corner2",), width=size, height=size, seed=0))
    try:
        return run_episodes(env, ScriptedPolicy(task), range(100, 100 + episodes))
    finally:
        env.close()


@pytest.mark.parametrize("task", EXPERT_TASKS)
def test_clean_expert_succeeds_at_least_9_of_10_with_image_observations(task):
    outcomes = expert_successes(task, episodes=10, size=32)
    assert sum(outcomes) >= 9, f"{task}: {sum(outcomes)}/10 expert successes with 32x32 images"


@pytest.mark.slow
@pytest.mark.parametrize("task", (*EXPERT_TASKS, *LONGER_EXPERT_TASKS))
def test_clean_expert_success_is_at_least_90_percent_over_20_episodes(task):
    rate = float(np.mean(expert_successes(task, episodes=20, size=64)))
    print(f"expert success with 64x64 images, {task}: {rate:.2f}")  # shown with -s: the figure for the docs
    assert rate >= 0.9


def test_action_noise_lowers_expert_quality():
    env = MetaWorldEnv(EnvConfig(task="push-v3", render=False, max_episode_steps=150))
    try:
        clean = run_episodes(env, ScriptedPolicy("push-v3", noise_std=0.0), range(8))
        noisy = run_episodes(env, ScriptedPolicy("push-v3", noise_std=1.0, seed=1), range(8))
    finally:
        env.close()
    assert np.mean(clean) >= 0.9
    assert np.mean(noisy) <= np.mean(clean) - 0.3


def test_expert_noise_is_seeded_clipped_and_zero_by_default():
    env = MetaWorldEnv(EnvConfig(task="pick-place-v3", render=False))
    obs, _ = env.reset(seed=0)
    env.close()
    privileged = obs["privileged"]
    clean = ScriptedExpert("pick-place-v3").act(privileged)
    np.testing.assert_array_equal(clean, ScriptedExpert("pick-place-v3").clean_action(privileged))
    draws = [ScriptedExpert("pick-place-v3", noise_std=2.0, seed=seed).act(privileged) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    assert all(d.dtype == np.float32 and np.all(np.abs(d) <= 1.0) for d in draws)
    with pytest.raises(ValueError, match="noise_std"):
        ScriptedExpert("pick-place-v3", noise_std=-0.1)


def test_expert_phases_follow_the_pick_place_script():
    env = MetaWorldEnv(EnvConfig(task="pick-place-v3", render=False))
    expert = ScriptedExpert("pick-place-v3")
    obs, _ = env.reset(seed=0)
    phases, states = [], []
    for _ in range(env.max_episode_steps):
        phases.append(expert.phase(obs["privileged"]))
        states.append(obs["privileged"])
        obs, _, terminated, truncated, _ = env.step(expert.act(obs["privileged"]))
        if terminated or truncated:
            break
    env.close()
    order = [phase for index, phase in enumerate(phases) if index == 0 or phases[index - 1] != phase]
    assert order == ["phase0", "phase1", "phase2", "phase3"]  # above puck, descend, grasp, carry to goal
    assert expert_phases("pick-place-v3", np.stack(states)) == phases  # offline relabelling of stored states
    assert ScriptedExpert("reach-v3").phase(obs["privileged"]) == "phase0"


def test_scripted_policy_implements_the_policy_contract():
    env = MetaWorldEnv(EnvConfig(task="push-v3", render=False))
    first, _ = env.reset(seed=0)
    second, _ = env.reset(seed=1)
    env.close()
    policy = ScriptedPolicy("push-v3", action_horizon=3)
    assert isinstance(policy, Policy) and policy.action_dim == 4
    chunk = policy.infer(stack_observations([first, second]))
    assert chunk.actions.shape == (2, 3, 4) and chunk.actions.dtype == np.float32
    expert = ScriptedExpert("push-v3")
    np.testing.assert_array_equal(chunk.actions[1, 2], expert.clean_action(second["privileged"]))
    assert "infer_ms" in chunk.timing
    by_prompt = ScriptedPolicy().infer(stack_observations([first]))
    np.testing.assert_array_equal(by_prompt.actions[0, 0], expert.clean_action(first["privileged"]))
    with pytest.raises(ValueError, match="privileged"):
        policy.infer({"images": {}, "state": np.zeros((1, 7), np.float32), "prompt": ["push"]})
    with pytest.raises(ValueError, match="action_horizon"):
        ScriptedPolicy("push-v3", action_horizon=0)


def test_object_bias_moves_the_grasp_target_by_the_bias_in_every_state():
    env = MetaWorldEnv(EnvConfig(task="pick-place-v3", render=False))
    state = env.reset(seed=3)[0]["privileged"].copy()
    bias = np.array([0.015, 0.0, 0.0], np.float32)
    offset = np.array([0.02, -0.01, 0.03], np.float32)  # 2.2 cm from the target in xy: "move above the puck"
    state[0:3] = state[4:7] + np.array([-0.005, 0.0, 0.1], np.float32) + bias + offset
    biased = ScriptedExpert("pick-place-v3", object_bias=tuple(bias))
    clean = ScriptedExpert("pick-place-v3")
    # Meta-World's pick-place expert: delta = 10 · (puck + (−0.005, 0, 0.1) − hand), the puck as it perceives it
    np.testing.assert_allclose(biased.clean_action(state)[:3], -10 * offset, atol=1e-5)
    np.testing.assert_allclose(clean.clean_action(state)[:3], -10 * (offset + bias), atol=1e-5)
    moved = state.copy()
    moved[4:7] += bias  # the same error as a moved object: the bias is consistent, not noise
    moved[22:25] += bias
    assert np.array_equal(biased.clean_action(state), clean.clean_action(moved))
    assert biased.phase(state) == clean.phase(moved)


def test_goal_bias_and_the_policy_version_name_the_systematic_error():
    state = MetaWorldEnv(EnvConfig(task="peg-insert-side-v3", render=False)).reset(seed=1)[0]["privileged"]
    moved = state.copy()
    moved[37] += np.float32(0.015)
    biased = ScriptedExpert("peg-insert-side-v3", goal_bias=(0.0, 0.015, 0.0))
    assert np.array_equal(biased.perceived(state), moved.astype(np.float64))
    assert ScriptedPolicy("peg-insert-side-v3", noise_std=0.1, goal_bias=(0, 0.015, 0)).version == (
        "scripted-noise0.1-goal-bias0,0.015,0"
    )
    assert ScriptedPolicy("peg-insert-side-v3", object_bias=(0, 0, 0)).version == "scripted-noise0"
    with pytest.raises(ValueError, match="object_bias"):
        ScriptedExpert("pick-place-v3", object_bias=(0.01, 0.0))
