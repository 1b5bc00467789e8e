"""``flywheel serve`` as a real process: a Meta-World rollout through the openpi client adapter, auth from an
environment variable, SIGHUP reload, graceful SIGTERM, a clear error for an unloadable policy, and the
whole CLI chain serve → robot run → ingest → upload delivering each episode exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from envs import EnvConfig, MetaWorldEnv
from experiments.commands.serve import app as serve_app
from policies.base import stack_observations
from policies.checkpoint import save_checkpoint
from policies.openpi_client import AuthenticationError, OpenPIClientPolicy

TASK = "reach-v3"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _flywheel(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.cli", "serve", *args]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rollout(client: OpenPIClientPolicy, seed: int, max_steps: int = 150) -> tuple[bool, set[str]]:
    """Run one episode with ``client`` as the policy; returns success and the versions that acted."""
    env = MetaWorldEnv(EnvConfig(task=TASK, width=32, height=32, max_episode_steps=max_steps, seed=seed))
    observation, _ = env.reset(seed=seed)
    versions: set[str] = set()
    try:
        for _ in range(max_steps):
            chunk = client.infer(stack_observations([observation]))
            versions.add(client.version)
            for action in chunk.actions[0]:
                observation, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    return bool(info["success"]), versions
    finally:
        env.close()
    return False, versions


def test_serve_command_drives_a_metaworld_rollout_with_auth_reload_and_graceful_stop(tmp_path) -> None:
    port = _free_port()
    current = tmp_path / "current"
    current.write_text(f"scripted:{TASK}\n")
    args = ("--policy", f"@{current}", "--port", str(port), "--api-key-env", "FW_KEY")
    process = _flywheel(*args, env={"FW_KEY": "k-123"})
    url = f"ws://127.0.0.1:{port}"
    try:
        with pytest.raises(AuthenticationError):
            OpenPIClientPolicy(url, api_key="nope", connect_timeout_s=60)
        client = OpenPIClientPolicy(url, api_key="k-123", send_privileged=True, connect_timeout_s=60)
        assert client.metadata["server"] == "flywheel" and client.version == f"scripted:{TASK}"
        success, versions = _rollout(client, seed=3)
        assert success and versions == {f"scripted:{TASK}"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.read() == b"OK\n"
        current.write_text("scripted:push-v3\n")
        connection = client._channels[0].connection
        process.send_signal(signal.SIGHUP)  # re-reads the file and swaps; the connection stays up
        observation = _first_observation()
        deadline = time.monotonic() + 60
        while client.infer_one(observation)["policy_version"] != "scripted:push-v3":
            assert time.monotonic() < deadline, "the swap never took effect"
            time.sleep(0.05)
        assert client._channels[0].connection is connection
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "policy swapped to version" in output and "server stopped" in output


def _first_observation():
    env = MetaWorldEnv(EnvConfig(task=TASK, width=32, height=32, seed=0))
    try:
        return env.reset(seed=0)[0]
    finally:
        env.close()


def test_serve_command_rejects_an_unloadable_policy_with_one_line() -> None:
    result = CliRunner().invoke(serve_app, ["--policy", "/nonexistent/checkpoint", "--port", "0"])
    assert result.exit_code == 2
    assert "error: policy '/nonexistent/checkpoint'" in result.output and "Traceback" not in result.output


def test_serve_command_needs_the_api_key_variable_it_names(monkeypatch) -> None:
    monkeypatch.delenv("FW_UNSET_KEY", raising=False)
    result = CliRunner().invoke(serve_app, ["--policy", f"scripted:{TASK}", "--api-key-env", "FW_UNSET_KEY"])
    assert result.exit_code == 2 and "FW_UNSET_KEY is unset" in result.output


def test_serve_command_rejects_a_bad_key_map() -> None:
    result = CliRunner().invoke(serve_app, ["--policy", f"scripted:{TASK}", "--key", "image:corner"])
    assert result.exit_code == 2 and "expected NAME=WIRE_KEY" in result.output


def test_serve_resolves_a_checkpoint_directory_and_a_registered_version(tmp_path) -> None:
    """``--policy DIR`` loads the checkpoint (content-derived version); ``--policy v7 --db URL`` loads the
    registered version's checkpoint under its registered name; both serve real chunks."""
    from experiments.commands.serve import ServeConfig, build_server
    from policies.serving import BackgroundServer
    from storage import ExperienceStore
    from tests.test_serving import _tiny_vla

    checkpoint = tmp_path / "ckpt"
    saved_version = save_checkpoint(_tiny_vla(), checkpoint)
    store_url = f"sqlite:///{tmp_path / 'fw.db'}"
    store = ExperienceStore(store_url)
    store.upgrade()
    store.register_policy_version("v7", "vla", uri=str(checkpoint))
    rng = np.random.default_rng(0)
    observation = {
        "images": {"corner": rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)},
        "state": rng.normal(size=4).astype(np.float32),
        "prompt": "push the puck",
    }
    for spec, expected_version in [(str(checkpoint), saved_version), ("v7", "v7")]:
        server = build_server(ServeConfig(policy=spec, port=0, store=store_url))
        with BackgroundServer(server) as background, OpenPIClientPolicy(background.url) as client:
            reply = client.infer_one(observation)
        assert reply["policy_version"] == expected_version and np.asarray(reply["actions"]).shape == (10, 4)
    result = CliRunner().invoke(serve_app, ["--policy", "v8", "--db", store_url])
    assert result.exit_code == 2 and "no such version registered" in result.output


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.cli", *args]
    return subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.2)


