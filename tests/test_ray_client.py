"""Attaching to a Ray cluster as the operations docs say: a `ray start --head` node with token auth, and
`flywheel collect --ray-address ray://head:port` (Ray Client) collecting into a store.

The head runs in its own process group (`ray start --head --block`, stopped by killing that group), on free
ports, with its own token, and without MUJOCO_GL in its environment: the episodes render, so they are
stored only if the driver's MUJOCO_GL reached the actors through Ray Client.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import ExperienceStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, head: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}: {head.stdout.read()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the Ray Client server did not listen on port {port} within {timeout_s} s")


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node cluster as the docs start it: its ``ray://`` address and the driver's auth variables."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    client_port = _free_port()  # ephemeral range: outside Ray's default worker ports (10002-19999)
    temp_dir = tempfile.mkdtemp(prefix="fw-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {key: value for key, value in os.environ.items() if key not in ("MUJOCO_GL", "RAY_ADDRESS")}
    ports = {
        "--port": _free_port(),
        "--ray-client-server-port": client_port,
        "--dashboard-port": _free_port(),  # the defaults may be held by another cluster here
        "--dashboard-agent-listen-port": _free_port(),
    }
    command = [
        shutil.which("ray") or "ray", "start", "--head", "--block", "--num-cpus", "1",
        "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    head = subprocess.Popen(
        command,
        env={**env, **auth},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_port(client_port, head)
        yield f"ray://127.0.0.1:{client_port}", auth
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the group holds all the head's processes (SIGTERM takes ~10 s)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # ~30 s idle, ~60 s loaded: .ci/run runs it in its cluster step after the default suite
def test_collect_attaches_through_ray_client_with_token_auth(ray_head, tmp_path: Path) -> None:
    address, auth = ray_head
    url = f"sqlite:///{tmp_path / 'client.db'}"
    command = [
        sys.executable, "-m", "experiments.cli", "collect", "--task", "reach-v3", "--episodes", "2",
        "--workers", "1", "--image-size", "32", "--run-id", "ray-client",
        "--ray-address", address, "--db", url,
    ]  # fmt: skip
    env = {**os.environ, **auth, "MUJOCO_GL": "egl"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = ExperienceStore(url)
    summaries = store.list_episodes(run_id="ray-client")
    assert len(summaries) == 2 == len({s.uuid for s in summaries})
    assert {s.env_id.split("/")[0] for s in summaries} == {"worker0"}, "collected by the cluster's actor"
    episode = store.load_episode(summaries[0].uuid)
    assert episode.images and next(iter(episode.images.values())).shape[1:] == (32, 32, 3)


def test_a_failed_attach_names_the_address_and_token_auth(monkeypatch) -> None:
    import ray

    from actors.cluster import ensure_ray
    from actors.errors import ClusterConnectionError
    from experiments.cli import RUN_FAILURES, is_one_of

    def refuse(*args: object, **kwargs: object) -> None:
        assert kwargs.get("runtime_env") is None, "Ray Client attaches without a job runtime env"
        raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    expected = r"cannot attach to the Ray cluster at ray://127\.0\.0\.1:1"
    with pytest.raises(ClusterConnectionError, match=expected) as caught:
        ensure_ray("ray://127.0.0.1:1")
    assert "RAY_AUTH_MODE=token" in str(caught.value)
    assert is_one_of(caught.value, RUN_FAILURES), "the CLI prints it as one error line (exit 1)"
