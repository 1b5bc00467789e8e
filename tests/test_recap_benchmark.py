"""``benchmarks/recap_iteration.py --quick`` runs end to end and reports every arm on the same evaluation seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert arms == ["prior", "recap", "bc_all", "filtered_bc", "awr"]
    assert {row["n"] for row in result["rows"]} == {3}
    assert result["relabel"]["episodes"] == result["data"]["episodes_total"]
    assert "filtered_bc" in output.with_suffix(".txt").read_text()
