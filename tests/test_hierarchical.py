"""High-level subtask model and the two-level policy over the built-in VLA."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from policies.base import stack_observations
from policies.hierarchical import HierarchicalPolicy, SubtaskInputError, train_subtask_model
from policies.training import EpisodeArrays, build_dataset, create_policy
from policies.vla.config import VLAConfig

PROMPT = "pick up the puck and place it at the goal"


def _samples(n: int = 200, seed: int = 0, size: int = 32):
    """Subtask is a function of the state (x < 0: 'reach', else 'place'); images carry no signal."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    images = np.full((n, size, size, 3), 128, dtype=np.uint8)  # no visual signal: the state decides
    labels = ["reach" if x < 0 else "place" for x in state[:, 0]]
    return images, state, [PROMPT] * n, labels


def test_subtask_model_learns_a_state_dependent_label():
    images, state, prompts, labels = _samples()
    model, losses = train_subtask_model(
        images, state, prompts, labels, camera="corner", steps=300, progress=False
    )
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    test_images, test_state, test_prompts, test_labels = _samples(100, seed=1)
    batch = {"images": {"corner": test_images}, "state": test_state, "prompt": test_prompts}
    accuracy = np.mean(np.array(model.predict(batch)) == np.array(test_labels))
    assert accuracy > 0.85


def test_bad_inputs_name_the_field():
    images, state, prompts, labels = _samples(20)
    model, _ = train_subtask_model(images, state, prompts, labels, camera="corner", steps=2, progress=False)
    with pytest.raises(SubtaskInputError, match="images: missing camera"):
        model.predict({"images": {"wrist": images}, "state": state, "prompt": prompts})
    with pytest.raises(SubtaskInputError, match="prompt: 'open the door'"):
        model.predict({"images": {"corner": images}, "state": state, "prompt": ["open the door"] * 20})
    with pytest.raises(SubtaskInputError, match="samples: expected equal"):
        train_subtask_model(images, state[:5], prompts, labels, camera="corner", progress=False)


def test_hierarchical_policy_conditions_the_vla_on_the_predicted_subtask():
    images, state, prompts, labels = _samples(40, size=48)
    high, _ = train_subtask_model(images, state, prompts, labels, camera="corner", steps=50, progress=False)
    episode = EpisodeArrays(
        images={"corner": images},
        state=state,
        actions=np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32),
        prompt=PROMPT,
        conditions=[f"subtask: {s}" for s in labels],
    )
    config = VLAConfig.preset("tiny", cameras=("corner",), image_size=48, state_dim=4, action_dim=4)
    low = create_policy(config, build_dataset([episode], config.action_horizon))
    policy = HierarchicalPolicy(high, low)
    batch = stack_observations(
        [{"images": {"corner": images[i]}, "state": state[i], "prompt": PROMPT} for i in range(4)]
    )
    noise = np.random.default_rng(1).standard_normal((4, config.action_horizon, 4)).astype(np.float32)
    low.infer = functools.partial(low.infer, noise=noise)  # same flow noise for both calls below
    chunk = policy.infer(batch)
    expected = high.predict(batch)
    assert policy.last_subtasks == expected
    direct = low.infer(batch, conditions=[f"subtask: {s}" for s in expected])
    np.testing.assert_allclose(chunk.actions, direct.actions, atol=1e-6)
    assert policy.version == low.version and chunk.actions.shape == (4, config.action_horizon, 4)
