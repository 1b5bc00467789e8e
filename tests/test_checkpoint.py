"""VLA checkpoints: round trip with identical outputs, content-derived version, clear errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from policies.normalization import NormalizationStats
from tests.test_vla import observation_batch, toy_policy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy, dataset = toy_policy(knowledge_insulation=True)
    directory = tmp_path_factory.mktemp("ckpt") / "vla"
    version = save_checkpoint(policy, directory)
    return policy, dataset, directory, version


def _copy(directory, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def test_round_trip_gives_identical_outputs(saved) -> None:
    policy, dataset, directory, version = saved
    loaded = load_checkpoint(directory)
    batch = observation_batch(dataset)
    noise = np.random.default_rng(3).normal(size=(3, 10, 4)).astype(np.float32)
    expected, actual = policy.infer(batch, noise=noise), loaded.infer(batch, noise=noise)
    np.testing.assert_array_equal(expected.actions, actual.actions)
    np.testing.assert_array_equal(expected.embeddings, actual.embeddings)
    assert loaded.version == version and version.startswith("vla-tiny-")
    assert loaded.fast_tokenizer is not None
    assert loaded.fast_tokenizer.encode(dataset.actions[:5]) == policy.fast_tokenizer.encode(
        dataset.actions[:5]
    )
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "fast_tokenizer.json",
        "inference.json",
        "model.safetensors",
        "norm_stats.json",
        "policy.json",
        "tokenizer.json",
    ]


def test_corrupt_weights_raise(saved, tmp_path) -> None:
    target = _copy(saved[2], tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_checkpoint(target)


@pytest.mark.parametrize("name", ["config.json", "norm_stats.json", "tokenizer.json", "fast_tokenizer.json"])
def test_missing_file_raises_naming_it(saved, tmp_path, name: str) -> None:
    target = _copy(saved[2], tmp_path)
    (target / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(target)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 64, "model.safetensors: tensor 'backbone.0.mlp.0.bias' shape: expected (128,), got (256,)"),
        ("depth", 2, "unexpected tensor 'backbone.2"),
        ("heads", "four", "heads: expected int, got 'four'"),
        ("colour", 1, "colour: unknown VLA config field"),
        ("normalization", "zscore", "norm_stats.mode: expected 'zscore' (from the config), got 'quantile'"),
    ],
)
def test_inconsistent_config_raises_naming_the_field(saved, tmp_path, field, value, message) -> None:
    target = _copy(saved[2], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config[field] = value
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(target)
    assert message in str(error.value)


def test_normalization_stats_round_trip(saved, tmp_path) -> None:
    stats = saved[0].norm_stats
    stats.save(tmp_path / "n.json")
    loaded = NormalizationStats.load(tmp_path / "n.json")
    np.testing.assert_array_equal(loaded.actions.q99, stats.actions.q99)
    x = np.array([[0.1, -0.2, 0.3, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(
        stats.state.unnormalize(stats.state.normalize(x, "quantile"), "quantile"), x, atol=1e-5
    )
    np.testing.assert_allclose(
        stats.state.unnormalize(stats.state.normalize(x, "zscore"), "zscore"), x, atol=1e-5
    )


def test_inference_conditions_travel_with_the_checkpoint(saved, tmp_path) -> None:
    policy, dataset, _, _ = saved
    conditioned_dir = tmp_path / "conditioned"
    policy.conditions, policy.cfg_beta = "Advantage: positive", 1.5
    try:
        save_checkpoint(policy, conditioned_dir)
    finally:
        policy.conditions, policy.cfg_beta = None, 1.0
    loaded = load_checkpoint(conditioned_dir)
    assert (loaded.conditions, loaded.cfg_beta) == ("Advantage: positive", 1.5)
    batch = observation_batch(dataset)
    noise = np.random.default_rng(4).normal(size=(3, 10, 4)).astype(np.float32)
    explicit = policy.infer(batch, conditions="Advantage: positive", cfg_beta=1.5, noise=noise)
    np.testing.assert_array_equal(loaded.infer(batch, noise=noise).actions, explicit.actions)
    assert load_checkpoint(conditioned_dir, conditions=None).conditions is None  # the caller can override
    (conditioned_dir / "inference.json").write_text(json.dumps({"conditions": 3}))
    with pytest.raises(CheckpointError, match=r"inference\.json: conditions: expected a string"):
        load_checkpoint(conditioned_dir)
