"""``benchmarks/recap_iteration.py --scenario detours --quick`` runs every arm end to end on the state tier and
writes one JSON per seed that ``--combine`` pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = [
    "prior", "bc_all", "filtered_bc", "awr", "recap", "recap_positive_only", "recap_true_labels",
    "filtered_bc_true",
]  # fmt: skip


@pytest.mark.slow
def test_detours_scenario_quick_reports_every_arm_and_label_quality(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "recap_iteration.py")
    command = [sys.executable, script, "--scenario", "detours", "--quick", "--output-dir", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    path = tmp_path / "recap_detours_state_reach-v3_seed0.json"
    result = json.loads(path.read_text())
    assert [row["arm"] for row in result["rows"]] == ARMS
    assert {row["n"] for row in result["rows"]} == {2}
    assert result["data"]["injected_steps"] > 0 and result["labels"]["injected_steps"] > 0
    data = result["data"]
    assert data["interventions"] >= data["episodes_with_human"]
    assert (data["human_steps"] > 0) == (data["interventions"] > 0)
    assert result["relabel"]["windows"] == {"reach-v3": 10}
    pooled = subprocess.run(
        [sys.executable, script, "--scenario", "detours", "--combine", str(path), str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "pooled over seeds [0]" in pooled and all(f"  {arm} " in pooled for arm in ARMS)
