"""The state tier: the built-in VLA with no camera (prompt + proprio state) trains, infers, round-trips through a
checkpoint, and ``train_vla`` trains and evaluates it on episodes stored without images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from envs import EnvConfig, EnvSettings
from experiments.collection import CollectConfig, run_collection
from experiments.commands.train import _camera_names
from experiments.training import BCConfig, stored_image_layout, train_vla
from policies.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from policies.training import (
    EarlyStopping,
    EpisodeArrays,
    HeldOutLoss,
    TrainConfig,
    build_dataset,
    create_policy,
    train_bc,
)
from policies.vla import VLAConfig, VLAInputError
from policies.vla.config import ConfigError
from storage import EpisodeQuery, ExperienceStore

PROMPT = "reach the goal position"


def toy_episodes(steps: int = 24, count: int = 3) -> list[EpisodeArrays]:
    """Actions a smooth function of the state; no images at all."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        state = np.cumsum(rng.normal(0, 0.2, size=(steps, 4)), axis=0).astype(np.float32)
        actions = np.tanh(state * np.array([1.0, -1.0, 0.5, 2.0], dtype=np.float32))
        out.append(EpisodeArrays({}, state, actions, PROMPT))
    return out


def test_state_input_vla_trains_infers_and_round_trips(tmp_path) -> None:
    dataset = build_dataset(toy_episodes(), 4)
    config = VLAConfig.preset("tiny", cameras=(), state_dim=4, action_dim=4, action_horizon=4)
    policy = create_policy(config, dataset)
    assert policy.model.image_encoder is None
    assert config.prefix_len == config.max_prompt_tokens  # the prefix is the prompt alone
    result = train_bc(policy, dataset, TrainConfig(steps=60, batch_size=16, warmup_steps=5, progress=False))
    assert result.history[-1]["flow_loss"] < 0.7 * result.history[0]["flow_loss"]
    batch = {"prompt": [PROMPT] * 2, "state": dataset.state[:2], "images": {}}
    noise = np.random.default_rng(1).normal(size=(2, 4, 4)).astype(np.float32)
    chunk = policy.infer(batch, noise=noise)
    assert chunk.actions.shape == (2, 4, 4) and np.isfinite(chunk.actions).all()
    save_checkpoint(policy, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.cameras == ()
    np.testing.assert_allclose(loaded.infer(batch, noise=noise).actions, chunk.actions, atol=1e-5)
    ignored = loaded.infer(batch | {"images": {"corner2": np.zeros((2, 64, 64, 3), np.uint8)}}, noise=noise)
    np.testing.assert_allclose(ignored.actions, chunk.actions, atol=1e-5)  # images are not read
    with pytest.raises(VLAInputError, match=r"state\.shape"):
        policy.infer({"prompt": [PROMPT], "state": np.zeros((1, 3), np.float32)})
    with pytest.raises(ConfigError, match="0–3 distinct"):
        VLAConfig(cameras=("a", "b", "c", "d"))


def test_train_vla_takes_episodes_stored_without_images(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    env = EnvConfig(task="reach-v3", render=False, max_episode_steps=20)
    run_collection(
        CollectConfig(env=env, policy="scripted", noise=0.2, episodes=2, store_url=url, run_id="demos"),
        progress=False,
    )
    store = ExperienceStore(url)
    selection = EpisodeQuery(tasks=["reach-v3"], run_ids=["demos"])
    assert stored_image_layout(store, selection) == ((), 64)
    assert stored_image_layout(store, selection, cameras=_camera_names("none")) == ((), 64)  # --cameras none
    with pytest.raises(ValueError, match="stored no camera images"):
        stored_image_layout(store, selection, cameras=("corner2",))
    config = BCConfig(env=EnvSettings(cameras=(), max_episode_steps=5), steps=3, batch_size=8, eval_episodes=1, validation_fraction=0.5, validate_every=1)  # fmt: skip
    trained = train_vla(store, selection, config, tmp_path, progress=False)
    assert trained.policy.config.cameras == ()
    assert trained.evaluations[0].n == 1  # evaluated in an env that renders nothing
    assert trained.train.best_step in (1, 2, 3) and len(trained.train.validation) == 3  # one episode held out
    assert checkpoint_config(trained.checkpoint).cameras == ()  # the checkpoint records the state tier


def test_convergence_rule_stops_on_a_stalled_heldout_loss_and_restores_the_best_weights() -> None:
    episodes = toy_episodes(count=4)
    dataset, validation = build_dataset(episodes[:3], 4), build_dataset(episodes[3:], 4)
    config = VLAConfig.preset("tiny", cameras=(), state_dim=4, action_dim=4, action_horizon=4)
    frozen = create_policy(config, dataset)
    stalled = TrainConfig(
        steps=100, learning_rate=1e-30, validate_every=2, patience=2, min_steps=0, progress=False
    )
    result = train_bc(frozen, dataset, stalled, validation=validation)
    assert (result.best_step, result.stopped_at) == (2, 6)  # no improvement at steps 4 and 6: stop
    assert [row["step"] for row in result.validation] == [2, 4, 6]
    floor = train_bc(frozen, dataset, dataclasses.replace(stalled, min_steps=None), validation=validation)
    assert (floor.best_step, floor.stopped_at) == (2, 50)  # default: not before half of the 100 steps
    policy = create_policy(config, dataset)
    settings = TrainConfig(steps=40, batch_size=16, warmup_steps=5, validate_every=10, progress=False)
    result = train_bc(policy, dataset, settings, validation=validation)
    losses = {row["step"]: row["heldout_flow_loss"] for row in result.validation}
    assert list(losses) == [10, 20, 30, 40] and result.stopped_at == 40
    assert result.best_step == min(losses, key=losses.get)
    assert HeldOutLoss(policy, validation)() == pytest.approx(losses[result.best_step], rel=1e-5)


def _stop_step(
    losses: list[float], patience: int, min_steps: int, smoothing: float = 0.0, every: int = 50
) -> tuple[int | None, int]:
    """(best step, stop step) of the convergence rule on a held-out loss measured every ``every`` steps."""
    stopping = EarlyStopping()
    step = 0
    for index, loss in enumerate(losses):
        step = every * (index + 1)
        stopping.update(step, loss, smoothing=smoothing)
        if stopping.should_stop(step, patience, min_steps):
            break
    return stopping.best_step, step


def test_convergence_rule_waits_for_min_steps_and_smooths_a_noisy_plateau() -> None:
    # pick-place detours, data seed 1, training seed 1001, filtered BC: the held-out flow loss every 50 steps of a
    # 1500-step run (session 13). A lucky minimum at step 600 in the high-learning-rate phase; the trend falls
    # until ~950 and success keeps rising (0.33 at 600, 0.58 at 950).
    losses = [
        0.6722, 0.6702, 0.6059, 0.5863, 0.5346, 0.5195, 0.5386, 0.5174, 0.5535, 0.5616, 0.5081, 0.4989, 0.5339, 0.5045, 0.4999,
        0.5209, 0.4987, 0.4724, 0.4325, 0.4502, 0.4795, 0.4623, 0.4691, 0.4926, 0.4865, 0.4989, 0.4811, 0.4681, 0.4924, 0.4705,
    ]  # fmt: skip
    assert _stop_step(losses, patience=3, min_steps=0) == (600, 750)  # the old rule: stops on the noise
    assert _stop_step(losses, patience=3, min_steps=750) == (600, 750)  # a floor alone: already stale there
    assert _stop_step(losses, patience=5, min_steps=750) == (950, 1200)  # 850 beats 600 by 0.0002: luck
    assert _stop_step(losses, patience=5, min_steps=750, smoothing=0.5) == (
        1000,
        1250,
    )  # the benchmark's rule
    assert _stop_step(losses, patience=0, min_steps=0) == (950, 1500)  # patience 0: every step
    assert _stop_step([0.5, 0.6, 0.7, 0.8], patience=2, min_steps=0) == (50, 150)
    assert _stop_step([0.5, 0.6, 0.7, 0.8], patience=2, min_steps=200) == (
        50,
        200,
    )  # stale, waits for the floor
    assert _stop_step([1.0, 0.0, 1.0, 1.0], patience=1, min_steps=0, smoothing=0.5) == (
        100,
        150,
    )  # 1, .5, .75
    assert (
        TrainConfig(steps=1500).stop_floor() == 750 and TrainConfig(steps=1500, min_steps=0).stop_floor() == 0
    )


def _weights_by_step(dataset, config: TrainConfig, validation=None) -> tuple[dict[int, dict], object]:
    """Train a fresh tiny state-tier VLA under ``config``; the weights the evaluation callback saw at each
    ``eval_every`` step (and at the end), and the trained policy."""
    vla = VLAConfig.preset("tiny", cameras=(), state_dim=4, action_dim=4, action_horizon=4)
    policy = create_policy(vla, dataset)
    seen: dict[int, dict] = {}

    def snapshot(step: int, policy) -> dict[str, float]:
        seen[step] = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
        return {}

    train_bc(policy, dataset, config, callback=snapshot, validation=validation)
    return seen, policy


def _assert_same(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=0)


def test_a_schedule_apart_from_the_cap_makes_a_short_run_the_start_of_a_long_one() -> None:
    dataset = build_dataset(toy_episodes(), 4)
    base = TrainConfig(steps=20, batch_size=8, warmup_steps=2, eval_every=10, progress=False, seed=3)
    short, _ = _weights_by_step(dataset, dataclasses.replace(base, schedule_steps=40))
    long, _ = _weights_by_step(dataset, dataclasses.replace(base, steps=40, schedule_steps=40))
    _assert_same(short[20], long[20])  # the same learning rate at every step: the same weights at step 20
    capped, _ = _weights_by_step(dataset, base)  # the schedule spans the 20-step cap: it decays faster
    assert any(not torch.equal(capped[20][k], long[20][k]) for k in capped[20])


def test_the_weight_average_is_what_training_validates_evaluates_and_returns() -> None:
    episodes = toy_episodes(count=4)
    dataset, validation = build_dataset(episodes[:3], 4), build_dataset(episodes[3:], 4)
    base = TrainConfig(steps=3, batch_size=8, warmup_steps=1, eval_every=1, progress=False, seed=5)
    raw, _ = _weights_by_step(dataset, base)  # the raw weights w1, w2, w3
    decay = 0.9
    averaged, policy = _weights_by_step(dataset, dataclasses.replace(base, ema_decay=decay))
    expected = dict(raw[1])  # the average starts at the first update's weights
    for step in (1, 2, 3):
        if step > 1:
            expected = {k: decay * expected[k] + (1 - decay) * raw[step][k] for k in expected}
        for name in expected:  # the callback saw the average at every step
            torch.testing.assert_close(averaged[step][name], expected[name])
    for name, value in policy.model.named_parameters():  # and the policy returned holds it
        torch.testing.assert_close(value.detach(), expected[name])
    assert any(not torch.equal(raw[3][k], expected[k]) for k in expected)  # the average is not the raw weights
    ruled = dataclasses.replace(base, ema_decay=decay, eval_every=0, validate_every=1, min_steps=0)
    vla = VLAConfig.preset("tiny", cameras=(), state_dim=4, action_dim=4, action_horizon=4)
    rule_policy = create_policy(vla, dataset)
    result = train_bc(rule_policy, dataset, ruled, validation=validation)
    losses = {row["step"]: row["heldout_flow_loss"] for row in result.validation}
    assert HeldOutLoss(rule_policy, validation, seed=5)() == pytest.approx(losses[result.best_step], rel=1e-5)
    if result.best_step == 3:  # the held-out loss measured the average, and the average is what was kept
        for name, value in rule_policy.model.named_parameters():
            torch.testing.assert_close(value.detach(), expected[name])
