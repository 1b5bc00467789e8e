"""Collection with camera images on real Ray actors: the built-in VLA per worker and behind the batching server,
a SIGKILLed worker, the pipeline's collect stage, and worker errors (one that cannot be pickled, a bad camera)
reaching the driver as what they are. The default run keeps the per-worker VLA test and the unpicklable error;
the others are ``slow``.

A Ray rollout actor builds its envs on one thread and steps them on another (``max_concurrency=2``): these tests
are what catches a GL context bound to the wrong thread (issue 18).
"""

# The tests take the fixtures imported from tests.test_ray_rollout (local_ray, store) as parameters.
# ruff: noqa: F811

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import ray

from actors.cluster import RolloutCluster, start_inference_server
from actors.errors import WorkerError
from actors.sinks import StoreSink
from envs import EnvConfig, make_env
from envs.scripted import ScriptedPolicy
from experiments.pipeline import Pipeline
from experiments.pipeline_config import load_pipeline_config
from storage import ExperienceStore
from tests.test_pipeline import tiny_config
from tests.test_ray_rollout import _cluster as start_cluster
from tests.test_ray_rollout import _wait_until_dead, local_ray, store  # noqa: F401 (fixtures: Ray, a SQLite store)
from tests.test_rtc import IMAGE, tiny_vla

ENV = EnvConfig(task="reach-v3", cameras=("corner2",), width=IMAGE, height=IMAGE, max_episode_steps=12)


def _cluster(store: ExperienceStore, policy, run_id: str, workers: int = 1, envs: int = 1, **options):
    return start_cluster(store, policy, workers, envs, run_id, env=ENV, kind="vla", seed=5, **options)


def _assert_rendered_images(store: ExperienceStore, run_id: str, target: int) -> None:
    """``target`` whole episodes, each with one rendered frame per step, the first one the scene of its seed."""
    summaries = store.list_episodes(run_id=run_id)
    assert len(summaries) == target
    reference = make_env(ENV)
    for summary in summaries:
        episode = store.load_episode(summary.uuid)
        frames = episode.images["corner2"]
        assert frames.shape == (episode.length, IMAGE, IMAGE, 3) and frames.dtype == np.uint8
        assert frames.std() > 10.0, "a rendered scene, not a blank buffer"
        first, _ = reference.reset(seed=summary.seed)
        assert np.array_equal(frames[0], first["images"]["corner2"]), "the worker rendered its own scene"
    reference.close()


def test_vla_with_images_per_worker(local_ray, store):
    cluster = _cluster(store, tiny_vla(), "vla-local", envs=2)
    try:
        result = cluster.collect(3, lambda: store.count_episodes(run_id="vla-local"), progress=False)
    finally:
        cluster.shutdown()
    assert result.committed == 3 and result.worker_failures == 0
    _assert_rendered_images(store, "vla-local", 3)
    versions = {
        v for s in store.list_episodes(run_id="vla-local") for v in store.load_episode(s.uuid).policy_versions
    }
    assert versions == {"vla-untrained"}


@pytest.mark.slow
def test_vla_with_images_behind_the_batching_server(local_ray, store):
    vla = tiny_vla()
    server, served = start_inference_server(vla, max_batch=4, max_wait_ms=50.0)
    cluster = _cluster(store, served, "vla-batched", workers=2, envs=2)
    try:
        result = cluster.collect(6, lambda: store.count_episodes(run_id="vla-batched"), progress=False)
        stats = ray.get(server.stats.remote())
    finally:
        cluster.shutdown()
        ray.kill(server)
    assert result.committed == 6 and result.worker_failures == 0
    assert stats["batches"] > 0 and stats["mean_batch"] >= 1.0
    _assert_rendered_images(store, "vla-batched", 6)