# Three CLI processes, each importing the whole stack: ~15 s idle, over a minute on a loaded 2-core box.
def test_cli_chain_serve_robot_run_ingest_upload_delivers_each_episode_once(tmp_path) -> None:
    """The real processes end to end: ``flywheel serve`` (scripted expert, API key), ``flywheel robot run``
    (sim robot in its own process, simulated human) spooling locally, ``flywheel robot ingest`` into a store;
    then ``flywheel robot upload`` twice: every episode the robot reported is stored exactly once."""
    from experiments.cli import app
    from storage import ExperienceStore

    serve_port, ingest_port = _free_port(), _free_port()
    store_url = f"sqlite:///{tmp_path / 'fw.db'}"
    store = ExperienceStore(store_url)
    store.upgrade()
    store.register_policy_version(f"scripted:{TASK}", kind="scripted", uri=f"scripted:{TASK}")
    env = {"FW_POLICY_KEY": "p-key", "FLYWHEEL_INGEST_KEY": "i-key"}
    spool, ingest_url = str(tmp_path / "robot.db"), f"http://127.0.0.1:{ingest_port}"
    robot_args = [
        "--server",
        f"ws://127.0.0.1:{serve_port}",
        "--api-key-env",
        "FW_POLICY_KEY",
        "--spool",
        spool,
    ]
    serve_args = ["--policy", f"scripted:{TASK}", "--port", str(serve_port), "--api-key-env", "FW_POLICY_KEY"]
    server = _cli("serve", *serve_args, env=env)
    ingest = _cli("robot", "ingest", "--db", store_url, "--port", str(ingest_port), env=env)
    robot = _cli(
        "robot", "run", *robot_args, "--episodes", "2", "--max-steps", "30", "--human-rate", "0.05", env=env
    )
    try:
        robot_output = robot.communicate(timeout=240)[0]
        assert robot.returncode == 0, robot_output
        reported = [line.split()[0] for line in robot_output.splitlines() if " steps=" in line]
        assert len(reported) == 2, robot_output
        _wait_healthy(f"{ingest_url}/healthz", ingest)
        upload = ["robot", "upload", "--spool", spool, "--url", ingest_url]
        first, second = (CliRunner().invoke(app, upload, env=env) for _ in range(2))
    finally:
        for process in (server, ingest, robot):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=30)[0] for process in (server, ingest)]
    assert "stored=2 duplicates=0 rejected=0" in first.output and "pending=0" in first.output, first.output
    assert "stored=0 duplicates=0 rejected=0" in second.output and "pending=0" in second.output, second.output
    assert sorted(str(summary.uuid) for summary in store.list_episodes()) == sorted(reported)
    assert server.returncode == 0 and "server stopped" in outputs[0], outputs[0]
