"""RECAP value side: rewards, return bins, and the distributional value model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.types import monte_carlo_returns
from recap import RecapInputError, ReturnBins, RewardConfig, ValueConfig, ValueModel, train_value
from recap.rewards import step_rewards, task_horizons
from recap.synthetic import make_episode
from recap.value import normalized_returns, validation_split
from storage.records import EpisodeRecord, Outcome

torch.set_num_threads(1)

FAST_VALUE = ValueConfig(hidden_dim=64, train_steps=600, batch_size=128, dropout=0.0)


def deterministic_chain(rng: np.random.Generator, task: str = "chain", goal: int = 20) -> EpisodeRecord:
    """A chain whose return is a function of the state.

    A walker goes from a random start to ``goal`` (success), or a stuck walker (flag = 1) times out at
    ``2 · goal`` steps (failure).
    """
    start = int(rng.integers(0, goal - 2))
    stuck = rng.random() < 0.3
    length = 2 * goal if stuck else goal - start
    position = np.full(length, start) if stuck else start + np.arange(length)
    states = np.stack([position / goal, np.full(length, float(stuck)), rng.normal(size=length)], axis=1)
    outcome = Outcome.TRUNCATED if stuck else Outcome.SUCCESS
    return make_episode(task, states, np.ones((length, 1)), outcome)


def test_bins_two_hot_and_nearest_round_trip() -> None:
    bins = ReturnBins(201)
    values = torch.tensor([-1.0, -0.73219, -0.5, -0.0049, 0.0, 0.3, -1.7])
    two_hot = bins.encode_two_hot(values)
    assert torch.allclose(two_hot.sum(-1), torch.ones(7))
    assert torch.allclose(bins.decode(two_hot), values.clamp(-1.0, 0.0), atol=1e-6)
    assert (two_hot > 0).sum(-1).max() <= 2
    nearest = bins.encode_nearest(values)
    assert torch.all(nearest.sum(-1) == 1)
    assert torch.allclose(bins.decode(nearest), values.clamp(-1, 0), atol=bins.width / 2 + 1e-6)
    assert bins.nearest_index(torch.tensor([-0.5])).item() == 100
    with pytest.raises(ValueError, match="bins"):
        bins.decode(torch.ones(3, 10))


def test_rewards_and_returns_are_normalized_into_unit_interval() -> None:
    success = make_episode("t", np.zeros((4, 2)), np.zeros((4, 1)), Outcome.SUCCESS)
    failure = make_episode("t", np.zeros((3, 2)), np.zeros((3, 1)), Outcome.FAILURE)
    config = RewardConfig(max_episode_length=4, fail_penalty=4)
    horizon = task_horizons([success, failure], config)["t"]
    assert horizon == 4
    np.testing.assert_allclose(step_rewards(success, horizon, config), [-1 / 8, -1 / 8, -1 / 8, 0.0])
    np.testing.assert_allclose(
        monte_carlo_returns(step_rewards(failure, horizon, config)), [-6 / 8, -5 / 8, -4 / 8]
    )
    default = RewardConfig()
    returns = normalized_returns(
        [success, failure], ValueConfig(reward=default), task_horizons([success, failure], default)
    )
    assert returns.min() > -1.0 and returns.max() <= 0.0
    with pytest.raises(RecapInputError, match="exceeds max_episode_length"):
        task_horizons([success], RewardConfig(max_episode_length=3))


def test_value_learns_synthetic_chain_returns() -> None:
    rng = np.random.default_rng(0)
    train = [deterministic_chain(rng) for _ in range(60)]
    heldout = [deterministic_chain(rng) for _ in range(20)]
    model = train_value(train, FAST_VALUE)
    horizons = task_horizons(train, FAST_VALUE.reward)
    predicted = np.concatenate(model.values_of(heldout))
    target = normalized_returns(heldout, FAST_VALUE, horizons)
    assert np.corrcoef(predicted, target)[0, 1] > 0.97
    assert np.abs(predicted - target).mean() < 0.04
    distribution = model.distribution(heldout[0])
    assert distribution.shape == (heldout[0].length, 201)
    np.testing.assert_allclose(distribution.sum(-1), 1.0, atol=1e-5)


def test_value_model_save_load_round_trip_and_ensemble(tmp_path) -> None:
    rng = np.random.default_rng(1)
    episodes = [deterministic_chain(rng, task) for task in ("a", "b") for _ in range(6)]
    config = FAST_VALUE.model_copy(update={"train_steps": 20, "ensemble_size": 2})
    model = train_value(episodes, config)
    assert len(model.members) == 2
    loaded = ValueModel.load(model.save(tmp_path / "value"))
    np.testing.assert_allclose(loaded.values(episodes[0]), model.values(episodes[0]), atol=1e-6)
    assert loaded.version == model.version and loaded.training_uuids == model.training_uuids
    with pytest.raises(FileNotFoundError, match=r"value\.json"):
        ValueModel.load(tmp_path / "missing")


def test_value_training_is_seeded() -> None:
    rng = np.random.default_rng(2)
    episodes = [deterministic_chain(rng) for _ in range(6)]
    config = FAST_VALUE.model_copy(update={"train_steps": 30})
    first, second = train_value(episodes, config), train_value(episodes, config)
    np.testing.assert_array_equal(first.values(episodes[0]), second.values(episodes[0]))


def test_image_encoders_train_on_camera_images() -> None:
    rng = np.random.default_rng(3)
    episodes = []
    for _ in range(4):
        base = deterministic_chain(rng)
        images = {"top": rng.integers(0, 255, size=(base.length, 24, 24, 3), dtype=np.uint8)}
        episodes.append(make_episode("chain", base.states, base.actions, base.outcome, images=images))
    for encoder in ("image_conv", "vla_image"):
        config = FAST_VALUE.model_copy(
            update={"encoder": encoder, "camera": "top", "image_size": 16, "train_steps": 5}
        )
        model = train_value(episodes, config)
        assert model.values(episodes[0]).shape == (episodes[0].length,)
        with pytest.raises(RecapInputError, match="no images for camera 'top'"):
            model.values(deterministic_chain(rng))


def test_value_input_errors_are_clear() -> None:
    rng = np.random.default_rng(4)
    episodes = [deterministic_chain(rng) for _ in range(3)]
    model = train_value(episodes, FAST_VALUE.model_copy(update={"train_steps": 2}))
    with pytest.raises(RecapInputError, match="task 'other'"):
        model.values(deterministic_chain(rng, task="other"))
    with pytest.raises(RecapInputError, match="privileged is None"):
        train_value(episodes, FAST_VALUE.model_copy(update={"inputs": "privileged"}))
    with pytest.raises(ValueError, match="unknown encoder"):
        train_value(episodes, FAST_VALUE.model_copy(update={"encoder": "nope"}))
    with pytest.raises(ValueError, match="camera"):
        ValueConfig(encoder="image_conv")
    with pytest.raises(RecapInputError, match="at least one"):
        train_value([], FAST_VALUE)
    errored = make_episode("chain", np.zeros((2, 3)), np.zeros((2, 1)), Outcome.ERROR)
    with pytest.raises(RecapInputError, match="outcome 'error'"):
        train_value([*episodes, errored], FAST_VALUE)


def test_validation_split_holds_out_episodes_per_task_for_early_stopping() -> None:
    rng = np.random.default_rng(5)
    episodes = [deterministic_chain(rng, task) for task in ("a", "a", "a", "a", "a", "b", "b", "c")]
    fit, held = validation_split(episodes, 0.4, seed=0)
    assert {ep.task for ep in held} == {"a", "b"}  # "c" has one episode: it must stay in training
    assert sum(ep.task == "a" for ep in held) == 2 and sum(ep.task == "b" for ep in held) == 1
    assert {ep.uuid for ep in fit}.isdisjoint({ep.uuid for ep in held})
    assert len(fit) + len(held) == len(episodes)
    model = train_value(episodes, FAST_VALUE.model_copy(update={"train_steps": 20, "eval_every": 5}))
    assert model.training_uuids == {ep.uuid for ep in episodes}  # held-out episodes still count as seen


def test_missing_horizon_is_a_clear_error() -> None:
    rng = np.random.default_rng(6)
    episodes = [deterministic_chain(rng, "a"), deterministic_chain(rng, "b")]
    with pytest.raises(RecapInputError, match="no max episode length for task 'b'"):
        train_value(episodes, FAST_VALUE, horizons={"a": 40})
