"""SIGKILL `flywheel iterate --once` in the middle of stages and rerun the same command: it continues from the
last finished stage and leaves no duplicated data (episodes, relabels, trained versions, evaluations, MLflow runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from experiments.pipeline import STAGE_RECORD, STAGES, Pipeline
from experiments.pipeline_config import load_pipeline_config
from storage import ExperienceStore
from tests.test_collect_resume import assert_no_repeated_episode
from tests.test_pipeline import REPO, tiny_config

TIMEOUT = 900


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "iterate",
            "--config",
            str(config),
            "--once",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_when(process: subprocess.Popen, condition) -> None:
    """SIGKILL the process group as soon as ``condition()`` holds (fails if the process ends first)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _finished(store: ExperienceStore, pipeline: Pipeline, stage: str):
    stage_id = pipeline.stage_id(1, stage)
    return lambda: any(
        r["id"] == stage_id and r["name"] == STAGE_RECORD for r in store.list_runs(prefix=stage_id)
    )


def _finish(config: Path) -> None:
    process = _start(config)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr.decode()[-3000:]


def _assert_single_copy_of_everything(pipeline: Pipeline) -> None:
    store, config = pipeline.store, pipeline.config
    [state] = pipeline.iterations()
    assert state.finished and set(state.outputs) == set(STAGES)
    [run] = state.outputs["collect"].runs.values()
    assert store.count_episodes(run_id=run) == config.collection.episodes_per_task
    assert store.count_episodes() == config.collection.episodes_per_task
    assert_no_repeated_episode(store, run)  # the resumed collection continued the seed sequence
    assert len(store.list_relabels(method="recap")) == 1
    trained = [r for r in store.policy_versions() if r["kind"] == "vla"]
    assert [r["version"] for r in trained] == [state.outputs["train"].version]
    evaluations = store.list_evaluations()
    assert len(evaluations) == 2 and len({(e.policy_version, e.run_id) for e in evaluations}) == 2
    client = MlflowClient(config.mlflow_uri, registry_uri=config.mlflow_uri)
    experiment = client.get_experiment_by_name(f"flywheel/{config.name}")
    iteration_runs = client.search_runs([experiment.experiment_id], "tags.`flywheel.stage` = 'iteration'")
    assert len(iteration_runs) == 1 and iteration_runs[0].info.status == "FINISHED"
    stage_runs = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{iteration_runs[0].info.run_id}'"
    )
    assert sorted(r.data.tags["flywheel.stage"] for r in stage_runs) == sorted(STAGES)
    assert len(client.search_model_versions(f"name = '{pipeline.tracker.model_name}'")) == 1


def test_sigkill_mid_collection_and_mid_relabel_then_resume(tmp_path):
    config = tiny_config(tmp_path)
    pipeline = Pipeline(load_pipeline_config(config), progress=False)
    store = pipeline.store
    collect_run = f"{pipeline.stage_id(1, 'collect')}/reach-v3"
    process = _start(config)
    _kill_when(process, lambda: store.count_episodes(run_id=collect_run) >= 2)
    assert store.count_episodes(run_id=collect_run) < pipeline.config.collection.episodes_per_task
    process = _start(config)
    _kill_when(process, _finished(store, pipeline, "collect"))
    _finish(config)
    _assert_single_copy_of_everything(pipeline)


@pytest.mark.slow
def test_sigkill_during_every_stage_then_resume(tmp_path):
    config = tiny_config(tmp_path)
    pipeline = Pipeline(load_pipeline_config(config), progress=False)
    for stage in STAGES[:-1]:  # killed while the stage after ``stage`` runs
        process = _start(config)
        _kill_when(process, _finished(pipeline.store, pipeline, stage))
    _finish(config)
    _assert_single_copy_of_everything(pipeline)
