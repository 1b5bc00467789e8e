"""High-level subtask model and the two-level policy over the built-in VLA."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from policies.base import stack_observations
from policies.checkpoint import CheckpointError
from policies.hierarchical import (
    START,
    HierarchicalPolicy,
    SubtaskInputError,
    is_hierarchical_checkpoint,
    load_hierarchical,
    previous_subtasks,
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
        images, state, prompts, labels, camera="corner", history=0, steps=300, progress=False
    )
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    test_images, test_state, test_prompts, test_labels = _samples(100, seed=1)
    batch = {"images": {"corner": test_images}, "state": test_state, "prompt": test_prompts}
    accuracy = np.mean(np.array(model.predict(batch)) == np.array(test_labels))
    assert accuracy > 0.85


def test_bad_inputs_name_the_field():
    images, state, prompts, labels = _samples(20)
    previous = previous_subtasks(labels, 1)
    model, _ = train_subtask_model(
        images, state, prompts, labels, camera="corner", previous=previous, steps=2, progress=False
    )
    with pytest.raises(SubtaskInputError, match="images: missing camera"):
        model.predict({"images": {"wrist": images}, "state": state, "prompt": prompts})
    with pytest.raises(SubtaskInputError, match="prompt: 'open the door'"):
        model.predict({"images": {"corner": images}, "state": state, "prompt": ["open the door"] * 20})
    with pytest.raises(SubtaskInputError, match="samples: expected equal"):
        train_subtask_model(images, state[:5], prompts, labels, camera="corner", progress=False)
    batch = {"images": {"corner": images}, "state": state, "prompt": prompts}
    with pytest.raises(SubtaskInputError, match="history: 'grasp' is not a known subtask"):
        model.predict(batch, [("grasp",)] * 20)
    with pytest.raises(SubtaskInputError, match="history: expected 20 rows, got 3"):
        model.predict(batch, [()] * 3)
    with pytest.raises(SubtaskInputError, match="previous: expected 20 rows of recent labels for history=1"):
        train_subtask_model(images, state, prompts, labels, camera="corner", progress=False)


CYCLE = ("reach", "grasp", "place")


def _cycle_samples(episodes: int, length: int = 12, seed: int = 0, size: int = 32):
    """Each episode steps through reach → grasp → place → reach …; images and state carry no signal, so only the
    previous subtask tells the next one."""
    rng = np.random.default_rng(seed)
    labels = [CYCLE[t % 3] for _ in range(episodes) for t in range(length)]
    previous = [p for _ in range(episodes) for p in previous_subtasks(list(CYCLE * length)[:length], 1)]
    n = len(labels)
    images = np.full((n, size, size, 3), 128, dtype=np.uint8)
    state = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    return images, state, [PROMPT] * n, labels, previous


def test_recent_subtask_input_changes_the_prediction():
    images, state, prompts, labels, previous = _cycle_samples(20)
    test_images, test_state, test_prompts, test_labels, test_previous = _cycle_samples(5, seed=1)
    batch = {"images": {"corner": test_images}, "state": test_state, "prompt": test_prompts}
    accuracy = {}
    for history in (0, 1):
        model, _ = train_subtask_model(
            images, state, prompts, labels, camera="corner", previous=previous, history=history,
            steps=300, progress=False,
        )  # fmt: skip
        predicted = model.predict(batch, test_previous)
        accuracy[history] = np.mean(np.array(predicted) == np.array(test_labels))
    assert accuracy[1] > 0.95 and accuracy[0] < 0.6, accuracy
    one = {"images": {"corner": test_images[:1]}, "state": test_state[:1], "prompt": [PROMPT]}
    assert [model.predict(one, [(p,)])[0] for p in (START, *CYCLE)] == ["reach", "grasp", "place", "reach"]


def _two_level(images, state, labels, history=1, steps=50):
    """A tiny trained high level and an (untrained) subtask-conditioned VLA on the same samples."""
    prompts = [PROMPT] * len(labels)
    high, _ = train_subtask_model(
        images, state, prompts, labels, camera="corner", previous=previous_subtasks(labels, history),
        history=history, steps=steps, progress=False,
    )  # fmt: skip
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


def test_reset_clears_the_subtask_history():
    images, state, _, labels, _ = _cycle_samples(4, length=10, size=48)
    policy, _ = _two_level(images, state, labels, steps=300)
    batch = stack_observations([{"images": {"corner": images[0]}, "state": state[0], "prompt": PROMPT}])
    named = []
    for _ in range(4):
        policy.infer(batch)
        named += policy.last_subtasks
    assert named == ["reach", "grasp", "place", "reach"] and list(policy.history[0]) == ["reach"]
    policy.reset()
    assert policy.history == []
    policy.infer(batch)
    assert policy.last_subtasks == ["reach"], "after reset the high level starts from <start> again"


def test_hierarchical_checkpoint_round_trips_both_levels(tmp_path):
    images, state, _, labels = _samples(40, size=48)
    policy, config = _two_level(images, state, labels, history=2)
    version = save_hierarchical(policy, tmp_path / "hier")
    assert (
        version.startswith("hier-")
        and policy.version == version
        and is_hierarchical_checkpoint(tmp_path / "hier")
    )
    loaded = load_hierarchical(tmp_path / "hier")
    assert loaded.version == version and loaded.high_level.vocabulary == policy.high_level.vocabulary
    assert loaded.high_level.history == 2
    batch = stack_observations(
        [{"images": {"corner": images[i]}, "state": state[i], "prompt": PROMPT} for i in range(6)]
    )
    noise = np.random.default_rng(2).standard_normal((6, config.action_horizon, 4)).astype(np.float32)
    for two_level in (policy, loaded):
        two_level.low_level.infer = functools.partial(two_level.low_level.infer, noise=noise)
    np.testing.assert_allclose(policy.infer(batch).actions, loaded.infer(batch).actions, atol=1e-5)
    assert loaded.last_subtasks == policy.last_subtasks
    config_path = tmp_path / "hier" / "subtask_model.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"format": 99}))
    with pytest.raises(CheckpointError, match=r"format 99 is not supported \(1\.\.2\)$"):
        load_hierarchical(tmp_path / "hier")
    (tmp_path / "hier" / "subtask_model.json").write_text("{}")
    with pytest.raises(CheckpointError, match="bad subtask model"):
        load_hierarchical(tmp_path / "hier")
    with pytest.raises(CheckpointError, match="missing subtask model config"):
        load_hierarchical(tmp_path)


def test_a_format_1_checkpoint_without_subtask_history_still_loads(tmp_path):
    images, state, _, labels = _samples(40, size=48)
    policy, _ = _two_level(images, state, labels, history=0)
    save_hierarchical(policy, tmp_path / "old")
    config_path = tmp_path / "old" / "subtask_model.json"
    config = json.loads(config_path.read_text())
    assert (config.pop("format"), config.pop("history")) == (2, 0)
    config_path.write_text(json.dumps(config))  # exactly what the first version wrote
    loaded = load_hierarchical(tmp_path / "old")
    assert loaded.high_level.history == 0
    batch = {"images": {"corner": images}, "state": state, "prompt": [PROMPT] * 40}
    assert loaded.high_level.predict(batch) == policy.high_level.predict(batch)
