"""``flywheel rlt``: a tiny real run commits every episode with provenance and writes a loadable checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from experiments.cli import app
from rlt.checkpoint import load_rlt_checkpoint
from storage import ExperienceStore

runner = CliRunner()
TINY = [
    "--episode-steps",
    "30",
    "--handoff-distance",
    "0",
    "--token-steps",
    "20",
    "--eval-episodes",
    "1",
    "--learning-starts",
    "4",
    "--no-progress",
]


def _invoke(*args: str) -> str:
    result = runner.invoke(app, ["rlt", "--task", "peg-insert-side-v3", *args, *TINY], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_rlt_command_runs_online_commits_episodes_and_saves_a_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'rlt.db'}"
    first = tmp_path / "first"
    output = _invoke("--store", url, "--env-steps", "60", "--warmup-episodes", "2", "--output", str(first))
    assert "scripted-noise0.3: success" in output and f"at {first}" in output.replace("\n", "")
    store = ExperienceStore(url)
    records = list(store.iter_episodes(task="peg-insert-side-v3"))
    modes = [record.metadata["mode"] for record in records]
    assert modes[:2] == ["prior", "prior"] and modes.count("learner") >= 2
    assert modes[-2:] == ["prior", "eval"], "the prior and RLT are evaluated on the same seed"
    checkpoint = load_rlt_checkpoint(first)
    rl_version = checkpoint.manifest["rl_version"]
    for record in records:
        critical = np.asarray(record.metadata["critical_phase"], bool)
        trained = (
            record.metadata["actor_updates"] > 0
        )  # an untrained actor leaves the critical phase to the prior
        acting = critical & (record.metadata["mode"] != "prior") & trained
        expected = np.where(acting, rl_version, "scripted-noise0.3").tolist()
        assert record.policy_versions == expected
    assert any(rl_version in r.policy_versions for r in records if r.metadata["mode"] == "learner"), (
        "the trained learner acted in the critical phase"
    )
    assert checkpoint.deployment.prior.version == "scripted-noise0.3"
    assert checkpoint.manifest["env"]["task"] == "peg-insert-side-v3"
    assert checkpoint.manifest["env"]["success_tolerance"] is None
    assert checkpoint.learner.chunk_shape == (10, 4) and checkpoint.token.config.num_tokens == 8
    assert {row["version"] for row in store.policy_versions()} >= {rl_version, "scripted-noise0.3"}

    second = tmp_path / "second"
    output = _invoke("--store", url, "--env-steps", "30", "--warmup-episodes", "0", "--output", str(second))
    assert f"{len(records)} stored + 0 fresh warm-up episodes" in output
    assert load_rlt_checkpoint(second).manifest["stored_episodes"] == len(records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "peg-insert-v9"], "error: task: unknown Meta-World task 'peg-insert-v9'"),
        (["--task", "peg-insert-side-v3", "--handoff", "elbow"], "error: hand-off pair: expected one of"),
        (["--task", "peg-insert-side-v3", "--prior", "v9"], "error: --prior: policy 'v9': not 'scripted'"),
        (["--task", "peg-insert-side-v3", "--store", "foo://x"], "error: --store: store url: expected"),
        (
            ["--task", "peg-insert-side-v3", "--success-tolerance", "0.01"],
            "error: success_tolerance: supported for ['pick-place-v3', 'push-v3', 'reach-v3']",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    store = [] if "--store" in args else ["--store", f"sqlite:///{tmp_path / 'x.db'}"]
    result = runner.invoke(app, ["rlt", *args, *store], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1


def test_a_tolerance_variant_is_trained_and_recorded(tmp_path, monkeypatch) -> None:
    """``--success-tolerance`` makes the run's env the harder variant; the manifest records the env config."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'rlt.db'}"
    args = ["--task", "reach-v3", "--success-tolerance", "0.005", "--handoff", "hand-goal"]
    _invoke(
        *args, "--store", url, "--env-steps", "30", "--warmup-episodes", "1", "--output", str(tmp_path / "c")
    )
    manifest = load_rlt_checkpoint(tmp_path / "c").manifest
    assert manifest["env"]["task"] == "reach-v3" and manifest["env"]["success_tolerance"] == 0.005
