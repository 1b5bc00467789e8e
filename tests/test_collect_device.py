"""``flywheel collect --device``: ``auto`` on a machine without an accelerator infers a VLA on the CPU and records
it in the run's config; an absent accelerator is a one-line error."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from experiments.cli import app
from policies.checkpoint import save_checkpoint
from storage import ExperienceStore
from tests.test_rtc import tiny_vla

runner = CliRunner()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto would pick it")
def test_auto_collects_a_vla_on_the_cpu_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    checkpoint, db = tmp_path / "vla", f"sqlite:///{tmp_path / 'store.db'}"
    save_checkpoint(tiny_vla(), checkpoint)
    args = ["collect", "--task", "reach-v3", "--policy", str(checkpoint), "--episodes", "1"]
    args += ["--run-id", "on-auto", "--device", "auto", "--db", db]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "device cpu" in result.output
    store = ExperienceStore(db)
    [run] = store.list_runs(prefix="on-auto")
    assert run["config"]["device"] == "cpu"
    assert store.count_episodes(run_id="on-auto") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_absent_accelerator_is_a_one_line_error(tmp_path):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["collect", "--task", "reach-v3", "--episodes", "1", "--device", "cuda", "--db", db]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output
    store = ExperienceStore(db)
    store.upgrade()
    assert store.count_episodes() == 0
