"""Online RLT on real Ray (actors.rlt_learner): rollout actors → learner actor → weights back via the object store."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

from actors.cluster import ensure_ray
from actors.rlt_learner import RLTCluster
from actors.sinks import StoreSink
from rlt.errors import RLTInputError
from rlt.online import OnlineRLT, chunk_transitions
from rlt.td3 import LearnerConfig
from rlt.toy import toy_online_loop
from storage import ExperienceStore

torch.set_num_threads(1)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in Ray workers


def _toy_loop(seed: int, store_url: str | None = None, warmup_episodes: int = 20) -> OnlineRLT:
    """The CI toy (rlt.toy) loop with small learner settings; episodes go to ``store_url`` when given."""
    learner = LearnerConfig(batch_size=32, learning_starts=32, net_arch=(64, 64), seed=seed)
    sink = None if store_url is None else StoreSink(store_url)
    return toy_online_loop(seed, learner, warmup_episodes, on_episode=sink)


def test_weights_and_token_move_between_loops_and_learn_trains_on_foreign_episodes() -> None:
    learner, actor = _toy_loop(0, warmup_episodes=20), _toy_loop(1, warmup_episodes=0)
    with pytest.raises(RLTInputError, match="RL token must be fitted"):
        actor.learn([])
    learner.warm_up()
    actor.use_token(learner.token.state_dict())
    learner.learn([learner.run_episode("learner")[0] for _ in range(3)])
    with pytest.raises(RLTInputError, match="version"):
        actor.learner.load_actor_weights(learner.learner.actor_weights(), -1)
    actor.learner.load_actor_weights(learner.learner.actor_weights(), learner.learner.weights_version)
    assert actor.learner.weights_version == learner.learner.weights_version > 0
    chunks, _ = actor.run_episode("learner")  # an episode played elsewhere …
    before = learner.learner.replay_buffer.size()
    added = learner.learn([chunks])  # … trains the learner
    assert added == len(chunk_transitions(chunks, learner.encoder, learner.learner.config.gamma))
    assert learner.learner.replay_buffer.size() == before + added
    context = chunks.steps[-1].context
    states = [
        loop.encoder.encode(context.embeddings[None], context.proprio[None]) for loop in (learner, actor)
    ]
    np.testing.assert_array_equal(states[0], states[1])
    actor.learner.load_actor_weights(learner.learner.actor_weights(), learner.learner.weights_version)
    np.testing.assert_array_equal(
        actor.learner.act(states[1], context.reference[None]),
        learner.learner.act(states[0], context.reference[None]),
    )


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_rollout_actors_feed_the_learner_actor_and_act_with_its_newer_weights(local_ray, tmp_path) -> None:
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt-ray.db'}")
    store.upgrade()
    probe = _toy_loop(0, warmup_episodes=0)
    store.register_policy_version(probe.prior.version, "scripted")
    store.register_policy_version(probe.config.rl_version, "rlt")
    factory = functools.partial(_toy_loop, store_url=store.url)
    cluster = RLTCluster(factory, num_workers=2, seed=0, learner_cpus=0.5, cpus_per_worker=0.5)
    try:
        assert cluster.warm_up() > 0
        played = cluster.run(episodes_per_worker=4)
        received, published = cluster.history()
    finally:
        cluster.shutdown()

    assert len(received) == 8 and {episode.worker_id for episode in received} == {0, 1}
    assert sum(episode.transitions for episode in received) > 0
    for worker_id, episodes in enumerate(played):
        versions = [acted.version for acted, _ in episodes]
        assert all(acted.worker_id == worker_id for acted, _ in episodes)
        assert versions == sorted(versions) and versions[-1] > versions[0], versions
        for acted, checksum in episodes:  # the weights that acted are exactly those published as that version
            assert checksum == pytest.approx(published[acted.version], rel=0, abs=1e-9)
    sent = sorted((episode.worker_id, episode.version) for episode in received)
    assert sent == sorted((acted.worker_id, acted.version) for episodes in played for acted, _ in episodes)

    learner_mode = [
        store.load_episode(summary.uuid, images=False) for summary in store.list_episodes(task="point-reach")
    ]
    learner_mode = [record for record in learner_mode if record.metadata["mode"] == "learner"]
    assert len(learner_mode) == 8
    assert sorted(record.metadata["actor_updates"] for record in learner_mode) == sorted(
        acted.version for episodes in played for acted, _ in episodes
    )
