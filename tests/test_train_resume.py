"""SIGKILL ``flywheel train bc`` (the real CLI in a subprocess) mid-training, rerun the same command: it resumes
from its last training state, the step counter continues, and the weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs import EnvConfig
from experiments.collection import CollectConfig, run_collection
from policies.train_state import load_state

REPO = Path(__file__).resolve().parents[1]
ENV = EnvConfig(task="reach-v3", cameras=("corner2",), width=48, height=48, max_episode_steps=30)
STEPS, EVERY = 100, 10
TIMEOUT = 300


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('resume') / 'experience.db'}"
    run_collection(
        CollectConfig(env=ENV, policy="scripted", noise=0.3, episodes=4, store_url=url, run_id="demos"),
        progress=False,
    )
    return url


def _train(url: str, home: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "experiments.cli",
        "train",
        "bc",
        "--task",
        "reach-v3",
        "--steps",
        str(STEPS),
    ]
    command += ["--batch-size", "8", "--image-size", "48", "--eval-episodes", "0", "--device", "auto"]
    command += ["--checkpoint-every", str(EVERY), "--db", url, *extra]
    env = os.environ | {"FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return " ".join(stdout.decode().split())


def _version(output: str) -> str:
    return re.search(r"(vla-tiny-[0-9a-f]{12})", output).group(1)


def test_sigkilled_bc_training_resumes_where_it_stopped(store_url, tmp_path):
    home = tmp_path / "interrupted"
    process = _train(store_url, home)
    deadline = time.monotonic() + TIMEOUT
    states = []
    while not states:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no training state was written"
        states = list((home / "checkpoints" / "train-state").glob("*/train_state.pt"))
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    [state_file] = states
    stopped_at = load_state(state_file)["step"]
    assert 0 < stopped_at < STEPS and stopped_at % EVERY == 0

    resumed = _finish(_train(store_url, home))
    match = re.search(r"resumed from step (\d+)", resumed)
    assert match, resumed
    assert stopped_at <= int(match.group(1)) < STEPS  # the counter continues, it does not restart from 0
    assert "device: cpu" in resumed
    assert not state_file.exists()  # a registered version leaves no training state behind

    straight = _finish(_train(store_url, tmp_path / "straight"))
    assert "resumed" not in straight
    assert _version(resumed) == _version(straight)  # versions are content hashes of the weights


@pytest.mark.slow
def test_sigkilled_recap_retraining_in_the_pipeline_resumes_its_learner(tmp_path):
    """``flywheel iterate --once`` killed while the train stage's learner runs: the rerun resumes the learner
    from its last training state (the registered version records the step it continued from)."""
    from experiments.pipeline import Pipeline
    from experiments.pipeline_config import load_pipeline_config
    from tests.test_pipeline import tiny_config
    from tests.test_pipeline_resume import _finish as finish_pipeline
    from tests.test_pipeline_resume import _kill_when, _start

    training = {
        "steps": 200,
        "batch_size": 8,
        "checkpoint_every": 10,
    }
    config = tiny_config(tmp_path, training=training | {"condition_dropout": 0.3})
    pipeline = Pipeline(load_pipeline_config(config), progress=False)
    states = pipeline.home / "iter-0001" / "train-state"
    process = _start(config)
    _kill_when(process, lambda: any(states.glob("*/train_state.pt")))
    [state_file] = states.glob("*/train_state.pt")
    stopped_at = load_state(state_file)["step"]
    assert 0 < stopped_at < 200
    finish_pipeline(config)
    [state] = pipeline.iterations()
    version = state.outputs["train"].version
    [row] = [r for r in pipeline.store.policy_versions() if r["version"] == version]
    assert stopped_at <= row["metadata"]["resumed_from_step"] < 200
    assert not state_file.exists()
