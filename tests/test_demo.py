"""`flywheel demo --quick` on a fresh data folder: demos → VLA prior → one pipeline iteration → filtered BC on the
same data → table."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow import MlflowClient

from storage import ExperienceStore
from tests.test_pipeline import REPO


def _demo_quick(env: dict[str, str], timeout: float) -> str:
    """Run ``flywheel demo --quick`` in a subprocess with ``env``; it must exit 0. Its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "demo", "--quick", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# The README's main job, in its quick plan: ~30 s on an idle 2-core machine (8 min once at load ~14).
def test_demo_quick_runs_the_whole_loop(tmp_path):
    env = os.environ | {"FLYWHEEL_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    out = _demo_quick(env, timeout=780)
    assert (
        "before (prior)" in out
        and "after (RECAP)" in out
        and "filtered BC, same data" in out
        and "gate:" in out
    )
    assert "flywheel dashboard" in out and "flywheel/demo-quick" in out
    store = ExperienceStore(f"sqlite:///{tmp_path / 'home' / 'experience.db'}")
    runs = {run["id"] for run in store.list_runs()}
    assert "demo/scripted-demos/reach-v3" in runs
    assert "pipeline:demo-quick/iter-0001/report" in runs
    assert store.count_episodes(run_id="demo/scripted-demos/reach-v3") == 6
    assert store.count_episodes(run_id="pipeline:demo-quick/iter-0001/collect/reach-v3") == 6
    kinds = [row["kind"] for row in store.policy_versions()]
    assert kinds.count("vla") == 3  # the BC prior, the RECAP candidate and filtered BC
    # filtered BC: trained on the iteration's data (its parent is the collecting prior), evaluated on the
    # candidate's episodes, and the table prints its stored figures
    evaluations = {
        e.run_id.rsplit("/", 1)[-1]: e for e in store.list_evaluations() if "/evaluate/" in e.run_id
    }
    baseline, candidate = evaluations["filtered-bc"], evaluations["candidate"]
    assert baseline.policy_version != candidate.policy_version and baseline.n == candidate.n == 4
    [row] = [line for line in out.splitlines() if "filtered BC, same data" in line and "%" in line]
    assert baseline.policy_version in row and f"({baseline.successes}/{baseline.n})" in row
    # full VLA version ids are printed, ready to paste into other commands
    for row in store.policy_versions():
        assert row["kind"] != "vla" or row["version"] in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("flywheel/demo-quick")
    [run] = client.search_runs([experiment.experiment_id], "tags.`flywheel.stage` = 'iteration'")
    assert "candidate_success_rate" in run.data.metrics and "deployed_success_rate" in run.data.metrics
    assert run.data.metrics["filtered_bc_success_rate"] == baseline.successes / baseline.n
    assert run.data.tags["filtered_bc"] == baseline.policy_version and run.info.status == "FINISHED"
    # rerunning finds the finished demo and prints the same table without redoing anything
    _demo_quick(env, timeout=300)
    assert store.count_episodes() == 12 and len(store.list_evaluations()) == 3
    assert [row["kind"] for row in store.policy_versions()].count("vla") == 3
