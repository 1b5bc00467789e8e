"""Chunked, reference-regularized TD3 (rlt.td3 / rlt.buffer): targets, regularizer, dropout, guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from envs import EnvConfig
from rlt.buffer import ChunkTransition, chunk_backup
from rlt.checkpoint import RLTManifest, load_rlt_checkpoint, save_rlt_checkpoint
from rlt.config import RLTConfig
from rlt.deployment import PriorSpec, RLTDeployment
from rlt.errors import CriticDivergedError, NonChunkActionError, RLTInputError
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.td3 import ChunkedTD3, LearnerConfig, apply_reference_dropout

torch.set_num_threads(1)

STATE_DIM, ACTION_DIM, CHUNK = 6, 2, 10


def _learner(**overrides) -> ChunkedTD3:
    settings = {"batch_size": 64, "learning_starts": 64, "net_arch": (64, 64), "seed": 0, **overrides}
    config = LearnerConfig(**settings)
    return ChunkedTD3(STATE_DIM, ACTION_DIM, config)


def _transition(rng: np.random.Generator, **fields) -> ChunkTransition:
    values = {
        "state": rng.normal(size=STATE_DIM),
        "reference": rng.uniform(-0.9, 0.9, (CHUNK, ACTION_DIM)),
        "action": rng.uniform(-1, 1, (CHUNK, ACTION_DIM)),
        "reward": float(rng.random() < 0.1),
        "next_state": rng.normal(size=STATE_DIM),
        "next_reference": rng.uniform(-0.9, 0.9, (CHUNK, ACTION_DIM)),
        "terminated": False,
        "discount": 0.99**CHUNK,
    }
    return ChunkTransition(**{**values, **fields})


def _filled(learner: ChunkedTD3, count: int = 256, seed: int = 0) -> np.random.Generator:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        learner.add_transition(_transition(rng))
    return rng


def test_chunk_backup_hand_computed() -> None:
    assert chunk_backup(np.array([0.0, 0.0, 1.0]), 0.9) == pytest.approx((0.81, 0.729))
    assert chunk_backup(np.zeros(10), 0.9) == pytest.approx((0.0, 0.9**10))
    assert chunk_backup(np.array([1.0, 1.0]), 0.5) == pytest.approx((1.5, 0.25))


def test_chunked_td_target_matches_hand_computation() -> None:
    learner = _learner(target_policy_noise=0.0, gamma=0.9)
    rng = np.random.default_rng(1)
    terminal_reward, terminal_discount = chunk_backup(np.array([0.0, 0.0, 0.0, 1.0]), 0.9)
    truncated_reward, truncated_discount = chunk_backup(np.zeros(4), 0.9)
    cases = [
        _transition(rng, reward=terminal_reward, discount=terminal_discount, terminated=True),
        _transition(rng, reward=truncated_reward, discount=truncated_discount),
        _transition(rng, reward=0.0, discount=0.9**CHUNK),
    ]
    for transition in cases:
        learner.add_transition(transition)
    batch = learner.replay_buffer._get_samples(np.arange(3))
    targets = learner.critic_targets(batch).squeeze(1).numpy()
    with torch.no_grad():
        next_obs = batch.next_observations
        q1, q2 = learner.critic_target(next_obs, learner.actor_target(next_obs))
        next_q = torch.minimum(q1, q2).squeeze(1).numpy()
    assert targets[0] == pytest.approx(0.729, abs=1e-6)
    assert targets[1] == pytest.approx(0.9**4 * next_q[1], rel=1e-5)
    assert targets[2] == pytest.approx(0.9**10 * next_q[2], rel=1e-5)


def _reference_error_after_training(beta: float) -> float:
    learner = _learner(beta=beta, learning_rate=1e-3, net_arch=(256, 256))
    _filled(learner)
    learner.update(120)
    states, references = learner.replay_buffer.split(learner.replay_buffer.observations[:256, 0])
    return float(np.mean((learner.act(states, references) - references) ** 2))


def test_large_beta_makes_the_actor_reproduce_the_reference() -> None:
    copy_error = _reference_error_after_training(beta=1000.0)
    free_error = _reference_error_after_training(beta=0.0)
    assert copy_error < 0.02  # the references have variance 0.27
    assert copy_error < 0.1 * free_error


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_reference_dropout_masks_at_the_configured_rate(rate: float) -> None:
    observations = torch.ones(20_000, STATE_DIM + CHUNK * ACTION_DIM)
    dropped, keep = apply_reference_dropout(observations, STATE_DIM, rate, torch.Generator().manual_seed(0))
    assert 1 - keep.float().mean().item() == pytest.approx(rate, abs=0.015)
    assert torch.all(dropped[~keep, STATE_DIM:] == 0) and torch.all(dropped[keep, STATE_DIM:] == 1)
    assert torch.all(dropped[:, :STATE_DIM] == 1)


def test_actor_update_sees_the_configured_dropout() -> None:
    learner = _learner(ref_dropout=0.3, batch_size=512, learning_starts=512)
    _filled(learner, count=512)
    seen: list[torch.Tensor] = []
    learner.actor.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    learner.actor_loss(learner.replay_buffer.sample(4096).observations)
    zeroed = (seen[0][:, STATE_DIM:] == 0).all(dim=1).float().mean().item()
    assert zeroed == pytest.approx(0.3, abs=0.03)


def test_min_actor_q_climbs_the_lower_of_the_twin_critics() -> None:
    learners = {name: _learner(actor_q=name, beta=0.0, ref_dropout=0.0) for name in ("q1", "min")}
    learners["min"].policy.load_state_dict(learners["q1"].policy.state_dict())
    observations = torch.as_tensor(
        np.random.default_rng(0).normal(size=(256, STATE_DIM + CHUNK * ACTION_DIM))
    )
    observations = observations.float()
    with torch.no_grad():
        q1, q2 = learners["q1"].critic(observations, learners["q1"].actor(observations))
        losses = {name: learner.actor_loss(observations).item() for name, learner in learners.items()}
    assert losses["min"] == pytest.approx(-torch.minimum(q1, q2).mean().item(), rel=1e-4)
    assert losses["q1"] == pytest.approx(-q1.mean().item(), rel=1e-4)
    assert losses["min"] > losses["q1"]  # the twin critics disagree somewhere, and min is the pessimistic one
    states, references = learners["min"].replay_buffer.split(observations.numpy())
    chunks = learners["min"].act(states, references)
    assert learners["min"].q_values(states, references, chunks) == pytest.approx(
        torch.minimum(q1, q2).squeeze(1).numpy(), rel=1e-4
    )
    with pytest.raises(ValidationError, match="actor_q"):
        LearnerConfig(actor_q="max")  # type: ignore[arg-type]


def test_zero_q_weight_leaves_only_the_regression_toward_the_reference() -> None:
    learners = {weight: _learner(q_weight=weight, beta=0.5, ref_dropout=0.0) for weight in (0.0, 1.0)}
    learners[0.0].policy.load_state_dict(learners[1.0].policy.state_dict())
    observations = torch.as_tensor(
        np.random.default_rng(0).normal(size=(64, STATE_DIM + CHUNK * ACTION_DIM)), dtype=torch.float32
    )
    with torch.no_grad():
        actions = learners[1.0].actor(observations)
        regression = ((actions - observations[:, STATE_DIM:]) ** 2).sum(dim=1).mean().item()
        q1 = learners[1.0].critic.q1_forward(observations, actions).mean().item()
        losses = {weight: learner.actor_loss(observations).item() for weight, learner in learners.items()}
    assert losses[0.0] == pytest.approx(0.5 * regression, rel=1e-5)
    assert losses[1.0] == pytest.approx(0.5 * regression - q1, rel=1e-5)
    with pytest.raises(ValidationError, match="q_weight"):
        LearnerConfig(q_weight=-1.0)


def test_intervention_replaces_reference_and_executed_action() -> None:
    learner = _learner()
    rng = np.random.default_rng(2)
    human = rng.uniform(-1, 1, (CHUNK, ACTION_DIM)).astype(np.float32)
    learner.add_transition(_transition(rng, action=human, intervened=True))
    learner.add_transition(_transition(rng))
    _, references = learner.replay_buffer.split(learner.replay_buffer.observations[:2, 0])
    np.testing.assert_allclose(references[0], human)
    np.testing.assert_allclose(learner.replay_buffer.actions[0, 0].reshape(CHUNK, ACTION_DIM), human)
    assert not np.allclose(references[1], learner.replay_buffer.actions[1, 0].reshape(CHUNK, ACTION_DIM))
    assert learner.replay_buffer.interventions[:2, 0].tolist() == [True, False]


def test_non_chunk_actions_are_refused() -> None:
    learner = _learner()
    rng = np.random.default_rng(3)
    with pytest.raises(NonChunkActionError, match=r"action: expected a chunk of shape \(10, 2\)"):
        learner.add_transition(_transition(rng, action=np.zeros(ACTION_DIM)))
    with pytest.raises(NonChunkActionError, match="references"):
        learner.act(np.zeros((1, STATE_DIM)), np.zeros((1, 5, ACTION_DIM)))
    with pytest.raises(RLTInputError, match="reward"):
        learner.add_transition(_transition(rng, reward=float("nan")))
    assert learner.replay_buffer.size() == 0


def test_diverged_critic_stops_training_and_writes_no_checkpoint(tmp_path) -> None:
    learner = _learner()
    _filled(learner)
    learner.update(2)
    learner.save_checkpoint(tmp_path / "good.safetensors")
    restored = ChunkedTD3.load_checkpoint(tmp_path / "good.safetensors")
    probe = np.zeros((1, STATE_DIM)), np.zeros((1, CHUNK, ACTION_DIM))
    np.testing.assert_allclose(restored.act(*probe), learner.act(*probe))
    with torch.no_grad():
        next(learner.critic.q_networks[0].parameters()).fill_(float("nan"))
    with pytest.raises(CriticDivergedError, match="critic_loss is nan"):
        learner.update(1)
    with pytest.raises(CriticDivergedError, match="not finite"):
        learner.save_checkpoint(tmp_path / "broken.safetensors")
    assert not (tmp_path / "broken.safetensors").exists()


def test_residual_mode_starts_at_the_reference_and_stays_within_its_scale() -> None:
    learner = _learner(residual_scale=0.1, beta=0.0, ref_dropout=0.0)
    rng = _filled(learner)
    states = rng.normal(size=(8, STATE_DIM))
    references = rng.uniform(-0.9, 0.9, (8, CHUNK, ACTION_DIM))
    np.testing.assert_allclose(learner.act(states, references), references, atol=1e-6)
    learner.update(40)
    chunks = learner.act(states, references)
    assert not np.allclose(chunks, references, atol=1e-6), "the residual learns"
    assert np.abs(chunks - references).max() <= 0.1 + 1e-5
    with pytest.raises(ValidationError, match="residual_scale"):
        LearnerConfig(residual_scale=0.0)


def test_rlt_checkpoint_round_trips_and_a_diverged_learner_writes_nothing(tmp_path) -> None:
    learner, token = _learner(), RLToken(RLTokenConfig(num_tokens=2, embed_dim=4, z_dim=STATE_DIM))
    deployment = RLTDeployment("t", PriorSpec("vla-3", None, 0), "hand-object", 0.05)
    manifest = RLTManifest(
        rl_version="v",
        deployment=deployment,
        config=RLTConfig(),
        env=EnvConfig(task="reach-v3", render=False),
        token=token.config,
        env_steps=0,
        online_episodes=0,
        stored_episodes=0,
        updates=0,
        replay_chunks=0,
    )
    save_rlt_checkpoint(tmp_path / "ok", learner, token, manifest)
    loaded = load_rlt_checkpoint(tmp_path / "ok")
    states, references = np.zeros((1, STATE_DIM)), np.zeros((1, CHUNK, ACTION_DIM))
    np.testing.assert_allclose(loaded.learner.act(states, references), learner.act(states, references))
    assert loaded.manifest == manifest and loaded.deployment == deployment
    assert loaded.token.config == token.config
    with torch.no_grad():
        next(learner.critic.parameters()).fill_(float("nan"))
    with pytest.raises(CriticDivergedError):
        save_rlt_checkpoint(tmp_path / "bad", learner, token, manifest)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ok"]
    with pytest.raises(RLTInputError, match="missing"):
        load_rlt_checkpoint(tmp_path)


def _offset_states(learner: ChunkedTD3, count: int = 256) -> np.ndarray:
    """Fill replay with states far from 0 and at mm scale (like hand and goal positions); return them."""
    rng = np.random.default_rng(3)
    states = 0.5 + 0.02 * rng.normal(size=(count, STATE_DIM))
    for state in states:
        learner.add_transition(_transition(rng, state=state))
    return states


def test_state_normalization_is_fitted_on_warm_up_data_at_the_first_update_then_frozen(tmp_path) -> None:
    learner = _learner()
    states = _offset_states(learner)
    assert not learner.state_normalization_fitted
    learner.update(1)
    assert learner.state_normalization_fitted
    for features in learner.policy.state_features():
        np.testing.assert_allclose(features.state_mean.numpy(), states.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(features.state_std.numpy(), states.std(axis=0), rtol=1e-4)
    with torch.no_grad():
        standardized = learner.critic.features_extractor(
            torch.as_tensor(learner.replay_buffer.observations[:256, 0])
        )
    assert standardized.mean().abs() < 1e-4 and (standardized.std(dim=0) - 1).abs().max() < 1e-2
    mean_before = learner.critic.features_extractor.state_mean.clone()
    _filled(learner, count=64, seed=5)  # new data far from the warm-up's: the statistics stay frozen
    learner.update(1)
    assert torch.equal(learner.critic.features_extractor.state_mean, mean_before)
    learner.save_checkpoint(tmp_path / "learner.safetensors")
    loaded = ChunkedTD3.load_checkpoint(tmp_path / "learner.safetensors")
    assert loaded.state_normalization_fitted
    assert torch.equal(loaded.actor.features_extractor.state_std, learner.actor.features_extractor.state_std)


def test_actor_weight_sync_carries_the_state_normalization() -> None:
    learner, worker = _learner(), _learner()
    states = _offset_states(learner)
    learner.update(4)
    worker.load_actor_weights(learner.actor_weights(), learner.weights_version)
    references = np.zeros((3, CHUNK, ACTION_DIM))
    np.testing.assert_allclose(
        worker.act(states[:3], references), learner.act(states[:3], references), atol=1e-6
    )


def test_state_normalization_can_be_switched_off_and_refuses_bad_states() -> None:
    learner = _learner(normalize_state=False)
    _offset_states(learner)
    learner.update(1)
    assert not learner.state_normalization_fitted
    assert torch.equal(learner.critic.features_extractor.state_std, torch.ones(STATE_DIM))
    with pytest.raises(RLTInputError, match="N×6"):
        learner.fit_state_normalization(np.zeros((5, STATE_DIM + 1)))


def test_a_checkpoint_from_before_state_normalization_loads_with_raw_states(tmp_path) -> None:
    from safetensors.torch import save_file

    learner = _learner(normalize_state=False)
    _offset_states(learner)
    learner.update(2)
    config = {
        k: v
        for k, v in learner.config.model_dump(mode="json").items()
        if k not in ("normalize_state", "q_weight")
    }
    tensors = {
        name: value.contiguous()
        for name, value in learner.policy.state_dict().items()
        if ".features_extractor." not in name
    }
    metadata = {"config": json.dumps(config), "state_dim": str(STATE_DIM), "action_dim": str(ACTION_DIM)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = ChunkedTD3.load_checkpoint(tmp_path / "old.safetensors")
    assert not loaded.config.normalize_state and not loaded.state_normalization_fitted
    states, references = np.full((2, STATE_DIM), 0.5), np.zeros((2, CHUNK, ACTION_DIM))
    np.testing.assert_allclose(loaded.act(states, references), learner.act(states, references), atol=1e-6)
