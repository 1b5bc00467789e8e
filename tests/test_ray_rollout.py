"""Collection on real Ray actors: exact targets, SIGKILLed workers, batched inference, weight sync and the CLI."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
from typer.testing import CliRunner

from actors.cluster import RolloutCluster, ensure_ray, start_inference_server
from actors.sinks import StoreSink
from envs import EnvConfig, make_env
from envs.scripted import ScriptedPolicy
from experiments.cli import app
from storage import ExperienceStore, Outcome

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
    store: ExperienceStore,
    policy,
    workers: int = 2,
    envs: int = 2,
    run_id: str = "job",
    *,
    env: EnvConfig = ENV,
    kind: str = "scripted",
    seed: int = 11,
    **cluster_options,
) -> RolloutCluster:
    """A ``RolloutCluster`` of ``workers`` actors with ``envs`` envs of ``env`` each, committing to ``store``
    (images recorded when ``env`` renders)."""
    store.register_policy_version(policy.version, kind=kind)
    kwargs = dict(
        env_factories=[functools.partial(make_env, env)] * envs,
        policy=policy,
        sink=StoreSink(store.url),
        task=env.task,
        seed=seed,
        run_id=run_id,
        record_images=env.render,
    )
    return RolloutCluster(workers, kwargs, cpus_per_worker=1, **cluster_options)


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


def _wait_until_dead(pid: int) -> None:
    """Block until ``pid`` has exited (gone, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} is still running 30 s after SIGKILL")


def _victim_episodes(store: ExperienceStore, run_id: str) -> int:
    return sum(s.env_id.startswith("worker0/") for s in store.list_episodes(run_id=run_id))


@pytest.mark.parametrize("on_worker_death", ["discard", "record"])
def test_sigkilled_worker_restarts_loses_nothing_committed_and_job_reaches_target(
    local_ray, store, on_worker_death
):
    run_id = f"killed-{on_worker_death}"
    cluster = _cluster(
        store, ScriptedPolicy("reach-v3", version="expert"), run_id=run_id, on_worker_death=on_worker_death
    )
    victim = cluster.pids()[0]
    outcome: dict = {}

    def run_job() -> None:
        outcome["result"] = cluster.collect(
            16, lambda: store.count_episodes(run_id=run_id), episodes_per_call=2, progress=False
        )

    job = threading.Thread(target=run_job)
    job.start()
    deadline = time.monotonic() + 120
    while store.count_episodes(run_id=run_id) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _wait_until_dead(victim)
    victim_committed_before = _victim_episodes(store, run_id)
    job.join(timeout=600)
    assert not job.is_alive()
    restarted_pid = cluster.pids()[0]
    cluster.shutdown()
    assert outcome["result"].worker_failures >= 1
    assert restarted_pid != victim, "the killed worker answers again, from a new process"
    assert _victim_episodes(store, run_id) > victim_committed_before, "the restarted worker commits again"
    _assert_exact(store, run_id, 16)
    victim_seeds = [s.seed for s in store.list_episodes(run_id=run_id) if s.env_id.startswith("worker0/")]
    assert len(set(victim_seeds)) == len(victim_seeds), "the restarted worker does not replay its old seeds"
    died = [s for s in store.list_episodes(run_id=run_id) if "died mid-episode" in (s.error or "")]
    if on_worker_death == "discard":
        assert not died
        return
    assert died, "the victim's open episodes are recorded as errors"
    for summary in died:
        assert summary.outcome == Outcome.ERROR and summary.env_id.startswith("worker0/")
        assert f"pid {victim}" in summary.error
        episode = store.load_episode(summary.uuid, images=False)
        assert episode.truncated[-1] and not episode.terminated.any()


