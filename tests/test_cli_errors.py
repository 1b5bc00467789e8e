"""Bad input through the real ``flywheel`` CLI (issue 18 part 4): every case ends with one ``error: …`` line
that names the input, exit code 2, no traceback, and nothing created or lost. Each case is its own
``python -m experiments.cli`` process; they run a few at a time.

Also the policy server's side: error frames always carry details (msgpack's ``FormatError``/``StackError``
have none of their own), and a ``scripted:<task>`` server declares the length of ``privileged`` it reads, so a
wrong one is an ``ObservationError`` naming the field rather than the expert's ``AssertionError``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from websockets.sync.client import connect

from envs.scripted import ScriptedPolicy
from policies.checkpoint import save_checkpoint
from policies.serving import BackgroundServer, PolicyServer, ServerConfig, msgpack_numpy
from tests.conftest import postgres_url
from tests.test_pipeline import REPO, TINY

PG_DOWN = "postgresql+psycopg://flywheel:secret@127.0.0.1:5999/flywheel"  # nothing listens on 5999
PG_DOWN_SHOWN = "postgresql+psycopg://flywheel:***@127.0.0.1:5999/flywheel"
COLLECT = ["collect", "--task", "reach-v3", "--episodes", "1", "--no-images"]

#: case id → (arguments, the text the ``error:`` line must contain); ``{name}`` are filled in by ``inputs``.
CASES: dict[str, tuple[list[str], str]] = {
    "db-not-a-url": (["db", "stats", "--db", "notaurl"], "'notaurl'"),
    "db-unsupported-backend": (
        ["db", "stats", "--db", "mysql://u:secret@localhost/x"],
        "mysql://u:***@localhost",
    ),
    "db-stats-postgres-down": (["db", "stats", "--db", PG_DOWN], PG_DOWN_SHOWN),
    "episodes-list-missing-database": (["episodes", "list", "--db", "{pg_missing}"], "{pg_missing}"),
    "db-not-a-sqlite-file": (["db", "stats", "--db", "sqlite:///{text_file}"], "{text_file}"),
    "collect-postgres-down": ([*COLLECT, "--db", PG_DOWN], PG_DOWN_SHOWN),
    "iterate-postgres-down": (["iterate", "--config", "{pipeline_pg_down}", "--once"], PG_DOWN_SHOWN),
    "ingest-postgres-down": (["robot", "ingest", "--db", PG_DOWN, "--port", "0"], PG_DOWN_SHOWN),
    "serve-store-postgres-down": (
        ["serve", "--policy", "v1", "--db", PG_DOWN, "--port", "0"],
        PG_DOWN_SHOWN,
    ),
    "collect-truncated-weights": (
        [*COLLECT, "--policy", "{truncated}", "--db", "sqlite:///{store}"],
        "{truncated}/model.safetensors: corrupt",
    ),
    "collect-broken-config": (
        [*COLLECT, "--policy", "{broken}", "--db", "sqlite:///{store}"],
        "{broken}/config.json",
    ),
    "collect-unknown-camera": (
        ["collect", "--cameras", "nocam", "--episodes", "1", "--db", "sqlite:///{tmp}/cameras.db"],
        "unknown camera 'nocam'",
    ),
    "export-output-under-a-file": (
        ["export", "--format", "lerobot", "--output", "{text_file}/out", "--db", "sqlite:///{store}"],
        "--output {text_file}/out",
    ),
    "export-output-unwritable": (
        ["export", "--format", "lerobot", "--output", "{unwritable}/out", "--db", "sqlite:///{store}"],
        "--output {unwritable}/out",
    ),
    "iterate-checkpoints-unwritable": (
        ["iterate", "--config", "{pipeline_unwritable}", "--once"],
        "checkpoints folder {unwritable}/checkpoints",
    ),
    "serve-port-out-of-range": (["serve", "--policy", "scripted:reach-v3", "--port", "70000"], "70000"),
    "serve-port-busy": (["serve", "--policy", "scripted:reach-v3", "--port", "{busy_port}"], ":{busy_port}"),
    "ingest-port-busy": (
        ["robot", "ingest", "--db", "sqlite:///{tmp}/ingest.db", "--port", "{busy_port}"],
        ":{busy_port}",
    ),
    "robot-run-server-down": (
        [
            "robot",
            "run",
            "--server",
            "ws://127.0.0.1:{free_port}",
            "--connect-timeout-s",
            "1",
            "--spool",
            "{tmp}/run.db",
        ],
        "ws://127.0.0.1:{free_port}",
    ),
    "robot-upload-mistyped-spool": (["robot", "upload", "--spool", "{tmp}/mistyped.db"], "{tmp}/mistyped.db"),
    "episodes-show-not-a-uuid": (
        ["episodes", "show", "not-a-uuid", "--db", "sqlite:///{store}"],
        "'not-a-uuid'",
    ),
    # option values a config model refuses: the root handler reports every field pydantic names
    "export-two-bad-fields": (
        [
            "export",
            "--format",
            "parquet",
            "--outcome",
            "maybe",
            "--output",
            "{tmp}/out",
            "--db",
            "sqlite:///{store}",
        ],
        "format: Input should be 'lerobot' or 'minari'; outcome: Input should be 'success', 'failure' or",
    ),
    "import-bad-outcome": (
        ["import", "{tmp}", "--outcome", "maybe", "--db", "sqlite:///{store}"],
        "outcome: Input should be 'success', 'failure' or 'truncated'",
    ),
    "envs-render-unknown-camera": (
        ["envs", "render", "--cameras", "nocam", "--out", "{tmp}/render.png"],
        "cameras: unknown camera 'nocam'",
    ),
    "collect-unknown-injection": (
        [*COLLECT, "--inject", "wobble", "--db", "sqlite:///{tmp}/inject.db"],
        "inject.kinds.0: Input should be 'detour', 'random' or 'pause'",
    ),
}

#: Same mechanism as a default case, another command: run with ``-m slow``.
SLOW_CASES = {
    "collect-postgres-down",
    "iterate-postgres-down",
    "ingest-postgres-down",
    "serve-store-postgres-down",
    "export-output-unwritable",
    "ingest-port-busy",
}

#: Files a failed case must not have created.
NOT_CREATED = {
    "robot-upload-mistyped-spool": "{tmp}/mistyped.db",
    "robot-run-server-down": "{tmp}/run.db",
    "collect-unknown-camera": "{tmp}/cameras.db",
    "collect-unknown-injection": "{tmp}/inject.db",
    "envs-render-unknown-camera": "{tmp}/render.png",
}


def _unwritable(tmp: Path) -> Path:
    """A folder nobody may create things in: read-only for a normal user; for root (who writes anywhere on a
    normal filesystem) sysfs, which refuses new entries."""
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryDirectory(dir=candidate).cleanup()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


def _checkpoints(tmp: Path) -> tuple[Path, Path]:
    """A saved toy VLA checkpoint copied twice: with its weights cut in half, and with a broken config.json."""
    from tests.test_vla import toy_policy

    saved = tmp / "checkpoint"
    save_checkpoint(toy_policy()[0], saved)
    truncated, broken = tmp / "truncated", tmp / "broken"
    shutil.copytree(saved, truncated)
    shutil.copytree(saved, broken)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (broken / "config.json").write_text('{"size": ')
    return truncated, broken


def _pipeline_config(tmp: Path, name: str, **fields: str) -> Path:
    data = yaml.safe_load(TINY.read_text()) | {
        "store_url": f"sqlite:///{tmp / 'pipeline.db'}",
        "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "checkpoints": str(tmp / "checkpoints"),
        **fields,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The values the case table refers to (files, folders, ports)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    truncated, broken = _checkpoints(tmp)
    unwritable = _unwritable(tmp)
    text_file = tmp / "notes.txt"
    text_file.write_text("not a database\n")
    missing = postgres_url().rsplit("/", 1)[0] + "/flywheel_no_such_database"
    return {
        "tmp": str(tmp),
        "store": str(tmp / "store.db"),
        "text_file": str(text_file),
        "truncated": str(truncated),
        "broken": str(broken),
        "unwritable": str(unwritable),
        "pg_missing": missing,
        "pipeline_pg_down": str(_pipeline_config(tmp, "pg-down", store_url=PG_DOWN)),
        "pipeline_unwritable": str(
            _pipeline_config(tmp, "unwritable", checkpoints=f"{unwritable}/checkpoints")
        ),
        "free_port": str(_free_port()),
    }


@pytest.fixture(scope="module")
def results(inputs, request) -> dict[str, subprocess.CompletedProcess]:
    """The finished process of every selected case (four at a time), while a socket holds ``busy_port``."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.originalname == test_bad_input_is_one_error_line_naming_it.__name__
    ]
    env = {**os.environ, "MUJOCO_GL": "egl", "FLYWHEEL_INGEST_KEY": "key"}
    env["FLYWHEEL_HOME"] = str(Path(inputs["tmp"]) / "home")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        inputs["busy_port"] = str(busy.getsockname()[1])
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {
                case: pool.submit(_run, [arg.format(**inputs) for arg in args], env)
                for case, (args, _) in CASES.items()
                if case in selected
            }
            return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_CASES else case for case in CASES]
)
def test_bad_input_is_one_error_line_naming_it(case: str, inputs, results) -> None:
    result = results[case]
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], output[-3000:]
    assert CASES[case][1].format(**inputs) in errors[0]
    assert "secret" not in output  # passwords in store URLs stay hidden
    if case in NOT_CREATED:
        assert not Path(NOT_CREATED[case].format(**inputs)).exists()


