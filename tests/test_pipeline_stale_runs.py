"""A pipeline process SIGKILLed right after a stage committed (its record is in the store, its MLflow run not
yet ended) leaves that run RUNNING; the next start ends it, also when the kill came after an iteration's last
stage (its iteration run too). The stages' work is stubbed (they return at once), the rest is real: the store,
MLflow, the kill."""

from __future__ import annotations

import subprocess
import sys

from experiments.pipeline import STAGES, Pipeline
from experiments.pipeline_config import load_pipeline_config
from experiments.tracking import ITERATION_TAG, STAGE_TAG
from tests.test_pipeline import REPO, tiny_config

#: Runs one iteration with instant stages and SIGKILLs itself when the run of stage argv[2] is to be ended.
KILLED_AFTER_COMMIT = """
import os, signal, sys
from experiments.pipeline import Pipeline
from experiments.pipeline_config import load_pipeline_config
from experiments.stages import OUTPUT_TYPES
from experiments.tracking import STAGE_TAG, PipelineTracker

STUBS = {
    "collect": {"policy": "stub", "runs": {}},
    "relabel": {"relabel_id": "stub", "sanity_ok": True},
    "train": {"version": "stub", "checkpoint": "stub"},
    "evaluate": {"versions": {}, "candidate": {}, "deployed": {}},
    "gate": {"promote": False, "reason": "stub", "candidate_rate": 0, "candidate_ci": [0, 1],
             "deployed_rate": 0, "deployed_ci": [0, 1]},
    "register": {"model": "stub", "model_version": "1", "store_version": "stub"},
    "deploy": {"deployed": "stub", "promoted": False, "deploy_file": "stub"},
    "report": {},
}
for stage, fields in STUBS.items():
    output = OUTPUT_TYPES[stage](**fields)
    setattr(Pipeline, f"_{stage}", lambda self, *args, output=output: output)
finish = PipelineTracker.finish

def finish_or_die(self, run_id, failed=False):
    if self.client.get_run(run_id).data.tags.get(STAGE_TAG) == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)  # the stage is committed in the store, its run still RUNNING
    finish(self, run_id, failed)

PipelineTracker.finish = finish_or_die
Pipeline(load_pipeline_config(sys.argv[1]), progress=False).run_iteration()
"""


def _killed_after(config, stage: str) -> None:
    process = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(config), stage],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == -9, process.stderr[-3000:]


def _statuses(pipeline: Pipeline) -> dict[tuple[int, str], str]:
    tracker = pipeline.tracker
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    statuses = {(int(r.data.tags[ITERATION_TAG]), r.data.tags[STAGE_TAG]): r.info.status for r in runs}
    assert len(statuses) == len(runs), "one run per iteration and stage"
    return statuses


def test_runs_of_stages_committed_before_a_kill_are_ended_on_the_next_start(tmp_path):
    config = tiny_config(tmp_path)
    pipeline = Pipeline(load_pipeline_config(config), progress=False)
    _killed_after(config, "collect")
    assert _statuses(pipeline) == {(1, "iteration"): "RUNNING", (1, "collect"): "RUNNING"}

    _killed_after(config, "report")  # resumes iteration 1, runs the other stages, killed after the last
    statuses = _statuses(pipeline)
    assert statuses.pop((1, "iteration")) == statuses.pop((1, "report")) == "RUNNING"
    assert statuses == {(1, stage): "FINISHED" for stage in STAGES[:-1]}

    _killed_after(config, "collect")  # starts iteration 2
    statuses = _statuses(pipeline)
    assert {key: status for key, status in statuses.items() if key[0] == 1} == {
        (1, stage): "FINISHED" for stage in ("iteration", *STAGES)
    }
    assert statuses[(2, "collect")] == "RUNNING"
    assert [state.iteration for state in pipeline.iterations()] == [1, 2]
