"""Online RLT on real Ray (actors.rlt_learner): a RolloutCluster of RolloutWorkers playing the RLT actor feeds one
learner actor through the store; new weights reach the running workers; a SIGKILLed worker is restarted; the
learner trains on the workers' prior embeddings without re-running the prior."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

from actors.cluster import ensure_ray
from actors.rlt_learner import RLTCluster, Rollouts
from actors.rlt_loop import RLTLoop
from rlt.errors import RLTInputError
from rlt.online import OnlineRLT, chunk_transitions
from rlt.td3 import LearnerConfig
from rlt.toy import PointReachEnv, toy_online_loop
from storage import ExperienceStore

torch.set_num_threads(1)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in Ray workers


def _toy_learner(seed: int, warmup_episodes: int = 20) -> OnlineRLT:
    """The CI toy (rlt.toy) learner with small learner settings."""
    learner = LearnerConfig(batch_size=32, learning_starts=32, net_arch=(64, 64), seed=seed)
    return toy_online_loop(seed, learner, warmup_episodes)


def _toy_loop(seed: int, warmup_episodes: int = 20) -> RLTLoop:
    env = PointReachEnv()
    return RLTLoop(_toy_learner(seed, warmup_episodes), lambda: env)


def test_weights_and_token_move_between_learners_and_learn_trains_on_foreign_episodes() -> None:
    learner, actor = _toy_loop(0, warmup_episodes=20), _toy_loop(1, warmup_episodes=0)
    with pytest.raises(RLTInputError, match="RL token must be fitted"):
        actor.rlt.learn([])
    learner.warm_up()
    actor.rlt.use_token(learner.rlt.token.state_dict())
    learner.rlt.learn(learner.play("learner", 3))
    trained = learner.rlt.learner
    with pytest.raises(RLTInputError, match="version"):
        actor.rlt.learner.load_actor_weights(trained.actor_weights(), -1)
    actor.rlt.learner.load_actor_weights(trained.actor_weights(), trained.weights_version)
    assert actor.rlt.learner.weights_version == trained.weights_version > 0
    records = actor.play("learner", 1)  # an episode played elsewhere …
    before = trained.replay_buffer.size()
    added = learner.rlt.learn(records)  # … trains the learner
    (chunks,) = learner.rlt.episode_chunks(records)
    assert added == len(chunk_transitions(chunks, learner.rlt.encoder, trained.config.gamma)) > 0
    assert trained.replay_buffer.size() == before + added
    context = chunks.steps[-1].context
    states = [
        loop.rlt.encoder.encode(context.embeddings[None], context.proprio[None]) for loop in (learner, actor)
    ]
    np.testing.assert_array_equal(states[0], states[1])
    actor.rlt.learner.load_actor_weights(trained.actor_weights(), trained.weights_version)
    np.testing.assert_array_equal(
        actor.rlt.learner.act(states[1], context.reference[None]),
        trained.act(states[0], context.reference[None]),
    )


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def _toy_cluster(tmp_path, learner_factory, workers: int) -> tuple[ExperienceStore, RLTLoop, RLTCluster]:
    """A store under ``tmp_path``, the driver's toy loop and an ``RLTCluster`` of ``workers`` rollout workers
    (run ``rlt-ray``) around the learner actor ``learner_factory`` builds."""
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt-ray.db'}")
    store.upgrade()
    driver = _toy_loop(0, warmup_episodes=10)
    store.register_policy_version(driver.rlt.prior.version, "scripted")
    store.register_policy_version(driver.config.rl_version, "rlt")
    rollouts = Rollouts([PointReachEnv], "point-reach", store.url, "rlt-ray", seed=1, env_steps_per_call=60)
    cluster = RLTCluster(
        learner_factory, driver.rlt, rollouts, workers, seed=0, learner_cpus=0.5, cpus_per_worker=0.5
    )
    return store, driver, cluster


class _CallLog:
    """A prior passing ``infer`` on and appending one line (the calling pid) per call to the file ``path``."""

    def __init__(self, prior, path: str) -> None:
        self.prior, self.path = prior, path
        self.version, self.action_horizon, self.action_dim = (
            prior.version,
            prior.action_horizon,
            prior.action_dim,
        )

    def infer(self, batch):
        with open(self.path, "a") as log:
            log.write(f"{os.getpid()}\n")
        return self.prior.infer(batch)

    def reset(self) -> None:
        self.prior.reset()


def _logged_learner(path: str, seed: int) -> OnlineRLT:
    """The toy learner whose prior logs its calls to ``path`` (only the learner actor builds it)."""
    learner = _toy_learner(seed, warmup_episodes=10)
    learner.prior = _CallLog(learner.prior, path)
    return learner


def test_the_learner_actor_trains_on_the_workers_embeddings_without_re_running_the_prior(
    local_ray, tmp_path
) -> None:
    """The rollout worker's records reach the learner actor with the prior's embeddings of their chunks, so the
    learner's prior is never called, neither for the driver's warm-up episodes nor for the online ones; the same
    episodes loaded from the store (which keeps no embeddings) make it re-run the prior once per chunk."""
    calls = tmp_path / "learner-prior-calls.txt"
    store, driver, cluster = _toy_cluster(tmp_path, functools.partial(_logged_learner, str(calls)), 1)
    try:
        assert cluster.warm_up(driver.play("prior", 10)) > 0
        assert cluster.train(180, round_steps=90) >= 180
        received = cluster.history()
        online_calls = calls.read_text().count("\n") if calls.exists() else 0
        committed = list(store.iter_episodes(run_id="rlt-ray", images=False))
        cluster.warm_up([], committed[:2])  # records from the store: no embeddings, the prior runs again
        stored_calls = calls.read_text().count("\n") - online_calls
    finally:
        cluster.shutdown()
    assert len(received) >= len(committed) - 1 and sum(episode.transitions for episode in received) > 0
    assert online_calls == 0
    assert stored_calls == sum(len(record.chunks) for record in committed[:2]) > 0


@pytest.mark.slow
def test_rlt_through_rollout_workers_on_ray_survives_a_sigkilled_worker(local_ray, tmp_path) -> None:
    store, driver, cluster = _toy_cluster(tmp_path, functools.partial(_toy_learner, warmup_episodes=10), 2)
    try:
        assert cluster.warm_up(driver.play("prior", 10)) > 0
        first = cluster.train(240, round_steps=120)
        killed = cluster.pids()[0]
        killer = threading.Timer(1.0, os.kill, (killed, signal.SIGKILL))
        killer.start()
        second = cluster.train(600, round_steps=120)
        killer.join()
        restarted = cluster.pids()[0]
        received = cluster.history()
    finally:
        cluster.shutdown()

    assert first >= 240 and second >= 600
    assert restarted != killed, "the SIGKILLed worker was restarted"
    committed = list(store.iter_episodes(run_id="rlt-ray", images=False))
    assert sum(record.length for record in committed) == first + second
    assert {record.metadata["mode"] for record in committed} == {"learner"}
    assert {record.env_id for record in committed} == {"worker0/env0", "worker1/env0"}
    assert len(committed) - 1 <= len(received) <= len(committed)  # each commit reached the learner
    for record in committed:
        assert record.reference_chunks.shape == record.chunks.shape
    survivor = [r.metadata["actor_updates"] for r in committed if r.env_id == "worker1/env0"]
    assert len(set(survivor)) > 1, "new weights reached the running worker"
    assert min(survivor) > 0
