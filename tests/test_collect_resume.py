"""Resuming and sharing a collection run: `flywheel collect` SIGKILLed at random points and rerun with the run id
it printed at its start, two collectors on one run at once, a Ray collection continuing an in-process one. The
run ends with exactly its target, and no episode repeats another's seed or trajectory (SQLite and PostgreSQL).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.rollout import EPISODE_INDEX_KEY, episode_seed
from envs import EnvConfig
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from storage import EpisodeRecord, ExperienceStore
from tests import storage_fixtures

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database

REPO = Path(__file__).resolve().parents[1]
TARGET = 30
TIMEOUT_S = 300
ENV = EnvConfig(task="reach-v3", render=False, max_episode_steps=60)


def run_seed(store: ExperienceStore, run_id: str) -> int:
    """The run seed recorded when the run started."""
    [run] = [run for run in store.list_runs(prefix=run_id) if run["id"] == run_id]
    return int(run["config"]["seed"])


def assert_no_repeated_episode(store: ExperienceStore, run_id: str) -> list[EpisodeRecord]:
    """Every episode of the run has its own index, the seed of that index, and its own trajectory."""
    records = list(store.iter_episodes(run_id=run_id))
    indices = [record.metadata[EPISODE_INDEX_KEY] for record in records]
    assert len(set(indices)) == len(records), sorted(indices)
    seed = run_seed(store, run_id)
    assert [record.seed for record in records] == [episode_seed(seed, index) for index in indices]
    assert len({record.seed for record in records}) == len(records)
    trajectories = {(r.states.tobytes(), r.actions.tobytes(), r.privileged.tobytes()) for r in records}
    assert len(trajectories) == len(records), "two episodes are step-for-step copies"
    return records


COLLECT = [sys.executable, "-m", "experiments.cli", "collect", "--task", "reach-v3", "--policy", "scripted"]


def _collect(db: str, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*COLLECT, "--no-images", "--episodes", str(TARGET), "--db", db, *options],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _announced_run_id(process: subprocess.Popen) -> str:
    """The run id from the first line `flywheel collect` prints (before any episode)."""
    line = process.stdout.readline()
    assert line.startswith("run "), line + process.stderr.read()[-3000:]
    run_id = line.split()[1]
    assert f"--run-id {run_id}" in line
    return run_id


def _kill_after(process: subprocess.Popen, store: ExperienceStore, run_id: str, committed: int) -> int:
    """SIGKILL ``process`` once the run holds ``committed`` episodes; how many it holds after the kill."""
    deadline = time.monotonic() + TIMEOUT_S
    while store.count_episodes(run_id=run_id) < committed:
        assert process.poll() is None, f"ended before the kill: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {committed} episodes after {TIMEOUT_S} s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    return store.count_episodes(run_id=run_id)


@pytest.mark.parametrize("kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_collect_killed_at_random_points_resumes_without_repeating_an_episode(
    store_url: str, kills: int
) -> None:
    store = ExperienceStore(store_url)
    store.upgrade()
    process, run_id, stored, kill_points = _collect(store_url), None, [0], []
    for _ in range(kills):
        if run_id is None:
            run_id = _announced_run_id(process)
        else:
            process = _collect(store_url, "--run-id", run_id)
            assert _announced_run_id(process) == run_id
        kill_points.append(stored[-1] + random.randint(1, 6))
        stored.append(_kill_after(process, store, run_id, kill_points[-1]))
    assert stored[-1] < TARGET, f"killed too late: {stored} (kill points {kill_points})"
    last = _collect(store_url, "--run-id", run_id)
    output, errors = last.communicate(timeout=TIMEOUT_S)
    assert last.returncode == 0, errors[-3000:]
    assert f"seed {run_seed(store, run_id)}" in output.splitlines()[0]
    assert store.count_episodes(run_id=run_id) == TARGET
    assert store.count_episodes() == TARGET
    assert_no_repeated_episode(store, run_id)
    store.close()


def test_resuming_a_run_with_another_seed_is_refused_and_plain_runs_differ(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'seeds.db'}"
    store = ExperienceStore(db)
    store.upgrade()
    base = ["--task", "reach-v3", "--no-images", "--episodes", "2", "--db", db]
    runner = CliRunner()
    plain = [runner.invoke(app, ["collect", *base]) for _ in range(2)]
    assert all(result.exit_code == 0 for result in plain), plain[0].output
    runs = [result.output.split()[1] for result in plain]
    seeds = {run_seed(store, run) for run in runs}
    assert len(seeds) == 2, "two plain runs drew the same seed"
    other = runner.invoke(app, ["collect", *base, "--run-id", runs[0], "--seed", str(max(seeds) + 1)])
    assert other.exit_code == 2 and f"run {runs[0]} was started with seed" in other.output
    assert store.count_episodes() == 4
    episodes = [r for run in runs for r in assert_no_repeated_episode(store, run)]
    assert len({(r.states.tobytes(), r.actions.tobytes()) for r in episodes}) == 4


def _collect_in_child(url: str, run_id: str, start: multiprocessing.Barrier, results: multiprocessing.Queue):
    config = CollectConfig(env=ENV, episodes=12, store_url=url, run_id=run_id, seed=7)
    report = run_collection(config, progress=False, on_start=lambda _config: start.wait(timeout=120))
    results.put(report.env_steps)


def test_two_processes_sharing_a_run_end_with_exactly_its_target(store_url: str) -> None:
    store = ExperienceStore(store_url)
    store.upgrade()
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_collect_in_child, args=(store_url, "shared", start, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    stepped = [results.get(timeout=TIMEOUT_S) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert all(steps > 0 for steps in stepped), f"both processes collected: env steps {stepped}"
    assert store.count_episodes(run_id="shared") == store.count_episodes() == 12
    assert_no_repeated_episode(store, "shared")
    store.close()


@pytest.mark.slow
def test_ray_collection_continues_a_run_started_in_process(tmp_path: Path) -> None:
    import ray

    from actors.cluster import ensure_ray

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    config = CollectConfig(env=ENV, episodes=4, store_url=url, run_id="mixed", seed=3)
    run_collection(config, progress=False)
    ensure_ray(num_cpus=2)
    try:
        update = {"episodes": 12, "workers": 2, "envs_per_worker": 2}
        report = run_collection(config.model_copy(update=update), progress=False)
    finally:
        ray.shutdown()
    assert report.episodes == 12
    assert_no_repeated_episode(ExperienceStore(url), "mixed")


@pytest.fixture(autouse=True)
def _quiet_fork_warning(recwarn: pytest.WarningsRecorder) -> None:
    """Forking a process that imported torch warns about threads; the collectors do not use torch."""
