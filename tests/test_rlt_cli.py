"""``flywheel rlt``: a tiny real run commits every episode with provenance and writes a loadable checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow import MlflowClient
from typer.testing import CliRunner

from actors.cluster import ensure_ray
from envs.metaworld_env import OBJECT
from experiments.cli import app
from experiments.paths import default_mlflow_uri
from experiments.policy_loader import load
from rlt.checkpoint import load_rlt_checkpoint
from rlt.phase import InfoKeySwitch
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


def _assert_versions_follow_the_handoff(records: list, rl_version: str) -> None:
    """RLT's version where it acted (critical step, not a prior episode, trained actor), else the prior's."""
    for record in records:
        critical = np.asarray(record.metadata["critical_phase"], bool)
        # an untrained actor leaves the critical phase to the prior
        trained = record.metadata["actor_updates"] > 0
        acting = critical & (record.metadata["mode"] != "prior") & trained
        expected = np.where(acting, rl_version, "scripted-noise0.3").tolist()
        assert record.policy_versions == expected
    assert any(rl_version in r.policy_versions for r in records if r.metadata["mode"] == "learner"), (
        "the trained learner acted in the critical phase"
    )


def test_rlt_command_runs_online_commits_episodes_and_saves_a_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'rlt.db'}"
    first = tmp_path / "first"
    output = _invoke("--db", url, "--env-steps", "60", "--warmup-episodes", "2", "--output", str(first))
    assert "scripted-noise0.3: success" in output and f"at {first}" in output.replace("\n", "")
    store = ExperienceStore(url)
    records = list(store.iter_episodes(task="peg-insert-side-v3"))
    modes = [record.metadata["mode"] for record in records]
    assert modes[:2] == ["prior", "prior"] and modes.count("learner") >= 2
    assert modes[-2:] == ["prior", "eval"], "the prior and RLT are evaluated on the same seed"
    checkpoint = load_rlt_checkpoint(first)
    rl_version = checkpoint.manifest.rl_version
    _assert_versions_follow_the_handoff(records, rl_version)
    assert checkpoint.deployment.prior.version == "scripted-noise0.3"
    assert checkpoint.manifest.env.task == "peg-insert-side-v3"
    assert checkpoint.manifest.env.success_tolerance is None
    assert checkpoint.learner.chunk_shape == (10, 4) and checkpoint.token.config.num_tokens == 8
    assert {row["version"] for row in store.policy_versions()} >= {rl_version, "scripted-noise0.3"}
    evaluation = records[-1]  # the critic is checked on every critical chunk of RLT's evaluation episodes
    critical_starts = np.asarray(evaluation.metadata["critical_phase"], bool) & (
        evaluation.chunk_offsets == 0
    )
    calibration = checkpoint.manifest.critic_calibration
    assert calibration.chunks == critical_starts.sum() > 0
    assert calibration.bias == pytest.approx(calibration.mean_q - calibration.mean_return)
    assert f"critic on RLT's evaluation chunks ({calibration.chunks})" in output.replace("\n", " ")

    second = tmp_path / "second"
    output = _invoke("--db", url, "--env-steps", "30", "--warmup-episodes", "0", "--output", str(second))
    assert f"{len(records)} stored + 0 fresh warm-up episodes" in output
    assert load_rlt_checkpoint(second).manifest.stored_episodes == len(records)
    client = MlflowClient(default_mlflow_uri())  # each run is logged to the (embedded) tracking store
    experiment = client.get_experiment_by_name("flywheel/rlt")
    logged = {run.data.tags["policy_version"]: run for run in client.search_runs([experiment.experiment_id])}
    assert set(logged) == {rl_version, load_rlt_checkpoint(second).manifest.rl_version}
    assert logged[rl_version].data.params["prior"] == "scripted-noise0.3"
    assert logged[rl_version].data.metrics["eval_episodes"] == 1


@pytest.fixture
def local_ray():
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_workers_play_the_online_budget_on_ray_and_the_run_ends_as_in_process(
    local_ray, tmp_path, monkeypatch
) -> None:
    """``--workers 2``: the warm-up, two Ray rollout workers' online episodes (each with the weights version
    that acted, trained by the learner actor) and the driver's evaluation all reach the store under one run; the checkpoint is written as
    without Ray."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url, output_dir = f"sqlite:///{tmp_path / 'rlt.db'}", tmp_path / "c"
    budget, workers, episode_steps = 60, 2, 30  # --episode-steps 30 is in TINY
    args = ["--db", url, "--env-steps", str(budget), "--warmup-episodes", "2", "--output", str(output_dir)]
    output = _invoke(*args, "--workers", str(workers))
    checkpoint = load_rlt_checkpoint(output_dir)
    rl_version = checkpoint.manifest.rl_version
    assert checkpoint.learner.chunk_shape == (10, 4) and checkpoint.manifest.workers == workers
    records = list(ExperienceStore(url).iter_episodes(task="peg-insert-side-v3"))
    modes = [record.metadata["mode"] for record in records]
    assert modes[:2] == ["prior", "prior"] and modes[-2:] == ["prior", "eval"], modes  # warm-up … evaluations
    assert modes.count("prior") == 3 and modes.count("eval") == 1, modes
    online = [record for record in records if record.metadata["mode"] == "learner"]
    online_steps = sum(record.length for record in online)
    assert budget <= online_steps < budget + workers * episode_steps, "only the last round overshoots"
    warmup_steps = sum(r.length for r in records[:2])
    assert checkpoint.manifest.env_steps == warmup_steps + online_steps
    assert f"{warmup_steps + online_steps} env steps" in output and f"{len(online)} online episodes" in output
    assert {record.env_id for record in online} == {"worker0/env0", "worker1/env0"}, (
        "both workers contributed"
    )
    assert all(record.run_id == records[0].run_id for record in records), "one run holds them all"
    assert all(record.metadata["actor_updates"] > 0 for record in online), "workers act with trained weights"
    _assert_versions_follow_the_handoff(records, rl_version)


