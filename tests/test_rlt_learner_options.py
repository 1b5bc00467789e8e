"""The issue-19 learner options against hand-computed values: ensemble target, n-step and stride transitions,
the warm-up / weight schedule, residual-mode target smoothing, β's reduction, the human mask, the second replay
and temporally consistent exploration."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from rlt.actor import RLTActor
from rlt.buffer import ChunkTransition
from rlt.online import ChunkContext, ChunkStep, EpisodeChunks, OnlineConfig, chunk_transitions
from rlt.state import RLStateEncoder
from rlt.td3 import ChunkedTD3, LearnerConfig

torch.set_num_threads(1)

STATE_DIM, ACTION_DIM, CHUNK = 3, 2, 4


def _learner(**overrides) -> ChunkedTD3:
    settings = {"chunk_size": CHUNK, "batch_size": 32, "learning_starts": 8, "net_arch": (32, 32)}
    settings |= {"buffer_size": 512, "seed": 0, **overrides}
    return ChunkedTD3(STATE_DIM, ACTION_DIM, LearnerConfig(**settings))


def _transition(rng: np.random.Generator, **fields) -> ChunkTransition:
    values = {
        "state": rng.normal(size=STATE_DIM),
        "reference": rng.uniform(-0.5, 0.5, (CHUNK, ACTION_DIM)),
        "action": rng.uniform(-1, 1, (CHUNK, ACTION_DIM)),
        "reward": 0.0,
        "next_state": rng.normal(size=STATE_DIM),
        "next_reference": rng.uniform(-0.5, 0.5, (CHUNK, ACTION_DIM)),
        "terminated": False,
        "discount": 0.5,
    }
    return ChunkTransition(**values | fields)


def test_ensemble_target_is_the_min_over_the_sampled_members() -> None:
    learner = _learner(n_critics=5, target_critics=2, critic_layer_norm=True, target_policy_noise=0.0)
    assert len(learner.critic.q_networks) == 5
    assert any(isinstance(m, torch.nn.LayerNorm) for m in learner.critic.q_networks[0])
    rng = np.random.default_rng(0)
    learner.add_transition(_transition(rng, reward=0.25, discount=0.5))
    learner.add_transition(_transition(rng, reward=1.0, discount=0.5, terminated=True))
    batch = learner.replay_buffer._get_samples(np.arange(2))
    targets = learner.critic_targets(batch, members=[1, 3]).squeeze(1).numpy()
    with torch.no_grad():
        features = learner.critic_target.features_extractor(batch.next_observations)
        actions = learner.actor_target(batch.next_observations)  # residual off: the chunk itself
        q1 = learner.critic_target.q_networks[1](torch.cat([features, actions], 1)).squeeze(1).numpy()
        q3 = learner.critic_target.q_networks[3](torch.cat([features, actions], 1)).squeeze(1).numpy()
    assert targets[0] == pytest.approx(0.25 + 0.5 * min(q1[0], q3[0]), rel=1e-5)
    assert targets[1] == pytest.approx(1.0)
    draws = {tuple(learner.target_members()) for _ in range(30)}
    assert all(len(set(draw)) == 2 and set(draw) <= set(range(5)) for draw in draws) and len(draws) > 3


def _context(value: float) -> ChunkContext:
    return ChunkContext(
        np.zeros((1, 1), np.float32),
        np.full(STATE_DIM, value, np.float32),
        np.full((CHUNK, ACTION_DIM), value),
    )


def _step(start: int, rewards: list[float], terminated: bool = False, inner=(), human=None) -> ChunkStep:
    executed = np.arange(start, start + CHUNK, dtype=np.float32)[:, None].repeat(ACTION_DIM, 1) / 100
    return ChunkStep(
        _context(start), executed, np.asarray(rewards), terminated, True, human is not None, inner, human
    )


def test_n_step_transitions_bootstrap_n_chunks_later() -> None:
    episode = EpisodeChunks(
        [_step(0, [0, 0, 0, 0]), _step(4, [0, 0, 0, 0]), _step(8, [0, 0, 1], terminated=True)]
    )
    encoder = RLStateEncoder(None, STATE_DIM)
    first, second, third = chunk_transitions(episode, encoder, gamma=0.5, n_step=2)
    assert (first.reward, first.discount, first.terminated) == (0.0, 0.5**8, False)
    np.testing.assert_allclose(first.next_state, np.full(STATE_DIM, 8.0))  # the context 2 chunks later
    assert (second.reward, second.terminated) == (pytest.approx(0.5**6), True)  # reward 6 steps on
    assert (third.reward, third.terminated) == (pytest.approx(0.25), True)


def test_stride_transitions_overlap_chunks_with_recomputed_contexts() -> None:
    episode = EpisodeChunks(
        [_step(0, [0] * 4, inner=(_context(2),)), _step(4, [0] * 4, inner=(_context(6),))],
        final=_context(8),
    )
    transitions = chunk_transitions(episode, RLStateEncoder(None, STATE_DIM), gamma=0.5, stride=2)
    assert [t.state[0] for t in transitions] == [0, 2, 4, 6]
    offset = transitions[1]  # starts 2 steps into the first chunk, ends 2 steps into the second
    np.testing.assert_allclose(offset.action[:, 0], np.array([2, 3, 4, 5]) / 100)
    np.testing.assert_allclose(offset.reference, _context(2).reference)
    assert offset.next_state[0] == 6 and offset.discount == pytest.approx(0.5**4)
    assert transitions[3].next_state[0] == 8  # bootstraps from the context after the truncated episode


def test_human_mask_per_step_replaces_only_the_human_rows() -> None:
    episode = EpisodeChunks(
        [_step(0, [0] * 4, human=np.array([False, True, True, False]))], final=_context(4)
    )
    (transition,) = chunk_transitions(episode, RLStateEncoder(None, STATE_DIM), gamma=0.5)
    for mode, replaced in (("step", [False, True, True, False]), ("chunk", [True] * 4)):
        learner = _learner(human_mask=mode)
        learner.add_transition(transition)
        _, reference = learner.replay_buffer.split(learner.replay_buffer.observations[:1, 0])
        expected = np.where(np.array(replaced)[:, None], transition.action, transition.reference)
        np.testing.assert_allclose(reference[0], expected)


def test_warm_up_and_ramp_schedule() -> None:
    config = LearnerConfig(
        critic_warmup_updates=10, ramp_updates=20, q_weight_start=0.05, q_weight=0.5, beta=1.0, beta_end=0.1
    )
    assert config.loss_weights(5) == pytest.approx((0.05, 1.0))
    assert config.loss_weights(20) == pytest.approx((0.275, 0.55))
    assert config.loss_weights(40) == pytest.approx((0.5, 0.1))
    assert LearnerConfig(beta=0.3).loss_weights(1) == (1.0, 0.3)
    learner = _learner(critic_warmup_updates=10, policy_delay=1)
    rng = np.random.default_rng(0)
    for _ in range(16):
        learner.add_transition(_transition(rng))
    before = [p.detach().clone() for p in learner.actor.parameters()]
    learner.train(10, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.actor.parameters(), strict=True))
    learner.train(1, batch_size=8)
    assert not all(torch.equal(a, b) for a, b in zip(before, learner.actor.parameters(), strict=True))


def test_residual_target_smoothing_is_scaled_to_the_residual() -> None:
    rng = np.random.default_rng(0)
    observations = torch.as_tensor(
        np.concatenate([rng.normal(size=(4000, STATE_DIM)), np.zeros((4000, CHUNK * ACTION_DIM))], 1),
        dtype=torch.float32,
    )
    for space, scale in (("residual", 0.1), ("action", 1.0)):
        learner = _learner(residual_scale=0.1, target_noise_space=space)  # zero-initialised residual
        with torch.no_grad():
            deviation = learner.smoothed_next_chunks(observations).numpy()  # the reference is 0
        assert np.abs(deviation).max() <= 0.5 * scale + 1e-6
        assert deviation.std() == pytest.approx(0.2 * scale * 0.95, rel=0.1)  # N(0, 0.2) clipped at ±0.5


def test_beta_on_a_mean_over_entries_and_on_the_residual() -> None:
    rng = np.random.default_rng(0)
    observations = torch.as_tensor(
        np.concatenate([rng.normal(size=(16, STATE_DIM)), rng.uniform(-0.5, 0.5, (16, CHUNK * 2))], 1),
        dtype=torch.float32,
    )
    for settings in ({}, {"beta_reduction": "mean"}):
        learner = _learner(ref_dropout=0.0, **settings)
        with torch.no_grad():
            chunks = learner.actor(observations)
            squared = (chunks - observations[:, STATE_DIM:]) ** 2
            loss = learner.actor_loss(observations, (0.0, 2.0)).item()
        per_row = squared.mean(1) if settings else squared.sum(1)
        assert loss == pytest.approx(2.0 * per_row.mean().item(), rel=1e-5)
    residual = _learner(residual_scale=0.5, beta_on="residual", beta_reduction="mean", ref_dropout=0.0)
    torch.nn.init.constant_([m for m in residual.actor.mu if isinstance(m, torch.nn.Linear)][-1].bias, 0.3)
    with torch.no_grad():
        expected = (residual.actor(observations) ** 2).mean().item()  # tanh(0.3)² per entry, not (0.5·…)²
        assert residual.actor_loss(observations, (0.0, 1.0)).item() == pytest.approx(expected, rel=1e-5)


def test_second_replay_supplies_its_share_of_every_batch() -> None:
    learner = _learner(demo_fraction=0.25)
    rng = np.random.default_rng(0)
    for _ in range(20):
        learner.add_transition(_transition(rng, reward=0.0))
        learner.add_transition(_transition(rng, reward=1.0), demo=True)
    learner.add_transition(_transition(rng, reward=1.0, intervened=True))  # human chunks go there too
    assert (learner.replay_buffer.size(), learner.demo_buffer.size()) == (20, 21)
    batch = learner.sample(32)
    assert batch.rewards.shape == (32, 1) and batch.rewards.sum().item() == 8.0


def test_offset_exploration_holds_a_chunk_and_correlates_across_chunks() -> None:
    config = OnlineConfig(task="t", exploration="offset", exploration_rho=0.8, exploration_noise=0.3)
    actor = types.SimpleNamespace(
        exploration=config,
        rng=np.random.default_rng(0),
        _offsets={},
        action_horizon=CHUNK,
        action_dim=ACTION_DIM,
    )
    first = RLTActor.exploration_noise(actor, env=3)
    second = RLTActor.exploration_noise(actor, env=3)
    assert set(actor._offsets) == {3}  # one offset per env
    draws = np.random.default_rng(0).normal(0.0, 0.3, (2, ACTION_DIM))
    np.testing.assert_allclose(first, np.tile(draws[0], (CHUNK, 1)))
    np.testing.assert_allclose(second[0], 0.8 * draws[0] + 0.6 * draws[1])
