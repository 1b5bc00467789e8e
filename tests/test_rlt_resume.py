"""The RLT learner resumes: its training state (weights, both optimizers, replay, update counter, random state)
round-trips, and an online run stopped mid-way continues from its last state to the uninterrupted run's weights."""

from __future__ import annotations

import pytest
import torch

from actors.rlt_loop import RLTLoop
from rlt.online import OnlineConfig, OnlineRLT
from rlt.phase import DistanceSwitch
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import EmbeddingPrior, StateProjectionEmbedder
from rlt.td3 import ChunkedTD3, LearnerConfig
from rlt.toy import BiasedReachPrior, PointReachEnv

torch.set_num_threads(1)


class Interrupted(Exception):
    """Stands in for the SIGKILL: raised from the episode sink mid-run."""


def _loop(on_episode=None) -> RLTLoop:
    torch.manual_seed(0)
    token = RLToken(RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=8, model_dim=16, encoder_layers=1))
    prior = EmbeddingPrior(
        BiasedReachPrior(noise=0.0, horizon=10, seed=0), StateProjectionEmbedder(4, 4, 16, seed=0)
    )
    learner = OnlineRLT(
        prior,
        DistanceSwitch([0, 1], [2, 3], 0.15),
        token,
        OnlineConfig(
            task="point-reach",
            warmup_episodes=4,
            total_env_steps=240,
            token_steps=5,
        ),
        LearnerConfig(batch_size=32, learning_starts=32, net_arch=(32, 32), utd_ratio=2, seed=0),
        proprio_dim=4,
    )
    env = PointReachEnv()
    return RLTLoop(learner, lambda: env, on_episode=on_episode)


def _weights(learner: ChunkedTD3) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in learner.policy.state_dict().items()}


def test_stopped_online_rlt_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = _loop()
    straight.run()
    assert straight.rlt.learner.weights_version > 0

    seen = []

    def stop_after_eight(record):
        seen.append(record)
        if len(seen) == 8:  # 4 warm-up episodes, then the 4th online one
            raise Interrupted

    state = tmp_path / "rlt_state.pt"
    with pytest.raises(Interrupted):
        _loop(stop_after_eight).run(state_path=state)
    assert state.is_file()

    resumed = _loop()
    resumed.run(state_path=state)
    assert resumed.env_steps == straight.env_steps
    assert resumed.rlt.learner.weights_version == straight.rlt.learner.weights_version
    assert resumed.rlt.learner.replay_buffer.size() == straight.rlt.learner.replay_buffer.size()
    expected, found = _weights(straight.rlt.learner), _weights(resumed.rlt.learner)
    for name, value in expected.items():
        assert torch.equal(value, found[name]), name


def test_learner_training_state_round_trips_replay_and_optimizers(tmp_path):
    loop = _loop()
    loop.warm_up()
    learner = loop.rlt.learner
    path = learner.save_training_state(tmp_path / "learner.pt")
    again = ChunkedTD3.resume(path)
    assert again.replay_buffer.size() == learner.replay_buffer.size() > 0
    assert again.weights_version == learner.weights_version
    learner.update(5)
    again.update(5)
    for name, value in _weights(learner).items():
        assert torch.equal(value, _weights(again)[name]), name
    assert ChunkedTD3.resume(tmp_path / "none.pt") is None