def test_batched_inference_server_and_weight_sync(local_ray, store):
    class StandStill(ScriptedPolicy):
        """Never reaches the goal, so every episode lasts exactly 80 steps and a worker's envs stay in phase."""

        def infer(self, batch):
            chunk = super().infer(batch)
            chunk.actions[:] = 0.0
            return chunk

    policy = StandStill("reach-v3", action_horizon=4, version="served-v1")
    # a batch goes out when it holds all 6 envs; the long max wait lets the workers fall into step at the start
    server, served = start_inference_server(policy, max_batch=6, max_wait_ms=1000.0)
    cluster = _cluster(store, served, workers=2, envs=3, run_id="served")
    cluster.collect(6, lambda: store.count_episodes(run_id="served"), episodes_per_call=3, progress=False)
    stats = ray.get(server.stats.remote())
    # one worker asks for at most its 3 envs at a time: a larger mean batch needs both workers' requests merged
    assert stats["mean_batch"] > 3.0, "requests from both workers should share a forward pass"

    store.register_policy_version("served-v2", kind="scripted")
    ray.get(server.set_policy.remote(StandStill("reach-v3", action_horizon=4, version="served-v2")))
    cluster.collect(12, lambda: store.count_episodes(run_id="served"), episodes_per_call=3, progress=False)
    cluster.shutdown()
    versions = {
        v
        for s in store.list_episodes(run_id="served")
        for v in store.load_episode(s.uuid, images=False).policy_versions
    }
    assert {"served-v1", "served-v2"} <= versions


def test_policy_published_mid_job_to_an_env_step_target_switches_only_at_chunk_starts(local_ray, store):
    cluster = _cluster(store, ScriptedPolicy("reach-v3", action_horizon=4, version="sync-v1"), run_id="sync")
    store.register_policy_version("sync-v2", kind="scripted")
    published: dict = {}

    def committed_steps() -> int:
        return sum(s.length for s in store.list_episodes(run_id="sync"))

    def publish_mid_job() -> None:
        deadline = time.monotonic() + 120
        while store.count_episodes(run_id="sync") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.publish_policy(ScriptedPolicy("reach-v3", action_horizon=4, version="sync-v2"))
        published["steps"] = committed_steps()

    publisher = threading.Thread(target=publish_mid_job)
    publisher.start()
    result = cluster.collect(800, committed_steps, unit="env_steps", env_steps_per_call=64, progress=False)
    publisher.join(timeout=60)
    cluster.shutdown()
    assert published["steps"] < 800, "the new version was published while the job was running"
    assert result.committed == committed_steps() >= 800
    # episodes are committed whole: at most one episode per env (2 workers × 2 envs, ≤ 80 steps) beyond
    assert result.committed < 800 + 4 * ENV.max_episode_steps
    rank = {"sync-v1": 0, "sync-v2": 1}
    mixed = 0
    for summary in store.list_episodes(run_id="sync"):
        episode = store.load_episode(summary.uuid, images=False)
        ranks = np.array([rank[v] for v in episode.policy_versions])
        assert np.all(np.diff(ranks) >= 0), "a worker never goes back to an older version"
        changes = np.flatnonzero(np.diff(ranks)) + 1
        assert np.all(episode.chunk_offsets[changes] == 0), "versions change only at a chunk start"
        mixed += int(changes.size > 0)
        chunk_starts = episode.chunk_offsets == 0
        assert chunk_starts.any() and np.all(episode.latency_ms[chunk_starts] > 0)
    assert mixed >= 1, "an episode running when the version was published holds both versions"


def test_collect_cli_on_ray_workers_with_batched_inference(local_ray, tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(
        app,
        [
            "collect", "--task", "reach-v3", "--episodes", "5", "--workers", "2", "--envs-per-worker", "2",
            "--inference", "batched", "--no-images", "--run-id", "cli-ray", "--db", url,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = ExperienceStore(url)
    summaries = store.list_episodes(run_id="cli-ray")
    assert len(summaries) == 5 == len({s.uuid for s in summaries})
    assert {s.env_id.split("/")[0] for s in summaries} <= {"worker0", "worker1"}
