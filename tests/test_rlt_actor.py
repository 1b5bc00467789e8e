"""The RLT actor as a ``Policy`` (rlt.actor): modes, one latched hand-off per env, the reference it returns."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from actors.rollout import RolloutWorker
from envs.metaworld_env import PRIVILEGED_DIM, EnvConfig, MetaWorldEnv
from envs.scripted import ScriptedPolicy
from policies.base import Policy, stack_observations
from rlt.actor import RLTActor
from rlt.errors import RLTInputError
from rlt.phase import DistanceSwitch, InfoKeySwitch
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import EmbeddingPrior, RLStateEncoder, StateProjectionEmbedder
from rlt.td3 import ChunkedTD3, LearnerConfig
from rlt.toy import BiasedReachPrior, PointReachEnv

torch.set_num_threads(1)

FAR, NEAR = (0.4, 0.0), (0.05, 0.0)  # the point's offset from the goal: outside / inside the 0.15 hand-off


def _observation(offset: tuple[float, float]) -> dict:
    state = np.array([offset[0], offset[1], 0.0, 0.0], np.float32)
    return {"images": {}, "state": state, "prompt": "reach", "privileged": state.copy()}


def _actor() -> RLTActor:
    torch.manual_seed(0)
    prior = EmbeddingPrior(BiasedReachPrior(noise=0.0), StateProjectionEmbedder(4, 4, 16))
    token = RLToken(RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=8, model_dim=16, encoder_layers=1))
    learner = ChunkedTD3(8 + 4, 2, LearnerConfig(net_arch=(16, 16), seed=0))
    return RLTActor(
        prior,
        DistanceSwitch([0, 1], [2, 3], 0.15),
        learner,
        RLStateEncoder(token, 4),
        rl_version="rlt-test",
        mode="eval",
    )


def test_the_hand_off_latches_per_env_and_the_reference_rides_along() -> None:
    actor = _actor()
    assert isinstance(actor, Policy) and actor.action_horizon == 10
    first = actor.infer_envs(stack_observations([_observation(FAR), _observation(NEAR)]), [5, 7])
    assert first.critical.tolist() == [False, True]
    assert first.versions == [actor.prior.version, "rlt-test"]
    prior_chunk = actor.prior.infer(stack_observations([_observation(FAR), _observation(NEAR)]))
    np.testing.assert_allclose(first.reference, prior_chunk.actions[:, :10])
    np.testing.assert_allclose(first.actions[0], first.reference[0])  # before the hand-off: the prior's ã
    state = actor.encoder.encode(prior_chunk.embeddings[1:], _observation(NEAR)["state"][None])
    expected = np.clip(actor.learner.act(state, first.reference[1:]), -1.0, 1.0)[0]
    np.testing.assert_allclose(first.actions[1], expected, atol=1e-6)
    assert not np.allclose(first.actions[1], first.reference[1])

    swapped = actor.infer_envs(stack_observations([_observation(NEAR), _observation(FAR)]), [5, 7])
    assert swapped.critical.tolist() == [True, True], "env 7 stays handed off although it moved away"
    actor.reset_env(7)
    again = actor.infer_envs(stack_observations([_observation(FAR), _observation(FAR)]), [5, 7])
    assert again.critical.tolist() == [True, False], "a reset starts only env 7 over"


def test_modes_prior_eval_and_learner() -> None:
    actor = _actor()
    batch = stack_observations([_observation(NEAR)])
    evaluated = [actor.infer(batch).actions for _ in range(2)]
    np.testing.assert_array_equal(*evaluated)  # eval: deterministic
    actor.mode = "learner"
    explored = actor.infer(batch)
    assert not np.allclose(explored.actions, evaluated[0]) and np.abs(explored.actions).max() <= 1.0
    actor.mode = "prior"
    prior = actor.infer(batch)
    assert prior.critical.tolist() == [True] and prior.versions == [actor.prior.version]
    np.testing.assert_array_equal(prior.actions, prior.reference)
    actor.mode, actor.defer_until_trained = (
        "eval",
        True,
    )  # online: an untrained learner leaves it to the prior
    assert actor.infer(batch).versions == [actor.prior.version]
    actor.learner.load_actor_weights(actor.learner.actor_weights(), version=1)  # as after a gradient step
    assert actor.infer(batch).versions == ["rlt-test"]
    with pytest.raises(RLTInputError, match="mode: expected one of"):
        actor.mode = "greedy"


def test_each_record_carries_the_priors_embeddings_of_its_own_chunks_from_a_two_env_worker() -> None:
    """Two envs of different episode lengths (3 and 4 chunks) share the worker's batched ``infer_envs`` calls;
    with ``record_embeddings`` each record holds, row ``k``, the embeddings the actor returned for its env's
    chunk ``k`` (``EpisodeRecord.chunk_embeddings``); without it, none."""
    actor = _actor()
    returned: dict[int, list[np.ndarray]] = {0: [], 1: []}
    infer_envs = actor.infer_envs

    def spy(batch, envs, infos=None):
        chunk = infer_envs(batch, envs, infos)
        for row, env in enumerate(envs):
            returned[env].append(chunk.embeddings[row])
        return chunk

    actor.infer_envs = spy
    envs = [PointReachEnv(tolerance=0.0, max_steps=25), PointReachEnv(tolerance=0.0, max_steps=35)]
    for record_embeddings in (True, False):
        records = []
        worker = RolloutWorker(
            [lambda env=env: env for env in envs],
            actor,
            records.append,
            task="point-reach",
            record_images=False,
            record_embeddings=record_embeddings,
        )
        worker.run(episodes=5)
        worker.close()
        if not record_embeddings:
            assert all(record.chunk_embeddings is None for record in records)
            continue
        for env in (0, 1):
            played = [record for record in records if record.env_id == f"worker0/env{env}"]
            assert {len(record.chunks) for record in played} == {3 + env}
            kept = np.concatenate([record.chunk_embeddings for record in played])
            assert kept.shape == (len(played) * (3 + env), 4, 16)
            np.testing.assert_array_equal(kept, np.stack(returned[env][: len(kept)]))
            for record in played:
                record.validate()


class _InfoLog(gym.Wrapper):
    """Keeps the env info that came with each observation: ``infos[t]`` with observation ``t`` (``reset``'s at 0)."""

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.infos = [info]
        return observation, info

    def step(self, action):
        *result, info = self.env.step(action)
        self.infos.append(info)
        return (*result, info)


def test_an_info_key_switch_hands_off_through_the_rollout_worker_on_meta_world() -> None:
    """``InfoKeySwitch("grasp_success")`` on pick-place-v3: the worker passes the entry of the info that came with
    each chunk start's observation, so the hand-off latches at the first chunk start after the grasp."""
    env = _InfoLog(MetaWorldEnv(EnvConfig(task="pick-place-v3", render=False, max_episode_steps=150)))
    prior = EmbeddingPrior(
        ScriptedPolicy("pick-place-v3", action_horizon=5, seed=0),
        StateProjectionEmbedder(PRIVILEGED_DIM, 1, 4, key="privileged"),
    )
    learner = ChunkedTD3(4, 4, LearnerConfig(chunk_size=5, net_arch=(8,), seed=0))
    switch = InfoKeySwitch("grasp_success")
    actor = RLTActor(prior, switch, learner, None, rl_version="rlt-test", mode="prior")
    assert actor.info_keys == ("grasp_success",)
    records = []
    worker = RolloutWorker([lambda: env], actor, records.append, task="pick-place-v3", record_images=False)
    worker.seed_episodes([3])
    worker.run(episodes=1)
    (record,) = records
    grasped = [bool(info.get("grasp_success", False)) for info in env.infos[: record.length]]
    expected, latched = [], False
    for t in range(record.length):
        latched = latched or (record.chunk_offsets[t] == 0 and grasped[t])
        expected.append(int(latched))
    assert record.metadata["critical_phase"] == expected
    first = expected.index(1)
    assert 0 < first < record.length and record.chunk_offsets[first] == 0
    assert not any(grasped[t] for t in range(first) if record.chunk_offsets[t] == 0)
    worker.close()
