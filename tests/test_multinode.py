"""Multi-node collection: a local Ray cluster (head + one worker node), joined by address, into PostgreSQL."""

from __future__ import annotations

import functools

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from actors.cluster import RolloutCluster, ensure_ray
from actors.execution import ExecutionConfig
from actors.sinks import StoreSink
from envs import EnvConfig, make_env
from envs.scripted import ScriptedPolicy
from storage import ExperienceStore
from tests.storage_fixtures import fresh_pg_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # ~80 s: starting two Ray nodes dominates

ENV = EnvConfig(task="reach-v3", render=False, max_episode_steps=60)


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ensure_ray(cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def pg_store(pg_url):
    url, drop = fresh_pg_database(pg_url)
    store = ExperienceStore(url)
    store.upgrade()
    yield store
    store.close()
    drop()


def test_two_nodes_collect_exactly_the_target_into_postgres(two_node_cluster, pg_store):
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    policy = ScriptedPolicy("reach-v3", action_horizon=4, version="expert-h4")
    pg_store.register_policy_version(policy.version, kind="scripted")
    kwargs = dict(
        env_factories=[functools.partial(make_env, ENV)] * 2,
        policy=policy,
        sink=StoreSink(pg_store.url),
        task=ENV.task,
        seed=21,
        run_id="multinode",
        record_images=False,
        execution=ExecutionConfig(mode="naive_async", delay=1, execute_horizon=3),
    )
    cluster = RolloutCluster(2, kwargs, cpus_per_worker=1)
    try:
        result = cluster.collect(
            7, lambda: pg_store.count_episodes(run_id="multinode"), episodes_per_call=2, progress=False
        )
        nodes = {actor.node_id for actor in list_actors(filters=[("class_name", "=", "_RayRolloutWorker")])}
    finally:
        cluster.shutdown()
    assert len(nodes) == 2, "one rollout worker per node (1 CPU each)"
    summaries = pg_store.list_episodes(run_id="multinode")
    assert result.committed == 7 == len(summaries) == len({s.uuid for s in summaries})
    assert {s.env_id.split("/")[0] for s in summaries} == {"worker0", "worker1"}, "both nodes committed"
    for summary in summaries:
        episode = pg_store.load_episode(summary.uuid, images=False)
        assert episode.length == summary.length > 0
        assert episode.metadata["execution_mode"] == "naive_async"
