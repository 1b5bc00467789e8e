"""``benchmarks/recap_iteration.py --scenario detours --quick`` runs every arm end to end on the state tier (each
retrained arm at two training seeds, each conditioned arm also sampled with guidance) and writes one JSON per seed that ``--combine`` pools; the pooled statistics
cluster by data seed."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recap_scenarios

ROOT = Path(__file__).resolve().parents[1]
ARMS = [
    "prior", "bc_all", "filtered_bc", "awr", "advantage_filtered_bc", "recap", "recap_positive_only",
    "recap_true_labels", "filtered_bc_true",
]  # fmt: skip


@pytest.mark.slow
def test_detours_scenario_quick_reports_every_arm_and_label_quality(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "recap_iteration.py")
    command = [
        sys.executable, script, "--scenario", "detours", "--quick", "--train-seeds", "2", "--output-dir", str(tmp_path),
        "--cfg-betas", "2",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    path = tmp_path / "recap_detours-rate0.1-cap6_state_reach-v3_seed0_train2.json"  # --quick's detours and cap
    result = json.loads(path.read_text())
    guided = {"recap", "recap_positive_only", "recap_true_labels"}  # conditioned arms get a guided row
    assert [row["arm"] for row in result["rows"]] == [
        name for arm in ARMS for name in (arm, f"{arm}_cfg2") if name == arm or arm in guided
    ]
    rows = {row["arm"]: row for row in result["rows"]}
    for arm in guided:  # the guided row evaluates the arm's own trained weights
        assert [run["best_step"] for run in rows[f"{arm}_cfg2"]["runs"]] == [run["best_step"] for run in rows[arm]["runs"]]
    assert result["train_seeds"] == [0, 1000]
    assert result["rows"][0]["n"] == 2 and "runs" not in result["rows"][0]  # the prior is not retrained
    for row in result["rows"][1:]:
        assert [run["train_seed"] for run in row["runs"]] == [0, 1000]
        assert row["n"] == 4 and row["successes"] == sum(run["successes"] for run in row["runs"])
    assert result["data"]["injected_steps"] > 0 and result["labels"]["injected_steps"] > 0
    data = result["data"]
    assert data["interventions"] >= data["episodes_with_human"]
    assert (data["human_steps"] > 0) == (data["interventions"] > 0)
    assert result["relabel"]["windows"] == {"reach-v3": 10}
    pooled = subprocess.run(
        [sys.executable, script, "--scenario", "detours", "--combine", str(path), str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "pooled over data seeds [0]" in pooled and all(f"  {arm} " in pooled for arm in ARMS)


def test_pooled_statistics_cluster_by_data_seed():
    runs = {
        0: [{"success_rate": 0.2}, {"success_rate": 0.6}],
        1: [{"success_rate": 0.5}, {"success_rate": 0.5}],
    }
    assert recap_scenarios.between_training_sd(runs) == pytest.approx(math.sqrt(0.08 / 2))
    assert math.isnan(recap_scenarios.between_training_sd({0: runs[0][:1]}))
    mean, low, high = recap_scenarios.cluster_interval([0.4, 0.5])  # the seeds' means, not the 4 runs
    half = 12.706 * math.sqrt(0.005) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.45, 0.45 - half, 0.45 + half), abs=1e-3)
    assert math.isnan(recap_scenarios.cluster_interval([0.4])[1])


def test_more_training_seeds_for_a_data_seed_get_their_own_file():
    args = argparse.Namespace(
        scenario="detours", collector="scripted", tier="state", seed=1, train_seeds=2, train_seed_start=0,
        output_dir=Path("out"), schedule_steps=None, ema_decay=0.0, retrain_steps=1500,
        inject_rate=0.02, inject_length=15,
    )  # fmt: skip
    assert recap_scenarios.train_seeds(args) == [1, 1001]
    assert (
        recap_scenarios.result_path(args, "reach-v3").name
        == "recap_detours-expert_state_reach-v3_seed1_train2.json"
    )
    args.train_seeds, args.train_seed_start = 1, 2
    assert recap_scenarios.train_seeds(args) == [2001]
    assert recap_scenarios.result_path(args, "reach-v3").name.endswith("_seed1_trains2-2.json")
    args.schedule_steps, args.ema_decay = 1500, 0.999
    assert (
        recap_scenarios.result_path(args, "reach-v3").name
        == "recap_detours-expert-sched1500-ema0.999_state_reach-v3_seed1_trains2-2.json"
    )
    args.inject_rate, args.inject_length = 0.04, 10  # so are the detours, when not the default
    assert recap_scenarios.result_path(args, "reach-v3").name.startswith("recap_detours-expert-rate0.04-len10-sched")
    args.retrain_steps = 3000  # a cap other than the default is part of the protocol too
    assert recap_scenarios.result_path(args, "reach-v3").name.startswith("recap_detours-expert-rate0.04-len10-cap3000-sched1500-")
