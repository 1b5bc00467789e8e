"""High-level subtask model and the two-level policy over the built-in VLA."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from policies.base import stack_observations
from policies.checkpoint import CheckpointError
from policies.hierarchical import (
    HierarchicalPolicy,
    SubtaskInputError,
    is_hierarchical_checkpoint,
    load_hierarchical,
    save_hierarchical,
    train_subtask_model,
)
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


def _two_level(images, state, labels):
    """A tiny trained high level and an (untrained) subtask-conditioned VLA on the same samples."""
    prompts = [PROMPT] * len(labels)
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
    return HierarchicalPolicy(high, low), config


def test_hierarchical_policy_conditions_the_vla_on_the_predicted_subtask():
    images, state, _, labels = _samples(40, size=48)
    policy, config = _two_level(images, state, labels)
    high, low = policy.high_level, policy.low_level
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


def test_hierarchical_checkpoint_round_trips_both_levels(tmp_path):
    images, state, _, labels = _samples(40, size=48)
    policy, config = _two_level(images, state, labels)
    version = save_hierarchical(policy, tmp_path / "hier")
    assert (
        version.startswith("hier-")
        and policy.version == version
        and is_hierarchical_checkpoint(tmp_path / "hier")
    )
    loaded = load_hierarchical(tmp_path / "hier")
    assert loaded.version == version and loaded.high_level.vocabulary == policy.high_level.vocabulary
    batch = stack_observations(
        [{"images": {"corner": images[i]}, "state": state[i], "prompt": PROMPT} for i in range(6)]
    )
    noise = np.random.default_rng(2).standard_normal((6, config.action_horizon, 4)).astype(np.float32)
    for two_level in (policy, loaded):
        two_level.low_level.infer = functools.partial(two_level.low_level.infer, noise=noise)
    np.testing.assert_allclose(policy.infer(batch).actions, loaded.infer(batch).actions, atol=1e-5)
    assert loaded.last_subtasks == policy.last_subtasks
    (tmp_path / "hier" / "subtask_model.json").write_text("{}")
    with pytest.raises(CheckpointError, match="bad subtask model"):
        load_hierarchical(tmp_path / "hier")
    with pytest.raises(CheckpointError, match="missing subtask model config"):
        load_hierarchical(tmp_path)
