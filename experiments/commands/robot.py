"""``flywheel robot``: run a (sim-backed) robot against a policy server, upload its spool, run the ingest endpoint.

```
flywheel robot run --server ws://127.0.0.1:8000 --task reach-v3 --episodes 5 --spool robot.db [--human-rate 0.02]
flywheel robot upload --spool robot.db --url http://127.0.0.1:8100 --api-key-env FLYWHEEL_INGEST_KEY
flywheel robot pending --spool robot.db
flywheel robot ingest --db sqlite:///fw.db --api-key-env FLYWHEEL_INGEST_KEY [--port 8100]
```
See docs/real-robot.md.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from experiments.validation import UserError

if TYPE_CHECKING:
    from envs import EnvConfig
    from storage.spool import EpisodeSpool

app = typer.Typer(help="Robot runtime, crash-safe episode spool, upload client and ingest endpoint.")


def _api_key(variable: str) -> str:
    key = os.environ.get(variable, "")
    if not key:
        typer.echo(f"error: --api-key-env: environment variable {variable} is empty or unset", err=True)
        raise typer.Exit(code=2)
    return key


def _existing_spool(path: str) -> EpisodeSpool:
    """The spool at ``path``; a missing file is a mistyped path, never an empty spool to report on."""
    from storage.spool import EpisodeSpool

    if not Path(path).is_file():
        raise UserError(f"--spool {path}: no such spool file (`flywheel robot run --spool` creates one)")
    return EpisodeSpool(path)


@app.command()
def run(
    server: str = typer.Option("ws://127.0.0.1:8000", help="Policy server (openpi protocol)."),
    task: str = typer.Option("reach-v3", help="Meta-World task of the sim robot."),
    episodes: int = typer.Option(1, min=1),
    spool: str = typer.Option("robot-spool.db", help="SQLite spool file."),
    seed: int = typer.Option(0),
    rate_hz: float = typer.Option(50.0, help="Control rate."),
    mode: str = typer.Option(
        "async",
        help="async (inference overlaps execution), rtc (async + RTC inpainting where the server's policy "
        "supports it) or sync (robot waits).",
    ),
    execute_horizon: int | None = typer.Option(
        None,
        min=1,
        help="Actions of a chunk to execute before the next one is due (default: all; for rtc try about H/2).",
    ),
    max_steps: int = typer.Option(200, min=1),
    injected_latency_ms: float = typer.Option(0.0, help="Extra inference latency to simulate a far server."),
    human_rate: float = typer.Option(0.0, help="Simulated human: random takeover rate per step."),
    images: bool | None = typer.Option(
        None,
        help="Render and record camera images (default: when the server's policy declares cameras).",
        show_default=False,
    ),
    cameras: str | None = typer.Option(
        None, help="Comma-separated cameras to render (default: the server's policy's, from its metadata)."
    ),
    image_size: int | None = typer.Option(
        None, min=16, help="Image side in px (default: the server's policy's, else 64)."
    ),
    own_process: bool = typer.Option(True, help="Run the sim robot in its own process."),
    api_key_env: str | None = typer.Option(None, help="Environment variable with the policy server's key."),
    realtime_priority: int | None = typer.Option(None, help="SCHED_FIFO priority of the loop (needs root)."),
    connect_timeout_s: float = typer.Option(30.0, min=0.1, help="Seconds to wait for the policy server."),
) -> None:
    """Run episodes on a sim-backed robot and spool them (SIGINT = e-stop)."""
    from actors.robot import RobotProcess, SimRobot, sim_robot_factory
    from actors.robot_runtime import PolicyUnavailableError, RobotRuntime, RuntimeConfig, remote_chunks
    from envs import SimulatedHuman, SimulatedHumanConfig
    from policies.openpi_client import OpenPIClientPolicy
    from policies.serving.server import PRIVILEGED_METADATA
    from storage.spool import EpisodeSpool

    client = OpenPIClientPolicy(  # first: a server that is down fails the command before the robot starts
        server, api_key=_api_key(api_key_env) if api_key_env else None, connect_timeout_s=connect_timeout_s
    )
    client.send_privileged = bool(client.metadata.get(PRIVILEGED_METADATA))  # a sim robot has it to send
    try:
        env = _robot_env(client.metadata, task, cameras, image_size, images, max_steps, seed)
    except Exception:  # bad cameras or env settings: reported by the CLI, the connection closed first
        client.close()
        raise
    robot = RobotProcess(sim_robot_factory(env)) if own_process else SimRobot(env)
    human = None
    if human_rate > 0:
        human = SimulatedHuman(env.task, SimulatedHumanConfig(no_progress_steps=None, random_rate=human_rate))
    config = RuntimeConfig(
        rate_hz=rate_hz,
        mode=mode,
        execute_horizon=execute_horizon,
        max_steps=max_steps,
        injected_latency_ms=injected_latency_ms,
        realtime_priority=realtime_priority,
    )
    runtime = RobotRuntime(
        robot,
        remote_chunks(client),
        EpisodeSpool(spool),
        config,
        task=env.task,
        env_id=f"sim-robot:{env.task}",
        teleop=human,
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: runtime.e_stop())
    try:
        for index in range(episodes):
            if runtime.stopped:
                break
            result = runtime.run_episode(seed + index)
            record = result.record
            typer.echo(
                f"{record.uuid} {record.outcome.value} steps={record.length} "
                f"human={int(record.sources.sum())} starved={result.starved_steps}"
            )
    except PolicyUnavailableError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from error
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        runtime.close()
        client.close()
        robot.close()


def _robot_env(
    metadata: dict,
    task: str,
    cameras: str | None,
    image_size: int | None,
    images: bool | None,
    max_steps: int,
    seed: int,
) -> EnvConfig:
    """The sim robot's env: cameras and image size as given, else as the server's policy declares them."""
    from actors.robot_runtime import robot_cameras
    from envs import EnvConfig

    names = tuple(c.strip() for c in cameras.split(",") if c.strip()) if cameras is not None else None
    render = robot_cameras(metadata, names or None, image_size, images)
    return EnvConfig(
        task=task,
        render=bool(render.names),
        cameras=render.names or EnvConfig.model_fields["cameras"].default,
        width=render.width,
        height=render.height,
        max_episode_steps=max_steps,
        seed=seed,
    )


@app.command()
def upload(
    spool: str = typer.Option("robot-spool.db", help="SQLite spool file."),
    url: str = typer.Option("http://127.0.0.1:8100", help="Ingest endpoint."),
    api_key_env: str = typer.Option("FLYWHEEL_INGEST_KEY", help="Environment variable with the ingest key."),
    max_attempts: int = typer.Option(8, min=1, help="Tries per episode before the pass gives up."),
    backoff_s: float = typer.Option(0.5, help="First retry delay (doubles each retry)."),
    max_backoff_s: float = typer.Option(30.0, help="Longest retry delay."),
    watch_s: float = typer.Option(0.0, help="Keep passing until nothing is pending or this many seconds."),
    retry_rejected: bool = typer.Option(
        False, help="Send rejected episodes again (after fixing the platform)."
    ),
) -> None:
    """Upload pending episodes; exits 1 if some were rejected (moved aside) or remain pending."""
    from actors.upload import UploadAuthError, UploadConfig, Uploader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = UploadConfig(
        url=url,
        api_key=_api_key(api_key_env),
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
    )
    episodes = _existing_spool(spool)
    if retry_rejected:
        typer.echo(f"requeued {episodes.requeue_rejected()} rejected episodes")
    uploader = Uploader(episodes, config)
    try:
        report = uploader.upload_until_empty(watch_s) if watch_s > 0 else uploader.upload_pending()
    except UploadAuthError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(
        f"stored={len(report.stored)} duplicates={len(report.duplicates)} rejected={len(report.rejected)} "
        f"retries={report.retries} pending={report.remaining}"
    )
    for episode, message in report.rejected.items():
        typer.echo(f"rejected {episode}: {message}", err=True)
    if report.rejected:
        typer.echo(
            f"{len(report.rejected)} episodes rejected: kept aside in {spool} "
            "(`flywheel robot pending` lists them, --retry-rejected resends them)",
            err=True,
        )
    if report.gave_up:
        typer.echo(f"gave up: {report.gave_up}", err=True)
    if report.remaining or report.rejected:
        raise typer.Exit(code=1)


@app.command()
def pending(spool: str = typer.Option("robot-spool.db", help="SQLite spool file.")) -> None:
    """List the episodes not yet acknowledged (and the rejected ones), with counts."""
    from storage.spool import SpoolStatus

    store = _existing_spool(spool)
    counts = store.counts()
    typer.echo(" ".join(f"{status}={count}" for status, count in counts.items()))
    for entry in store.entries():
        if entry.status != SpoolStatus.SENT:
            error = f" last_error={entry.last_error}" if entry.last_error else ""
            typer.echo(
                f"{entry.uuid} {entry.status.value} {entry.size_bytes}B attempts={entry.attempts}{error}"
            )


@app.command()
def ingest(
    store: str = typer.Option(
        ..., "--db", help="Experience store URL (sqlite:///... or postgresql+psycopg://...)."
    ),
    api_key_env: str = typer.Option("FLYWHEEL_INGEST_KEY", help="Environment variable with the ingest key."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 exposes it)."),
    port: int = typer.Option(8100),
    max_episode_bytes: int = typer.Option(256 * 1024 * 1024, help="Largest accepted episode."),
    register_unknown_versions: bool = typer.Option(
        False, help="Register policy versions robots report instead of refusing them (422)."
    ),
    stall_timeout_s: float = typer.Option(
        30.0, min=0.1, help="Close a connection silent this long (idle, or a body that stopped arriving)."
    ),
    max_concurrent_uploads: int = typer.Option(
        4, min=1, help="Uploads read and stored at once (503 beyond)."
    ),
    max_connections: int = typer.Option(256, min=1, help="Open connections (503 beyond)."),
) -> None:
    """Serve the authenticated ingest endpoint until SIGINT/SIGTERM."""
    from experiments.ingest import IngestConfig, IngestServer
    from storage.store import ExperienceStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    experience = ExperienceStore(store)
    experience.upgrade()
    config = IngestConfig(
        api_key=_api_key(api_key_env),
        host=host,
        port=port,
        max_episode_bytes=max_episode_bytes,
        register_unknown_versions=register_unknown_versions,
        stall_timeout_s=stall_timeout_s,
        max_concurrent_uploads=max_concurrent_uploads,
        max_connections=max_connections,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with IngestServer(experience, config) as server:
        typer.echo(f"ingest endpoint on {server.url} (POST /episodes, GET /healthz)")
        while not stop.wait(1.0):
            pass
