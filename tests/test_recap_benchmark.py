"""``benchmarks/recap_iteration.py --quick`` runs end to end and reports every arm on the same evaluation seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s: .ci/run's long step runs it after the default suite
def test_recap_benchmark_quick_reports_all_arms(tmp_path):
    output = tmp_path / "recap"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recap_iteration.py"), "--quick", "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    [result] = json.loads(output.with_suffix(".json").read_text())["results"]
    arms = [row["arm"] for row in result["rows"]]
    assert arms == ["prior", "recap", "recap β=2", "bc_all", "filtered_bc", "awr"]
    assert {row["n"] for row in result["rows"]} == {3}
    assert result["relabel"]["episodes"] == result["data"]["episodes_total"]
    assert "filtered_bc" in output.with_suffix(".txt").read_text()

    copy = tmp_path / "again.json"  # the same run twice: pooled counts double, rates stay
    copy.write_text(output.with_suffix(".json").read_text())
    pooled = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recap_iteration.py"), "--combine",
         str(output.with_suffix(".json")), str(copy)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    prior = next(line for line in pooled.splitlines() if line.split()[1:2] == ["prior"])
    successes = next(row["successes"] for row in result["rows"] if row["arm"] == "prior")
    assert prior.split()[2:4] == ["2", f"{2 * successes}/6"]
