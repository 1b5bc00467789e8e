"""The README's short examples (the block under "A few to start with") run as written, in order, through the real
CLI in subprocesses against a fresh data folder; plus the two things they needed: ``train bc`` reads cameras and
image size from the stored episodes, and ``robot run`` reads them from the policy server's metadata.

Budgets are shrunk only with flags each command already takes (appended: the last value of an option wins), so
every line keeps the shape the README shows. The default run covers the two image handoffs (collect → train bc
→ serve → robot run); ``-m slow`` runs the whole block in order (``iterate`` on a copy of its config with smaller
budgets), the dashboard and the policy server until they answer on their ports.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.robot_runtime import RobotCameras, RobotCamerasError, robot_cameras
from experiments.policy_loader import vla_image_layout
from experiments.training import stored_image_layout
from storage import EpisodeQuery, ExperienceStore
from storage.spool import EpisodeSpool
from tests.storage_fixtures import make_episode, pg_database, pg_migrated, store  # noqa: F401

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 600


def readme_examples() -> list[str]:
    """The command lines of the README's "A few to start with" block, comments stripped, continued lines
    (``\\`` at the end) joined."""
    text = README.read_text()
    start = text.index("A few to start with")
    block = text[
        text.index("```bash", start) + len("```bash") : text.index("```", text.index("```bash", start) + 7)
    ]
    lines = [line.split("#", 1)[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


# ---- train bc: cameras and image size from the store ----------------------------------------------------------


def _write(
    experience: ExperienceStore, seed: int, run_id: str, image_size: int, cameras=("corner2",)
) -> None:
    rng = np.random.default_rng(seed)
    episode = make_episode(
        rng, 12, task="reach-v3", cameras=cameras, image_size=image_size, run_id=run_id, policy_version=None
    )
    experience.write_episode(episode)


def test_frame_shapes_and_layout_come_from_the_store(store: ExperienceStore) -> None:  # noqa: F811
    _write(store, 0, "small", 24, ("corner2", "gripperPOV"))
    _write(store, 1, "small", 24, ("corner2", "gripperPOV"))
    [first, _] = store.list_episodes()
    assert store.frame_shapes([first.uuid]) == {first.uuid: {"corner2": (24, 24), "gripperPOV": (24, 24)}}
    selection = EpisodeQuery(tasks=["reach-v3"])
    assert stored_image_layout(store, selection) == (("corner2", "gripperPOV"), 24)
    assert stored_image_layout(store, selection, ("gripperPOV",), 24) == (("gripperPOV",), 24)
    with pytest.raises(ValueError, match=r"^--image-size 64: the selected episodes store 24 px images"):
        stored_image_layout(store, selection, image_size=64)
    with pytest.raises(
        ValueError, match=r"^--cameras corner3: the selected episodes store cameras corner2,gri"
    ):
        stored_image_layout(store, selection, ("corner3",))


def test_mixed_image_sizes_are_one_error_that_says_how_to_filter(store: ExperienceStore) -> None:  # noqa: F811
    _write(store, 0, "run-48", 48)
    _write(store, 1, "run-96", 96)
    mixed = EpisodeQuery(tasks=["reach-v3"])
    with pytest.raises(ValueError) as raised:
        stored_image_layout(store, mixed)
    message = str(raised.value)
    assert "\n" not in message and "--run-id" in message
    assert "corner2 48 px in run(s) run-48" in message and "corner2 96 px in run(s) run-96" in message
    assert stored_image_layout(store, EpisodeQuery(tasks=["reach-v3"], run_ids=["run-96"])) == (
        ("corner2",),
        96,
    )


def test_collect_and_recap_read_a_vla_policys_cameras_and_image_size(tmp_path: Path) -> None:
    """``collect --policy <version>`` / ``recap iterate`` render at the VLA's size (the demo's 48 px prior)."""
    from policies.checkpoint import save_checkpoint
    from tests.test_vla import toy_policy

    policy, _ = toy_policy()
    save_checkpoint(policy, tmp_path / "vla")
    experience = ExperienceStore(f"sqlite:///{tmp_path / 'store.db'}")
    experience.upgrade()
    experience.register_policy_version("toy", kind="vla", uri=str(tmp_path / "vla"))
    expected = (tuple(policy.config.cameras), policy.config.image_size)
    assert (
        vla_image_layout("toy", experience) == vla_image_layout(str(tmp_path / "vla"), experience) == expected
    )
    assert vla_image_layout("scripted", experience) is None


# ---- robot run: cameras and image size from the server's metadata ---------------------------------------------

VLA_METADATA = {"cameras": {"corner2": [96, 96, 3]}, "state_dim": 4}


def test_robot_cameras_follow_the_served_policy() -> None:
    assert robot_cameras(VLA_METADATA) == RobotCameras(("corner2",), 96, 96)
    assert robot_cameras(VLA_METADATA, ("corner2",), 96, True) == RobotCameras(("corner2",), 96, 96)
    assert robot_cameras({"state_dim": 4}) == RobotCameras(())  # a state-only policy: nothing rendered
    assert robot_cameras({}, images=True) == RobotCameras(("corner2",), 64, 64)
    assert robot_cameras({}, ("gripperPOV",), 32) == RobotCameras(("gripperPOV",), 32, 32)
    for args, message in [
        ((None, 64, None), "--image-size 64: the server's policy takes corner2 96×96"),
        ((("corner3",), None, None), "--cameras corner3: the server's policy takes cameras corner2"),
        ((None, None, False), "--no-images: the server's policy needs camera images (corner2 96×96)"),
    ]:
        with pytest.raises(RobotCamerasError, match=f"^{re.escape(message)}$"):
            robot_cameras(VLA_METADATA, *args)


# ---- the README block through the real CLI ---------------------------------------------------------------------

#: Budget flags appended to each README line (command words → flags); each option exists on that command.
REDUCED: dict[str, list[str]] = {
    "collect": ["--episodes", "1"],
    "train bc": ["--steps", "2", "--batch-size", "8", "--eval-episodes", "0"],
    "train eval": ["--episodes", "1", "--max-episode-steps", "10"],
    "recap iterate": ["--episodes", "2", "--steps", "2", "--value-steps", "2", "--eval-episodes", "1"],
    "rlt": [
        *("--env-steps", "40", "--warmup-episodes", "1", "--token-steps", "2", "--learning-starts", "8"),
        *("--episode-steps", "20", "--eval-episodes", "1", "--stored-episodes", "0", "--no-progress"),
    ],
    "robot run": ["--episodes", "1", "--max-steps", "8"],
}
#: Extra flags for one README line (matched by a substring of it).
REDUCED_LINE: dict[str, list[str]] = {"--subtasks": ["--subtask-steps", "2"]}
#: The pipeline config's budgets for the reduced run (``iterate --config <copy> --once`` keeps the shape).
REDUCED_PIPELINE = {
    "collection": {"episodes_per_task": 2},
    "env": {"max_episode_steps": 10},
    "relabel": {"k_folds": 2, "value": {"train_steps": 2}},
    "training": {"steps": 2, "batch_size": 8},
    "evaluation": {"episodes": 1},
}
#: The lines the default run covers: both image handoffs (stored frames → train bc, server metadata → robot).
IMAGE_LINES = ("collect --task reach-v3 --policy scripted", "train bc --task reach-v3", "serve", "robot run")


@dataclass
class Session:
    """Runs README lines in ``folder`` with ``FLYWHEEL_HOME`` in it, keeping the versions they print."""

    folder: Path
    reduced: bool
    versions: dict[str, str] = field(default_factory=dict)  # task → the latest version trained for it
    background: dict[str, tuple[subprocess.Popen, int]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLYWHEEL_HOME": str(self.folder / "home"),
            "MUJOCO_GL": "egl",
            "COLUMNS": "200",
        }

    def argv(self, line: str) -> list[str]:
        """The README line with ``<version>`` filled in, the budget flags and local ports; ``flywheel`` is
        the installed console script (or this interpreter's ``-m experiments.cli``)."""
        words = shlex.split(line)
        assert words[0] == "flywheel", line
        task = words[words.index("--task") + 1] if "--task" in words else "reach-v3"
        if "<version>" in words:
            assert task in self.versions, f"{line}: no version trained for {task} yet"
            words = [self.versions[task] if word == "<version>" else word for word in words]
        command = " ".join(words[1:3]) if words[1] in ("train", "recap", "robot", "episodes") else words[1]
        if "--config" in words and command != "iterate":  # a file of the repository, as run from its root
            words[words.index("--config") + 1] = str(ROOT / words[words.index("--config") + 1])
        if self.reduced:
            words += REDUCED.get(command, [])
            words += [flag for key, flags in REDUCED_LINE.items() if key in line for flag in flags]
            if command == "iterate":
                words[words.index("--config") + 1] = str(
                    self._reduced_pipeline(words[words.index("--config") + 1])
                )
        if command == "robot run":
            words[words.index("--server") + 1] = f"ws://127.0.0.1:{self.background['serve'][1]}"
            words += ["--spool", str(self.folder / "robot-spool.db")]
        if command in ("serve", "dashboard"):
            words += ["--port", str(_free_port())]
        script = shutil.which("flywheel")
        return [script, *words[1:]] if script else [sys.executable, "-m", "experiments.cli", *words[1:]]

    def run(self, line: str, timeout_s: float = TIMEOUT_S) -> str:
        """Run one README line to completion (or, for a server, until it answers on its port)."""
        argv = self.argv(line)
        server = line.split()[1]
        if server in ("serve", "dashboard"):
            port = int(argv[argv.index("--port") + 1])
            process = subprocess.Popen(
                argv,
                cwd=self.folder,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.background[server] = (process, port)
            _wait_for_port(process, port)
            return ""
        done = subprocess.run(
            argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        assert done.returncode == 0, (
            f"{line}\n{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        trained = re.search(r"→ (\S+) at ", done.stdout)
        if trained and "--task" in argv:
            self.versions[argv[argv.index("--task") + 1]] = trained.group(1)
        return done.stdout

    def _reduced_pipeline(self, config: str) -> Path:
        data = yaml.safe_load((ROOT / config).read_text())
        for section, values in REDUCED_PIPELINE.items():
            _merge(data[section], values)
        path = self.folder / Path(config).name
        path.write_text(yaml.safe_dump(data))
        return path

    def close(self) -> None:
        for process, _ in self.background.values():
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _merge(target: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(process: subprocess.Popen, port: int, timeout_s: float = 120.0) -> None:
    """Until something accepts connections on ``port``; a server that exits first fails with its stderr."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    running = Session(tmp_path, reduced=True)
    yield running
    running.close()


def _check_robot_spool(session: Session) -> None:
    """The robot rendered the served VLA's camera at its size and spooled the episodes with those images."""
    spool = EpisodeSpool(str(session.folder / "robot-spool.db"))
    [entry] = spool.entries()
    record = spool.load(entry.uuid)
    assert record.length == 8 and session.versions["reach-v3"] in record.policy_versions
    assert {camera: frames.shape for camera, frames in record.images.items()} == {"corner2": (8, 96, 96, 3)}


def test_readme_image_examples_run_as_written(session: Session) -> None:
    """collect (96 px, the default) → train bc (reads 96 px from the store; it trained on 64 px before) →
    serve → robot run (renders the camera the served VLA declares), each a README line with a smaller budget."""
    lines = [line for line in readme_examples() if any(key in line for key in IMAGE_LINES)]
    assert [line.split()[1] for line in lines] == ["collect", "train", "serve", "robot"]
    for line in lines:
        session.run(line)
    _check_robot_spool(session)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_block_runs_in_order(session: Session) -> None:
    """Every line of the block, in order, smaller budgets; the servers (serve, dashboard) answer on their ports."""
    for line in readme_examples():
        output = session.run(line)
        if line.split()[1:3] == ["episodes", "list"]:
            assert "pick-place-v3" in output
    assert session.versions["pick-place-v3"].startswith("hier-")  # train bc --subtasks read 96 px too
    _check_robot_spool(session)
    assert (session.folder / "out" / "meta" / "info.json").is_file()


# ---- the RLT example: the comparison it prints, and that RLT improves on its prior -----------------------------

COMPARISON = re.compile(
    r"RLT vs its prior on the same (\d+) evaluation seeds: ([+-]\d+) points \((\d+)% → (\d+)%\)"
)


def _rlt_line() -> str:
    [line] = [line for line in readme_examples() if line.split()[1] == "rlt"]
    return line


def test_readme_rlt_example_prints_the_prior_against_rlt(session: Session) -> None:
    """The README's RLT line on a tiny budget completes and prints both success rates and their comparison."""
    output = " ".join(session.run(_rlt_line()).split())
    assert "--prior-bias" in _rlt_line() and "-goal-bias" in output, (
        "the example's prior is systematically wrong"
    )
    compared = COMPARISON.search(output)
    assert compared and compared.group(1) == "1", output
    prior, rlt = int(compared.group(3)), int(compared.group(4))
    assert int(compared.group(2)) == rlt - prior


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_rlt_example_improves_on_its_prior(tmp_path: Path) -> None:
    """The README's RLT line exactly as written (its full budget, seed 0): RLT's success on the evaluation seeds
    is above the prior's it started from."""
    output = " ".join(Session(tmp_path, reduced=False).run(_rlt_line(), timeout_s=2300).split())
    compared = COMPARISON.search(output)
    assert compared, output
    assert int(compared.group(4)) > int(compared.group(3)), compared.group(0)