def _error_frame(url: str, frame: bytes) -> str:
    """Send one frame on a fresh connection; the server's error text."""
    with connect(url, compression=None, open_timeout=5) as connection:
        connection.recv(timeout=5)  # metadata
        connection.send(frame)
        reply = connection.recv(timeout=5)
    assert isinstance(reply, str), msgpack_numpy.unpackb(reply)
    return reply


def _observation(privileged_length: int) -> bytes:
    observation = {
        "images": {},
        "state": np.zeros(4, np.float32),
        "prompt": "reach the goal position",
        "privileged": np.zeros(privileged_length, np.float32),
    }
    return msgpack_numpy.packb(observation)


def test_policy_server_errors_carry_details_and_scripted_servers_check_privileged() -> None:
    policy = ScriptedPolicy("reach-v3", version="scripted:reach-v3")
    server = PolicyServer(policy, ServerConfig(port=0, allow_privileged=True))
    assert server.metadata()["privileged_dim"] == 39
    with BackgroundServer(server) as served:
        reserved = _error_frame(served.url, b"\xc1")
        assert reserved.startswith("WireFormatError: message is not valid msgpack: FormatError: a type byte")
        nested = _error_frame(served.url, b"\x91" * 5000 + b"\xc0")
        assert nested.startswith("WireFormatError: message is not valid msgpack: StackError: arrays or maps")
        short = _error_frame(served.url, _observation(10))
        assert short == "ObservationError: privileged: shape (10,), expected (39,)"
        with connect(served.url, compression=None, open_timeout=5) as connection:
            connection.recv(timeout=5)
            connection.send(_observation(39))
            reply = msgpack_numpy.unpackb(connection.recv(timeout=5))
        assert reply["actions"].shape == (1, 4)


