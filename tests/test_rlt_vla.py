"""RLT on the built-in VLA: its final prefix embeddings feed the RL token and the online loop end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rlt_loop import RLTLoop
from policies.base import stack_observations
from policies.training import EpisodeArrays, build_dataset, create_policy
from policies.vla import VLAConfig, VLAPolicy
from rlt.errors import EmbeddingDimError
from rlt.online import OnlineConfig, OnlineRLT
from rlt.phase import AlwaysCritical
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import token_config_for
from rlt.td3 import LearnerConfig
from rlt.toy import BiasedReachPrior, PointReachEnv
from storage.records import EpisodeRecord

torch.set_num_threads(1)

IMAGE = 48


def _vla() -> VLAPolicy:
    """A tiny untrained VLA whose tokenizer and normalization are fitted on two toy prior episodes."""
    env, prior = PointReachEnv(image_size=IMAGE), BiasedReachPrior(seed=0)
    episodes = []
    for seed in range(2):
        observation, _ = env.reset(seed=seed)
        images, states, actions = [], [], []
        for action in prior.infer(stack_observations([observation])).actions[0]:
            images.append(observation["images"]["top"])
            states.append(observation["state"])
            actions.append(action)
            observation = env.step(action)[0]
        episodes.append(
            EpisodeArrays({"top": np.stack(images)}, np.stack(states), np.stack(actions), "reach the goal")
        )
    config = VLAConfig.preset(
        "tiny", image_size=IMAGE, cameras=("top",), state_dim=4, action_dim=2, num_steps=2
    )
    return create_policy(config, build_dataset(episodes, horizon=10), seed=0)


def _loop(vla: VLAPolicy, token: RLToken, records: list[EpisodeRecord]) -> RLTLoop:
    learner = OnlineRLT(
        vla,
        AlwaysCritical(),
        token,
        OnlineConfig(
            task="point-reach",
            warmup_episodes=2,
            total_env_steps=30,
            token_steps=5,
            record_images=True,
        ),
        LearnerConfig(batch_size=4, learning_starts=4, net_arch=(32, 32)),
        proprio_dim=4,
    )
    env = PointReachEnv(image_size=IMAGE, max_steps=30)
    return RLTLoop(learner, lambda: env, on_episode=records.append)


@pytest.mark.parametrize("normalization", ["channel", "position"])
def test_online_rlt_runs_on_vla_embeddings(normalization: str) -> None:
    vla = _vla()
    observation = PointReachEnv(image_size=IMAGE).reset(seed=0)[0]
    config = token_config_for(vla, observation, z_dim=8, model_dim=32, normalization=normalization)
    assert (config.num_tokens, config.embed_dim) == (vla.config.prefix_len, vla.config.width)
    records: list[EpisodeRecord] = []
    loop = _loop(vla, RLToken(config), records)
    loop.run()
    assert loop.rlt.learner.state_dim == 8 + 4
    assert loop.rlt.learner.replay_buffer.size() >= 6
    assert loop.rlt.learner._n_updates > 0
    assert [record.metadata["mode"] for record in records] == ["prior", "prior", "learner"]
    for record in records:
        record.validate()
        assert record.images["top"].shape == (record.length, IMAGE, IMAGE, 3)
    assert set(records[-1].policy_versions) == {"rlt"}
    statistics = (config.embed_dim,) if normalization == "channel" else (config.num_tokens, config.embed_dim)
    assert loop.rlt.token.embed_std.shape == statistics


def test_vla_embedding_width_mismatch_is_a_clear_error() -> None:
    vla = _vla()
    wrong = RLToken(RLTokenConfig(num_tokens=vla.config.prefix_len, embed_dim=vla.config.width + 1, z_dim=8))
    with pytest.raises(EmbeddingDimError, match=rf"B×{vla.config.prefix_len}×{vla.config.width + 1}"):
        _loop(vla, wrong, []).run()
