"""Per-sample loss weights in BC training (filtered BC and AWR ablations): zero weights exclude samples exactly,
weights scale the flow-matching loss, bad weights fail with one clear line."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

from policies.training import BCDataset, EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
from policies.vla import VLAConfig, VLAInputError
from policies.vla.model import sample_tau

IMAGE = 48
PROMPT = "reach the goal position"


def episodes(weights: list[np.ndarray | None], steps: int = 16, seed: int = 0) -> list[EpisodeArrays]:
    """Learnable toy episodes (actions a smooth function of the state) with the given per-step weights."""
    rng = np.random.default_rng(seed)
    out = []
    for weight in weights:
        state = np.cumsum(rng.normal(0, 0.2, size=(steps, 4)), axis=0).astype(np.float32)
        actions = np.tanh(state * np.array([1.0, -1.0, 0.5, 2.0], dtype=np.float32))
        images = rng.integers(0, 256, size=(steps, IMAGE, IMAGE, 3), dtype=np.uint8)
        out.append(EpisodeArrays({"corner": images}, state, actions, PROMPT, None, weight))
    return out


def config(**overrides) -> VLAConfig:
    return VLAConfig.preset(
        "tiny", image_size=IMAGE, cameras=("corner",), state_dim=4, action_dim=4, **overrides
    )


def rows(dataset: BCDataset, keep: np.ndarray) -> BCDataset:
    """The samples ``keep`` of ``dataset`` (unweighted): what filtering the dataset by hand gives."""
    return BCDataset(
        images={camera: array[keep] for camera, array in dataset.images.items()},
        state=dataset.state[keep],
        prompts=[dataset.prompts[i] for i in keep],
        actions=dataset.actions[keep],
        action_mask=dataset.action_mask[keep],
    )


def parameters(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.model.parameters()]


def test_zero_weights_train_exactly_like_the_filtered_dataset() -> None:
    mask = np.r_[np.ones(10), np.zeros(6)].astype(np.float32)
    weighted = build_dataset(episodes([np.ones(16), np.zeros(16), mask]), horizon=10)
    filtered = rows(weighted, np.flatnonzero(weighted.weights > 0))
    assert len(filtered) == 26
    policy = create_policy(config(), weighted, seed=0)
    twin = copy.deepcopy(policy)
    settings = TrainConfig(steps=4, batch_size=8, warmup_steps=1, progress=False)
    weighted_run = train_bc(policy, weighted, settings)
    filtered_run = train_bc(twin, filtered, settings)
    assert [h["loss"] for h in weighted_run.history] == [h["loss"] for h in filtered_run.history]
    for a, b in zip(parameters(policy), parameters(twin), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    untouched = copy.deepcopy(twin)
    train_bc(untouched, build_dataset(episodes([None] * 3), horizon=10), settings)  # all samples: differs
    assert any(not torch.equal(a, b) for a, b in zip(parameters(untouched), parameters(policy), strict=True))


def test_uniform_weights_equal_no_weights() -> None:
    plain = build_dataset(episodes([None, None]), horizon=10)
    scaled = build_dataset(episodes([np.full(16, 2.5), np.full(16, 2.5)]), horizon=10)
    policy = create_policy(config(), plain, seed=0)
    twin = copy.deepcopy(policy)
    settings = TrainConfig(steps=3, batch_size=8, warmup_steps=1, progress=False)
    assert [h["loss"] for h in train_bc(policy, plain, settings).history] == [
        h["loss"] for h in train_bc(twin, scaled, settings).history
    ]


def test_flow_loss_is_the_weighted_mean_of_per_sample_losses() -> None:
    dataset = build_dataset(episodes([None]), horizon=10)
    policy = create_policy(config(), dataset, seed=0)
    model, index = policy.model, torch.tensor([0, 9])  # sample 9's chunk is partly end-of-episode padding
    generator = torch.Generator().manual_seed(0)
    images = torch.from_numpy(dataset.images["corner"][index.numpy()]).permute(0, 3, 1, 2)[:, None]
    tokens, valid = policy.tokenize([PROMPT, PROMPT], trim=True)
    prefix = model.encode_prefix(images.float() / 127.5 - 1.0, tokens, valid)
    state = torch.from_numpy(dataset.state[index.numpy()])
    actions = policy.normalize_actions(dataset.actions)[index]
    mask = torch.from_numpy(dataset.action_mask)[index]
    noise, tau = torch.randn(actions.shape, generator=generator), sample_tau(2, generator)

    def loss(weights):
        return model.flow_loss(prefix, state, actions, mask, noise, tau, weights).item()

    per_sample = [loss(torch.tensor(w)) for w in ([1.0, 0.0], [0.0, 1.0])]
    counts = mask.float().sum(dim=1).tolist()
    expected = (3 * counts[0] * per_sample[0] + counts[1] * per_sample[1]) / (3 * counts[0] + counts[1])
    assert loss(torch.tensor([3.0, 1.0])) == pytest.approx(expected, rel=1e-5)
    assert loss(torch.tensor([1.0, 1.0])) == pytest.approx(loss(None), rel=1e-6)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (np.full(16, -1.0), "weights >= 0"),
        (np.r_[np.ones(15), np.nan], "finite"),
        (np.ones(15), "episodes[0].weights.shape: expected (16,)"),
    ],
)
def test_bad_episode_weights_fail_with_one_line(weight: np.ndarray, message: str) -> None:
    with pytest.raises(VLAInputError, match=re.escape(message)):
        build_dataset(episodes([weight]), horizon=10)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.zeros(16), "every weight is 0"),
        (np.ones(3), r"weights.shape: expected \(16,\)"),
        (np.r_[np.ones(15), np.inf], "finite"),
        (np.r_[np.ones(15), -2.0], "weights >= 0"),
    ],
)
def test_bad_dataset_weights_fail_before_training(weights: np.ndarray, message: str) -> None:
    dataset = build_dataset(episodes([None]), horizon=10)
    policy = create_policy(config(), dataset, seed=0)
    bad = dataclasses.replace(dataset, weights=weights)
    with pytest.raises(VLAInputError, match=message):
        train_bc(policy, bad, TrainConfig(steps=1, progress=False))


def test_unequal_weights_with_knowledge_insulation_are_refused() -> None:
    dataset = build_dataset(episodes([np.linspace(0.5, 2.0, 16)]), horizon=10)
    policy = create_policy(config(knowledge_insulation=True), dataset, seed=0, fast_vocab_size=128)
    with pytest.raises(VLAInputError, match="knowledge_insulation"):
        train_bc(policy, dataset, TrainConfig(steps=1, progress=False))
    binary = dataclasses.replace(dataset, weights=(dataset.weights > 1).astype(np.float32))
    assert train_bc(policy, binary, TrainConfig(steps=1, progress=False)).history
