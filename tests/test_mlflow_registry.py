"""MLflow as a registry to pull from and a record of every command: a registered checkpoint is a pyfunc model
whose ``models:/`` name is a policy spec of the CLI (``train eval`` here), and ``collect`` / ``train eval`` each
log a run (saved config as params, success figures as metrics, the policy version as a tag) to the configured
tracking store, a real SQLite MLflow store."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from envs import EnvConfig, MetaWorldEnv
from experiments.cli import app
from experiments.tracking import PipelineTracker
from policies.base import stack_observations
from policies.checkpoint import save_checkpoint
from policies.openpi_client import OpenPIClientPolicy
from storage import ExperienceStore
from tests.test_rtc import tiny_vla

runner = CliRunner()


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh data folder and tracking store (``$MLFLOW_TRACKING_URI``); returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _logged_runs(uri: str, command: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"flywheel/{command}")
    assert experiment is not None, f"flywheel {command} logged no run"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    return client.search_runs([experiment.experiment_id])


def test_collect_logs_a_run(tracking, tmp_path):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["collect", "--task", "reach-v3", "--episodes", "1", "--no-images", "--seed", "3", "--db", db]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    [run] = _logged_runs(tracking, "collect")
    assert run.info.status == "FINISHED"
    assert run.data.params["policy"] == "scripted" and run.data.params["env.task"] == "reach-v3"
    assert run.data.metrics["episodes"] == 1 and 0 <= run.data.metrics["success_rate"] <= 1
    assert run.data.tags["policy_version"] in result.output
    (tmp_path / "file").write_text("")
    unwritable = {"COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"}
    again = runner.invoke(app, args, env=unwritable)
    assert again.exit_code == 0, again.output  # tracking is a record, not a precondition
    assert ExperienceStore(db).count_episodes() == 2


def _register_tiny_vla(tracking: str, tmp_path: Path) -> str:
    """A tiny VLA (corner2 at 48 px, state 7, actions 4: reach-v3's observations) registered as version 1 of
    ``flywheel-unit`` with the alias ``deployed``, as the pipeline registers; returns the version number."""
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(tiny_vla(), checkpoint)
    tracker = PipelineTracker(tracking, "unit")
    model_version = tracker.register("vla-unit", str(checkpoint), tracker.iteration_run(1, {}), "unit test")
    tracker.set_deployed(model_version)
    return model_version


def test_a_registered_version_is_a_policy_spec_and_its_evaluation_is_logged(tracking, tmp_path):
    model_version = _register_tiny_vla(tracking, tmp_path)
    version = MlflowClient(tracking).get_model_version("flywheel-unit", model_version)
    assert version.source.endswith("/policy_model")  # the pyfunc model, not the bare checkpoint path
    db = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["train", "eval", "--policy", "models:/flywheel-unit@deployed", "--task", "reach-v3"]
    args += ["--episodes", "1", "--max-episode-steps", "10", "--db", db]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    [run] = _logged_runs(tracking, "train-eval")
    assert run.data.params["policy"] == "models:/flywheel-unit@deployed"
    assert run.data.metrics["reach-v3/n"] == 1 and run.data.tags["policy_version"] in result.output
    missing = runner.invoke(app, [*args[:3], "models:/flywheel-unit@nope", *args[4:]])
    assert missing.exit_code == 2 and "alias nope not found" in missing.output


def test_serve_pulls_the_deployed_model_from_the_registry(tracking, tmp_path):
    _register_tiny_vla(tracking, tmp_path)
    port = _free_port()
    command = [sys.executable, "-m", "experiments.cli", "serve", "--policy", "models:/flywheel-unit@deployed"]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        with OpenPIClientPolicy(f"ws://127.0.0.1:{port}", connect_timeout_s=120) as client:
            observation, _ = MetaWorldEnv(
                EnvConfig(task="reach-v3", cameras=("corner2",), width=48, height=48, seed=1)
            ).reset(seed=1)
            chunk = client.infer(stack_observations([observation]))
            assert chunk.actions.shape == (1, 10, 4) and client.version.startswith("vla-")
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tracked_params_never_carry_a_store_password() -> None:
    from experiments.tracking import flatten

    params = {"store_url": "postgresql+psycopg://robot:s3cret@db:5432/flywheel", "env": {"task": "reach-v3"}}
    assert flatten(params) == {
        "store_url": "postgresql+psycopg://robot:***@db:5432/flywheel",
        "env.task": "reach-v3",
    }