@pytest.mark.slow
def test_sigkilled_worker_with_images_still_reaches_the_target(local_ray, store):
    policy = ScriptedPolicy("reach-v3", version="expert")
    cluster = _cluster(store, policy, "killed", workers=2, on_worker_death="record")
    victim = cluster.pids()[0]
    outcome: dict = {}
    job = threading.Thread(
        target=lambda: outcome.update(
            result=cluster.collect(10, lambda: store.count_episodes(run_id="killed"), progress=False)
        )
    )
    job.start()
    deadline = time.monotonic() + 300
    while store.count_episodes(run_id="killed") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _wait_until_dead(victim)
    job.join(timeout=600)
    assert not job.is_alive()
    restarted = cluster.pids()[0]
    cluster.shutdown()
    assert outcome["result"].worker_failures >= 1 and restarted != victim
    summaries = store.list_episodes(run_id="killed")
    assert len(summaries) == 10
    for summary in summaries:  # whole episodes and the died-mid-episode ones alike carry their frames
        episode = store.load_episode(summary.uuid)
        assert episode.images["corner2"].shape == (episode.length, IMAGE, IMAGE, 3)
        assert episode.images["corner2"].std() > 10.0


@pytest.mark.slow
def test_pipeline_collect_stage_on_ray_workers_with_cameras(local_ray, tmp_path):
    """configs/tiny.yaml (cameras on) with ``collection.workers: 1``: the collect stage finishes, with images."""

    class StopAfterCollect(Exception):
        pass

    def stop_after_collect(iteration: int, stage: str, output: dict) -> None:
        if stage == "collect":
            raise StopAfterCollect

    config = load_pipeline_config(tiny_config(tmp_path, collection={"episodes_per_task": 2, "workers": 1}))
    pipeline = Pipeline(config, progress=False, on_stage=stop_after_collect)
    with pytest.raises(StopAfterCollect):
        pipeline.run_iteration()
    [state] = pipeline.iterations()
    assert list(state.outputs) == ["collect"]
    [run_id] = state.outputs["collect"].runs.values()
    summaries = pipeline.store.list_episodes(run_id=run_id)
    assert len(summaries) == 2
    size = config.env.image_size
    for summary in summaries:
        episode = pipeline.store.load_episode(summary.uuid)
        assert episode.images["corner2"].shape == (episode.length, size, size, 3)
        assert episode.images["corner2"].std() > 10.0


class PointerError(RuntimeError):
    """Like OpenGL's ``EGLError``: it holds ctypes pointers, so it cannot be pickled."""


def _pointer_error() -> PointerError:
    error = PointerError("eglMakeCurrent failed:\n  err = EGL_BAD_ACCESS")
    error.display = ctypes.pointer(ctypes.c_int(0))
    return error


def _env_whose_reset_raises_an_unpicklable_error():
    env = make_env(ENV)

    def reset(**kwargs):
        raise _pointer_error()

    env.reset = reset
    return env


def _env_with_an_unknown_camera():
    # EnvConfig refuses the camera itself; model_construct skips that so the env's renderer raises in the worker
    config = EnvConfig.model_construct(task="reach-v3", cameras=("nocam",), width=IMAGE, height=IMAGE)
    return make_env(config)


@pytest.mark.parametrize(
    ("factory", "type_name", "message"),
    [
        pytest.param(
            _env_whose_reset_raises_an_unpicklable_error,
            "PointerError",
            "eglMakeCurrent failed: err = EGL_BAD_ACCESS",
            id="unpicklable-in-run",
        ),
        pytest.param(
            _env_with_an_unknown_camera,
            "ValueError",
            "cameras: unknown camera 'nocam'",
            id="bad-camera-in-constructor",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_worker_error_stops_the_job_as_that_error(local_ray, store, factory, type_name, message):
    with pytest.raises(ValueError, match="cannot be pickled"):
        pickle.dumps(_pointer_error())
    policy = ScriptedPolicy("reach-v3", version="expert")
    store.register_policy_version(policy.version, kind="scripted")
    kwargs = dict(
        env_factories=[factory], policy=policy, sink=StoreSink(store.url), task="reach-v3", run_id="bad"
    )
    cluster = RolloutCluster(1, kwargs, cpus_per_worker=1)
    pid = cluster.pids()[0]
    try:
        with pytest.raises(WorkerError) as raised:
            cluster.collect(2, lambda: store.count_episodes(run_id="bad"), progress=False)
        assert cluster.pids()[0] == pid, "the worker was neither crashed nor restarted"
    finally:
        cluster.shutdown()
    error = raised.value
    assert (error.worker, error.type_name) == (0, type_name)
    assert str(error).startswith(f"rollout worker 0 failed: {type_name}: {message}")
    assert "\n" not in str(error) and "Traceback" in error.traceback_text
    assert store.count_episodes(run_id="bad") == 0
