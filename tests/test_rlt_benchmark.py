"""``benchmarks/rlt_sample_efficiency.py`` (issue 19 item 4): priors with a systematic error and the hand-off at
the grasp approach."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.scripted import ScriptedPolicy
from policies.base import stack_observations

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("rlt_sample_efficiency")


def test_prior_bias_goes_where_the_task_names_it_and_the_goal_bias_stays_an_x_shift():
    config = bench.BenchmarkConfig(task="pick-place-v3", prior_bias=0.015)
    assert bench.make_prior(config, 0).policy.biases == {"object_bias": (0.015, 0.0, 0.0), "goal_bias": None}
    assert bench.bias_vectors("goal:-y", 0.01) == {"goal_bias": (0.0, -0.01, 0.0)}
    with pytest.raises(ValueError, match="prior bias"):
        bench.bias_vectors("hand:+x", 0.01)
    # --prior-goal-bias (the reach-v3 goal-biased runs): the prior sees the goal 8 mm further along x, as before
    reach = bench.BenchmarkConfig(task="reach-v3", prior_goal_bias=0.008, prior_noise=0.0, chunk_size=1)
    observation = bench.make_env(reach).reset(seed=5)[0]
    shifted = dict(observation, privileged=observation["privileged"].copy())
    shifted["privileged"][36] += 0.008
    chunk = bench.make_prior(reach, 0).policy.infer(stack_observations([observation])).actions
    expected = ScriptedPolicy("reach-v3").infer(stack_observations([shifted])).actions
    assert np.array_equal(chunk, expected)


def test_precision_handoff_fires_in_every_biased_rollout_within_a_chunk_of_the_grasp_approach():
    config = bench.BenchmarkConfig(task="pick-place-v3", prior_bias=0.015, episode_steps=150)
    check = bench.handoff_check(config, episodes=3)
    assert check["fired"] == 3
    assert abs(check["median_lag"]) <= config.chunk_size