def test_a_failed_job_is_one_error_line_with_exit_1(monkeypatch, tmp_path) -> None:
    """A worker whose code raised ends the command with one ``error:`` line (exit 1), not a traceback."""
    from typer.testing import CliRunner

    from actors.errors import WorkerError
    from experiments import collection
    from experiments.cli import app

    def failing_collection(*_args, **_kwargs):
        raise WorkerError("EGLError", "eglMakeCurrent\nfailed", "Traceback (most recent call last): …", 1)

    monkeypatch.setattr(collection, "run_collection", failing_collection)
    result = CliRunner().invoke(app, [*COLLECT, "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: rollout worker 1 failed: EGLError: eglMakeCurrent failed"
    )
    assert "Traceback" not in result.output


def test_an_unreadable_rlt_checkpoint_is_one_error_line_with_exit_2(monkeypatch, tmp_path) -> None:
    """An RLT checkpoint a command cannot read (here: no manifest) is bad input wherever it surfaces (e.g. a
    pipeline resuming its RLT stage): one ``error:`` line, exit 2."""
    from typer.testing import CliRunner

    from experiments import collection
    from experiments.cli import app
    from rlt.checkpoint import read_rlt_manifest

    monkeypatch.setattr(collection, "run_collection", lambda *_args, **_kwargs: read_rlt_manifest(tmp_path))
    result = CliRunner().invoke(app, [*COLLECT, "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: RLT checkpoint {tmp_path}: no readable"), last
    assert "Traceback" not in result.output
