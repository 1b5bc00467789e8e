"""`flywheel dashboard` command line (the served UI itself is checked over HTTP and in chromium in
tests/test_pipeline.py::test_dashboard_serves_runs_metrics_and_plots, on the two-iteration pipeline)."""

from __future__ import annotations

from typer.testing import CliRunner

from experiments.cli import app
from experiments.commands.dashboard import dashboard_command


def test_dashboard_serves_the_store_and_its_artifacts_on_loopback(tmp_path):
    command = dashboard_command(f"sqlite:///{tmp_path / 'mlflow.db'}", "127.0.0.1", 5123)
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()


def test_dashboard_bad_input_is_one_line():
    runner = CliRunner()
    remote = runner.invoke(app, ["dashboard", "--tracking-uri", "http://mlflow.internal:5000"])
    assert remote.exit_code == 2 and "already a server" in remote.output
    missing = runner.invoke(app, ["dashboard", "--config", "/nonexistent.yaml"])
    assert missing.exit_code == 2 and "--config: /nonexistent.yaml is not a file" in missing.output