def test_negative_workers_are_refused(tmp_path) -> None:
    args = ["rlt", "--task", "reach-v3", "--workers", "-1", "--db", f"sqlite:///{tmp_path / 'x.db'}"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Invalid value for '--workers': Input should be greater than or equal to 0" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "peg-insert-v9"], "error: task: unknown Meta-World task 'peg-insert-v9'"),
        (
            ["--task", "peg-insert-side-v3", "--handoff", "elbow"],
            "error: handoff: expected 'always' or a pair of",
        ),
        (
            ["--task", "pick-place-v3", "--handoff", "info:gripper"],
            "error: handoff: expected 'always' or a pair of ['hand-goal', 'hand-object', 'hand-object-xy', "
            "'object-goal'], or info:<key> with a key of ['grasp_success', 'near_object'], got 'info:gripper'",
        ),
        (
            ["--task", "peg-insert-side-v3", "--set", "learner.beta=-1"],
            "error: learner.beta: Input should be greater than or equal to 0",
        ),
        (
            ["--task", "peg-insert-side-v3", "--set", "learner.n_critic=5"],
            "error: learner.n_critic: Extra inputs are not permitted",
        ),
        (["--task", "peg-insert-side-v3", "--set", "beta"], "error: --set beta: expected KEY=VALUE"),
        (
            ["--task", "peg-insert-side-v3", "--set", "learner.stride=3"],
            "error: learner: stride: expected a divisor of chunk_size 10, got 3",
        ),
        (
            ["--task", "peg-insert-side-v3", "--prior", "v9"],
            "error: --prior: policy 'v9': no such version registered",
        ),
        (["--task", "peg-insert-side-v3", "--db", "foo://x"], "error: --db: store url: expected"),
        (
            ["--task", "peg-insert-side-v3", "--prior", "v9", "--prior-bias", "0.01"],
            "error: --prior-bias: only a scripted prior (--prior scripted) takes a systematic error",
        ),
        (
            ["--task", "peg-insert-side-v3", "--success-tolerance", "0.01"],
            "error: success_tolerance: supported for ['pick-place-v3', 'push-v3', 'reach-v3']",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    store = [] if "--db" in args else ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    result = runner.invoke(app, ["rlt", *args, *store], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1


def test_a_tolerance_variant_with_a_biased_prior_is_trained_and_recorded(tmp_path, monkeypatch) -> None:
    """``--success-tolerance`` makes the run's env the harder variant; ``--prior-bias`` aims reach-v3's scripted
    prior past the goal along +x (``PRIOR_BIASES``); the manifest records both, and the stored prior reloads with
    its bias."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'rlt.db'}"
    args = [
        "--task",
        "reach-v3",
        "--success-tolerance",
        "0.005",
        "--handoff",
        "hand-goal",
        "--prior-bias",
        "0.015",
    ]
    output = _invoke(
        *args, "--db", url, "--env-steps", "30", "--warmup-episodes", "1", "--output", str(tmp_path / "c")
    )
    assert "RLT vs its prior on the same 1 evaluation seeds:" in " ".join(output.split())
    manifest = load_rlt_checkpoint(tmp_path / "c").manifest
    assert manifest.env.task == "reach-v3" and manifest.env.success_tolerance == 0.005
    prior = manifest.deployment.prior
    assert prior.version == "scripted-noise0.3-goal-bias0.015,0,0" and prior.goal_bias == (0.015, 0.0, 0.0)
    assert prior.load("reach-v3", 10, lambda _: None).policy.biases["goal_bias"] == (0.015, 0.0, 0.0)
    stored = load(prior.version, task="reach-v3", store=ExperienceStore(url))
    assert stored.biases == {"object_bias": None, "goal_bias": (0.015, 0.0, 0.0)}


def test_an_info_handoff_from_the_command_line_hands_over_at_the_grasp(tmp_path) -> None:
    """``flywheel rlt --handoff info:grasp_success`` (the real CLI in a subprocess, tiny budget): the run hands
    off to RLT at the first chunk start whose env info reports Meta-World's ``grasp_success`` (the object held
    and lifted > 2 cm), never from the first step, and the checkpoint deploys with the same ``InfoKeySwitch``."""
    url, output = f"sqlite:///{tmp_path / 'rlt.db'}", tmp_path / "c"
    args = ["--task", "pick-place-v3", "--handoff", "info:grasp_success", "--episode-steps", "120"]
    args += ["--env-steps", "120", "--warmup-episodes", "1", "--stored-episodes", "0", "--token-steps", "10"]
    args += ["--learning-starts", "4", "--eval-episodes", "1", "--chunk-size", "5", "--no-progress"]
    env = os.environ | {"FLYWHEEL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "experiments.cli", "rlt", *args, "--db", url, "--output", str(output)]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    deployment = load_rlt_checkpoint(output).deployment
    assert (deployment.handoff, deployment.handoff_distance) == ("info:grasp_success", 0.0)
    assert isinstance(deployment.switch(), InfoKeySwitch) and deployment.switch().key == "grasp_success"
    records = list(ExperienceStore(url).iter_episodes(task="pick-place-v3", images=False))
    handed = 0
    for record in records:
        critical = np.asarray(record.metadata["critical_phase"], bool)
        if not critical.any():
            continue
        start = int(np.argmax(critical))
        assert start > 0 and record.chunk_offsets[start] == 0 and critical[start:].all()
        lifted = record.privileged[start, OBJECT][2] - record.privileged[0, OBJECT][2]
        assert lifted > 0.02, (record.metadata["mode"], start, lifted)
        handed += 1
    assert handed >= 2, [r.metadata["critical_phase"] for r in records]


def test_the_shipped_recipe_runs_from_the_command_line_and_its_settings_reach_the_learner(tmp_path) -> None:
    """``flywheel rlt --config configs/rlt-recipe.yaml`` (the real CLI in a subprocess, tiny budget, a biased
    prior handed over at the grasp approach): the run finishes, and the checkpoint's manifest and learner carry
    the recipe's residual actor, LayerNorm critics, 3-chunk returns, demo share and AR(1) offset exploration."""
    repo = Path(__file__).resolve().parents[1]
    url, output = f"sqlite:///{tmp_path / 'rlt.db'}", tmp_path / "c"
    args = ["--task", "pick-place-v3", "--prior-bias", "0.015", "--prior-noise", "0.1"]
    args += ["--handoff", "hand-object", "--config", str(repo / "configs" / "rlt-recipe.yaml")]
    args += ["--env-steps", "200", "--warmup-episodes", "2", "--token-steps", "5", "--episode-steps", "80"]
    args += ["--eval-episodes", "1", "--stored-episodes", "0", "--no-progress"]
    env = os.environ | {"FLYWHEEL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "experiments.cli", "rlt", *args, "--db", url, "--output", str(output)]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_rlt_checkpoint(output)
    learner, online = checkpoint.manifest.config.learner, checkpoint.manifest.config.online
    assert (learner.residual_scale, learner.beta, learner.beta_on, learner.n_step) == (
        1.0,
        4.0,
        "residual",
        3,
    )
    assert learner.critic_layer_norm and learner.demo_fraction == 0.5 and learner.utd_ratio == 10
    assert (online.exploration, online.exploration_rho, online.exploration_noise) == ("offset", 0.8, 0.1)
    assert checkpoint.learner.config.critic_layer_norm and checkpoint.learner.config.residual_scale == 1.0
