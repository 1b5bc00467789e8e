"""Collection on real Ray actors: exact targets, SIGKILLed workers, batched inference and weight sync."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import ray

from actors.cluster import RolloutCluster, ensure_ray, start_inference_server
from actors.sinks import StoreSink
from envs import EnvConfig, make_env
from policies.scripted import ScriptedPolicy
from storage import ExperienceStore

ENV = EnvConfig(task="reach-v3", render=False, max_episode_steps=80)


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path) -> ExperienceStore:
    store = ExperienceStore(f"sqlite:///{tmp_path / 'ray.db'}")
    store.upgrade()
    return store


def _cluster(
    store: ExperienceStore, policy, workers: int = 2, envs: int = 2, run_id: str = "job"
) -> RolloutCluster:
    store.register_policy_version(policy.version, kind="scripted")
    kwargs = dict(
        env_factories=[functools.partial(make_env, ENV)] * envs,
        policy=policy,
        sink=StoreSink(store.url),
        task=ENV.task,
        seed=11,
        run_id=run_id,
        record_images=False,
    )
    return RolloutCluster(workers, kwargs, cpus_per_worker=1)


def _assert_exact(store: ExperienceStore, run_id: str, target: int) -> None:
    summaries = store.list_episodes(run_id=run_id)
    assert len(summaries) == target
    assert len({s.uuid for s in summaries}) == target
    for summary in summaries:  # every committed episode is whole
        episode = store.load_episode(summary.uuid, images=False)
        assert episode.length == summary.length > 0


def test_collection_job_writes_exactly_the_target(local_ray, store):
    cluster = _cluster(store, ScriptedPolicy("reach-v3", action_horizon=2, version="expert"))
    result = cluster.collect(
        9, lambda: store.count_episodes(run_id="job"), episodes_per_call=2, progress=False
    )
    cluster.shutdown()
    assert result.committed == 9 and result.worker_failures == 0
    _assert_exact(store, "job", 9)


def test_sigkilled_worker_loses_nothing_committed_and_job_reaches_target(local_ray, store):
    cluster = _cluster(store, ScriptedPolicy("reach-v3", version="expert"), run_id="killed")
    victim = cluster.pids()[0]
    outcome: dict = {}

    def run_job() -> None:
        outcome["result"] = cluster.collect(
            30, lambda: store.count_episodes(run_id="killed"), episodes_per_call=2, progress=False
        )

    job = threading.Thread(target=run_job)
    job.start()
    deadline = time.monotonic() + 120
    while store.count_episodes(run_id="killed") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=600)
    cluster.shutdown()
    assert not job.is_alive()
    assert outcome["result"].worker_failures >= 1
    _assert_exact(store, "killed", 30)


def test_batched_inference_server_and_weight_sync(local_ray, store):
    policy = ScriptedPolicy("reach-v3", action_horizon=4, version="served-v1")
    server, served = start_inference_server(policy, max_batch=16, max_wait_ms=5.0)
    cluster = _cluster(store, served, workers=2, envs=3, run_id="served")
    cluster.collect(6, lambda: store.count_episodes(run_id="served"), episodes_per_call=3, progress=False)
    stats = ray.get(server.stats.remote())
    assert stats["mean_batch"] > 1.0, "requests from several envs/workers should share a forward pass"

    store.register_policy_version("served-v2", kind="scripted")
    ray.get(server.set_policy.remote(ScriptedPolicy("reach-v3", action_horizon=4, version="served-v2")))
    cluster.collect(12, lambda: store.count_episodes(run_id="served"), episodes_per_call=3, progress=False)
    cluster.shutdown()
    versions = {
        v
        for s in store.list_episodes(run_id="served")
        for v in store.load_episode(s.uuid, images=False).policy_versions
    }
    assert {"served-v1", "served-v2"} <= versions
