"""SIGKILL ``flywheel rlt`` (the real CLI in a subprocess) after its first learner state, rerun the same command:
it continues under the same version from the saved state (warm-up not replayed, online episodes and updates
counted on), commits no episode twice, and leaves no state behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from policies.train_state import STATE_FILE, load_state
from rlt.checkpoint import load_rlt_checkpoint
from storage import ExperienceStore

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
TINY = ["--task", "reach-v3", "--env-steps", "400", "--episode-steps", "20", "--warmup-episodes", "1"]
TINY += ["--stored-episodes", "0", "--handoff-distance", "0", "--token-steps", "10", "--learning-starts", "4"]
TINY += ["--eval-episodes", "1", "--chunk-size", "5", "--device", "auto", "--no-progress"]


def _rlt(home: Path, url: str, output: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.cli", "rlt", *TINY, "--db", url, "--output", str(output)]
    env = os.environ | {"FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    env |= {"COLUMNS": "200"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def test_sigkilled_rlt_run_resumes_from_its_last_learner_state(tmp_path):
    home, url, output = tmp_path / "home", f"sqlite:///{tmp_path / 'rlt.db'}", tmp_path / "rlt"
    process = _rlt(home, url, output)
    deadline = time.monotonic() + TIMEOUT
    states: list[Path] = []
    while not states:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no learner state was written"
        states = list((home / "checkpoints" / "train-state").glob(f"rlt-*/{STATE_FILE}"))
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    [state_file] = states
    killed = load_state(state_file)
    stopped_at, updates = killed["counters"]["env_steps"], killed["learner"]["n_updates"]
    version = json.loads((state_file.parent / "run.json").read_text())["rl_version"]
    assert 0 < stopped_at < 400 and not output.exists()

    rerun = _rlt(home, url, output)
    stdout, stderr = rerun.communicate(timeout=TIMEOUT)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    text = " ".join(stdout.decode().split())
    resumed_from = int(re.search(r"resumed from env step (\d+)", text).group(1))
    assert stopped_at <= resumed_from < 400  # the step counter continues, it does not restart from 0
    checkpoint = load_rlt_checkpoint(output)
    assert checkpoint.manifest.rl_version == version
    assert checkpoint.manifest.resumed_from_env_step == resumed_from
    reported = re.search(r"(\d+) online episodes, (\d+) updates", text)
    assert int(reported.group(2)) > updates  # the learner's update counter continued
    assert not state_file.parent.exists()  # a saved checkpoint leaves no learner state behind

    records = list(ExperienceStore(url).iter_episodes(task="reach-v3"))
    assert {record.run_id for record in records} == {version}
    modes = [record.metadata["mode"] for record in records]
    assert modes.count("prior") == 2  # one warm-up episode (not replayed) and the prior's evaluation
    assert modes.count("learner") == int(
        reported.group(1)
    )  # no episode of the killed attempt committed twice
