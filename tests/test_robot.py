"""The robot runtime end to end: a sim robot in its own process against a real policy server, simulated
interventions, spool, ingest and upload; bumpless takeover; e-stop; sync vs async chunk alignment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actors.robot import EStopError, RobotInterface, RobotProcess, SimRobot, sim_robot_factory
from actors.robot_runtime import (
    ChunkReply,
    PolicyUnavailableError,
    RobotRuntime,
    RuntimeConfig,
    action_jumps,
    remote_chunks,
)
from actors.upload import UploadConfig, Uploader
from envs import EnvConfig, SimulatedHuman, SimulatedHumanConfig, TeleopCommand, TeleopContext
from envs.scripted import ScriptedPolicy
from experiments.commands.robot import app
from experiments.ingest import IngestConfig, IngestServer
from policies.openpi_client import OpenPIClientPolicy, ServerError
from policies.serving import BackgroundServer, PolicyServer, RTCRequest, ServerConfig
from storage.records import Outcome, StepSource
from storage.spool import EpisodeSpool
from storage.store import ExperienceStore

TASK = "reach-v3"
VERSION = "scripted-h8"
KEY = "robot-ingest-key"
#: What the tiny VLA of tests/test_rtc.py sees: one 48×48 camera, 7-D state.
VLA_ENV = EnvConfig(task=TASK, cameras=("corner2",), width=48, height=48, max_episode_steps=30)


@pytest.fixture(scope="module")
def policy_server() -> Iterator[BackgroundServer]:
    policy = ScriptedPolicy(TASK, action_horizon=8, version=VERSION)
    with BackgroundServer(PolicyServer(policy, ServerConfig(port=0, allow_privileged=True))) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> ExperienceStore:
    experience = ExperienceStore(f"sqlite:///{tmp_path / 'fw.db'}")
    experience.upgrade()
    experience.register_policy_version(VERSION, kind="scripted", uri=f"scripted:{TASK}")
    return experience


def test_sim_robot_process_against_policy_server_lands_in_store_exactly_once(
    policy_server: BackgroundServer, store: ExperienceStore, tmp_path: Path
) -> None:
    env = EnvConfig(task=TASK, render=True, cameras=("corner2",), width=16, height=16, max_episode_steps=100)
    robot = RobotProcess(sim_robot_factory(env))
    human = SimulatedHuman(
        TASK, SimulatedHumanConfig(no_progress_steps=None, random_rate=0.05, takeover_steps=6)
    )
    spool = EpisodeSpool(tmp_path / "robot.db")
    client = OpenPIClientPolicy(policy_server.url, send_privileged=True)
    runtime = RobotRuntime(
        robot,
        remote_chunks(client),
        spool,
        RuntimeConfig(max_steps=100),
        task=TASK,
        env_id="sim",
        teleop=human,
    )
    try:
        results = runtime.run(episodes=3, seed=0)
    finally:
        runtime.close()
        client.close()
        robot.close()
    assert not robot.process.is_alive()
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as ingest:
        uploader = Uploader(spool, UploadConfig(url=ingest.url, api_key=KEY))
        assert uploader.upload_pending().stored == [str(r.uuid) for r in results]
        again = uploader.upload_pending()
        assert again.stored == again.duplicates == [] and again.complete
    assert sorted(s.uuid for s in store.list_episodes()) == sorted(r.uuid for r in results)
    assert any(r.record.outcome == Outcome.SUCCESS for r in results)
    human_steps = 0
    for result in results:
        stored = store.load_episode(result.uuid)
        np.testing.assert_array_equal(stored.sources, result.record.sources)
        np.testing.assert_array_equal(stored.actions, result.record.actions)
        human = stored.sources == StepSource.HUMAN
        human_steps += int(human.sum())
        from_chunk = stored.chunk_ids >= 0
        assert {stored.policy_versions[t] for t in np.flatnonzero(from_chunk)} == {VERSION}
        assert all(stored.policy_versions[t] is None for t in np.flatnonzero(human))
        assert (stored.latency_ms[from_chunk] > 0).all() and (stored.latency_ms[human] == 0).all()
        assert sum(s.t_end - s.t_start for s in stored.interventions) == int(human.sum())
        assert stored.images["corner2"].shape == (stored.length, 16, 16, 3)
        timing = stored.metadata["timing"]
        assert len(timing["tick_late_ms"]) == stored.length and timing["chunk_delay_steps"]
    assert human_steps > 0


class ConstantChunks:
    """A local chunk source: every chunk is ``H`` copies of one action (counts its calls)."""

    def __init__(self, action: list[float], horizon: int = 5) -> None:
        self.actions = np.tile(np.asarray(action, np.float32), (horizon, 1))
        self.calls = 0

    def __call__(self, observation: dict) -> ChunkReply:
        self.calls += 1
        return ChunkReply(self.actions, "const-v1", 1.0)


class WindowTeleop:
    """Takes over for steps [start, end) with a fixed action; ``on_step`` hooks run before each poll."""

    def __init__(self, start: int, end: int, action: list[float], on_step=None) -> None:
        self.start, self.end, self.action, self.on_step = start, end, np.asarray(action, np.float32), on_step

    def reset(self, seed: int | None = None) -> None:
        pass

    def poll(self, context: TeleopContext) -> TeleopCommand | None:
        if self.on_step is not None:
            self.on_step(context.t)
        if self.start <= context.t < self.end:
            return TeleopCommand(takeover=True, action=self.action, reason="operator")
        return None


def _runtime(robot: RobotInterface, tmp_path: Path, teleop, **config: object) -> RobotRuntime:
    settings = {"rate_hz": 200.0, "max_steps": 40, "record_images": False, **config}
    return RobotRuntime(
        robot,
        ConstantChunks([-1.0, 1.0, -0.5, -1.0]),
        EpisodeSpool(tmp_path / f"spool-{len(list(tmp_path.iterdir()))}.db"),
        RuntimeConfig(**settings),
        task=TASK,
        env_id="sim",
        teleop=teleop,
    )


@pytest.mark.parametrize(("delta", "bound"), [(0.25, 0.25), (None, 2.0)])
def test_takeover_and_hand_back_are_bumpless(tmp_path: Path, delta: float | None, bound: float) -> None:
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    runtime = _runtime(robot, tmp_path, WindowTeleop(10, 25, [1.0, -1.0, 0.5, 1.0]), max_action_delta=delta)
    record = runtime.run_episode(seed=1).record
    runtime.close()
    robot.close()
    sources = record.sources
    assert sources[10:25].all() and not sources[:10].any() and not sources[25:].any()
    jumps = action_jumps(record)
    assert jumps["switches"] == 2
    if delta is None:  # the baseline: switching sources slams the command from one action to the other
        assert jumps["takeover"] == pytest.approx(bound)
    else:
        diffs = np.abs(np.diff(record.actions, axis=0)).max(axis=1)
        assert diffs.max() <= bound + 1e-6  # never a jump, at takeover, during it or at hand-back
        np.testing.assert_allclose(record.actions[9], [-1.0, 1.0, -0.5, -1.0])
        np.testing.assert_allclose(record.actions[10], [-0.75, 0.75, -0.25, -0.75])  # starts from the last
        np.testing.assert_allclose(record.actions[24], [1.0, -1.0, 0.5, 1.0])  # caught up with the human
        np.testing.assert_allclose(record.actions[25], [0.75, -0.75, 0.25, 0.75])  # hand-back from the last


def test_e_stop_stops_the_loop_at_once(tmp_path: Path) -> None:
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    holder: dict = {}

    def press_at(t: int) -> None:
        if t == 15:
            holder["runtime"].e_stop()  # the operator's e-stop button, pressed during step 15

    runtime = _runtime(robot, tmp_path, WindowTeleop(99, 99, [0, 0, 0, 0], on_step=press_at))
    holder["runtime"] = runtime
    results = runtime.run(episodes=3, seed=0)
    runtime.close()
    assert len(results) == 1 and results[0].e_stopped
    record = results[0].record
    assert record.length == 15 and robot.steps == 15  # step 15's command never reached the robot
    assert record.outcome == Outcome.ERROR and "e-stop at step 15" in record.error
    assert runtime.spool.load(record.uuid).length == 15  # the interrupted episode is kept
    with pytest.raises(EStopError):
        robot.act(np.zeros(4, np.float32))
    robot.reset(seed=0)
    robot.act(np.zeros(4, np.float32))  # reset clears the e-stop
    robot.close()


def test_e_stop_from_another_thread_on_a_robot_process(tmp_path: Path) -> None:
    robot = RobotProcess(sim_robot_factory(EnvConfig(task=TASK, render=False)))
    runtime = _runtime(robot, tmp_path, None, rate_hz=50.0, max_steps=500)
    threading.Timer(0.3, runtime.e_stop).start()
    results = runtime.run(episodes=2, seed=0)
    runtime.close()
    assert len(results) == 1 and results[0].record.outcome == Outcome.ERROR
    assert results[0].record.length < 500
    with pytest.raises(EStopError):
        robot.act(np.zeros(4, np.float32))
    robot.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chunks_are_aligned_to_the_step_they_were_requested_for(tmp_path: Path, mode: str) -> None:
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    runtime = _runtime(robot, tmp_path, None, mode=mode, rate_hz=100.0, injected_latency_ms=35.0)
    record = runtime.run_episode(seed=0).record
    runtime.close()
    robot.close()
    delays = record.metadata["timing"]["chunk_delay_steps"]
    starts = [
        record.chunk_offsets[np.flatnonzero(record.chunk_ids == k)[0]] for k in range(len(record.chunks))
    ]
    if mode == "sync":  # the robot waited: every chunk starts at its first action
        assert set(delays) == {0} and set(starts) == {0}
    else:  # the robot kept moving: a chunk that arrived d steps late starts at action d
        assert max(delays) >= 1
        assert starts == [min(d, 4) for d in delays][: len(starts)]
        assert (record.chunk_ids[1:] >= 0).sum() > 0


def test_cli_run_pending_upload(
    policy_server: BackgroundServer, store: ExperienceStore, tmp_path: Path
) -> None:
    runner = CliRunner()
    spool = str(tmp_path / "cli.db")
    ran = runner.invoke(
        app,
        [
            "run",
            "--server",
            policy_server.url,
            "--episodes",
            "2",
            "--spool",
            spool,
            "--max-steps",
            "30",
            "--no-own-process",
            "--human-rate",
            "0.1",
        ],
    )
    assert ran.exit_code == 0, ran.output
    assert len(ran.output.strip().splitlines()) == 2
    assert "pending=2" in runner.invoke(app, ["pending", "--spool", spool]).output
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as ingest:
        env = {"FLYWHEEL_INGEST_KEY": KEY}
        uploaded = runner.invoke(app, ["upload", "--spool", spool, "--url", ingest.url], env=env)
    assert uploaded.exit_code == 0, uploaded.output
    assert "stored=2" in uploaded.output and "pending=0" in uploaded.output
    assert len(store.list_episodes()) == 2


class FailingChunks(ConstantChunks):
    """Serves ``good`` chunks, then fails as a crashed policy server would."""

    def __init__(self, good: int) -> None:
        super().__init__([0.1, 0.0, 0.0, 0.0])
        self.good = good

    def __call__(self, observation: dict) -> ChunkReply:
        if self.calls >= self.good:
            raise ServerError("connection lost: policy server went away")
        return super().__call__(observation)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_policy_failure_stops_commanding_and_keeps_the_steps(tmp_path: Path, mode: str) -> None:
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    runtime = _runtime(robot, tmp_path, None, mode=mode)
    runtime.chunks = FailingChunks(good=2)
    with pytest.raises(PolicyUnavailableError, match="went away"):
        runtime.run_episode(seed=0)
    runtime.close()
    (entry,) = runtime.spool.pending()
    record = runtime.spool.load(entry.uuid)
    assert record.outcome == Outcome.ERROR and "ServerError" in record.error
    assert 0 < record.length == robot.steps < 40  # nothing was commanded after the failure
    robot.close()


_ROBOT = "from experiments.commands.robot import app; app()"


def test_robot_process_sigkilled_mid_run_then_everything_recorded_arrives_once(
    policy_server: BackgroundServer, store: ExperienceStore, tmp_path: Path
) -> None:
    spool_path = tmp_path / "robot.db"
    command = [
        sys.executable,
        "-c",
        _ROBOT,
        "run",
        "--server",
        policy_server.url,
        "--episodes",
        "50",
        "--spool",
        str(spool_path),
        "--max-steps",
        "30",
        "--rate-hz",
        "100",
        "--human-rate",
        "0.05",
    ]
    robot = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    assert robot.stdout is not None
    for _ in range(2):
        assert robot.stdout.readline()  # two episodes spooled, the third is running
    os.kill(robot.pid, signal.SIGKILL)  # its robot process sees the pipe close and exits
    robot.wait()
    spool = EpisodeSpool(spool_path)
    recorded = [entry.uuid for entry in spool.entries()]
    assert 2 <= len(recorded) < 50
    with IngestServer(store, IngestConfig(api_key=KEY, port=0)) as ingest:
        report = Uploader(spool, UploadConfig(url=ingest.url, api_key=KEY)).upload_pending()
    assert report.complete and sorted(report.stored) == sorted(str(u) for u in recorded)
    assert sorted(s.uuid for s in store.list_episodes()) == sorted(recorded)


def test_realtime_priority_applies_to_the_loop_thread_and_is_restored(tmp_path: Path) -> None:
    before = os.sched_getscheduler(0)
    seen: list[int] = []
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    runtime = _runtime(
        robot,
        tmp_path,
        WindowTeleop(99, 99, [0, 0, 0, 0], lambda t: seen.append(os.sched_getscheduler(0))),
        realtime_priority=5,
        max_steps=3,
    )
    runtime.run_episode(seed=0)
    runtime.close()
    robot.close()
    if seen[0] != os.SCHED_FIFO:
        pytest.skip("SCHED_FIFO is not permitted here (needs CAP_SYS_NICE); the runtime logged a warning")
    assert set(seen) == {os.SCHED_FIFO} and os.sched_getscheduler(0) == before


def test_single_action_chunks_run_closed_loop_in_async_mode(tmp_path: Path) -> None:
    robot = SimRobot(EnvConfig(task=TASK, render=False))
    runtime = _runtime(robot, tmp_path, None, mode="async", rate_hz=100.0, max_steps=30)
    runtime.chunks = ConstantChunks([0.5, 0.0, 0.0, 0.0], horizon=1)
    result = runtime.run_episode(seed=0)
    runtime.close()
    robot.close()
    from_chunk = result.record.chunk_ids >= 0
    assert from_chunk[5:].mean() > 0.5  # late one-action chunks are executed, not dropped as stale


@pytest.fixture(scope="module")
def vla_server() -> Iterator[BackgroundServer]:
    """The tiny built-in VLA (random init; supports RTC inpainting) behind a policy server."""
    from tests.test_rtc import tiny_vla

    with BackgroundServer(PolicyServer(tiny_vla(), ServerConfig(port=0))) as server:
        with OpenPIClientPolicy(server.url) as client:  # warm up plain and guided sampling
            observation = SimRobot(VLA_ENV).reset(0)
            rest = client.infer_one(observation)["actions"][5:]
            assert client.infer_one(observation, RTCRequest(rest, 1))["rtc"] is True
        yield server


def _switches(record) -> list[int]:
    """Steps where the robot switched from one chunk straight to the next (both policy steps)."""
    ids = record.chunk_ids
    return [t for t in range(1, record.length) if ids[t - 1] >= 0 and ids[t] == ids[t - 1] + 1]


def _continuation_error(record, t: int) -> float:
    """At switch step ``t``: the new chunk's action vs the action the previous chunk had for step ``t``."""
    old, new = record.chunk_ids[t - 1], record.chunk_ids[t]
    expected = record.chunks[old][min(record.chunk_offsets[t - 1] + 1, record.chunks.shape[1] - 1)]
    return float(np.abs(record.chunks[new][record.chunk_offsets[t]] - expected).max())


def test_rtc_mode_continues_the_executing_chunk_across_boundaries(
    vla_server: BackgroundServer, tmp_path: Path
) -> None:
    """In ``rtc`` mode every request carries the unexecuted rest of the chunk and the measured delay; the
    server inpaints, so at each switch the new chunk continues the old one — closer than naive async on the
    same seeds, with a smaller command jump at the boundary."""
    errors: dict[str, list[float]] = {}
    jumps: dict[str, list[float]] = {}
    for mode in ("async", "rtc"):
        robot, client = SimRobot(VLA_ENV), OpenPIClientPolicy(vla_server.url)
        config = RuntimeConfig(
            rate_hz=6.0,
            mode=mode,
            execute_horizon=4,
            max_steps=24,
            max_action_delta=None,  # the random VLA's actions jump more than any rate limit
            record_images=False,
        )
        runtime = RobotRuntime(
            robot,
            remote_chunks(client),
            EpisodeSpool(tmp_path / f"{mode}.db"),
            config,
            task=TASK,
            env_id="sim",
        )
        try:
            records = [result.record for result in runtime.run(episodes=1, seed=0)]
        finally:
            runtime.close()
            client.close()
            robot.close()
        switches = [(record, t) for record in records for t in _switches(record)]
        assert len(switches) >= 4, "the episode runs through several chunks"
        errors[mode] = [_continuation_error(record, t) for record, t in switches]
        jumps[mode] = [
            float(np.abs(record.actions[t] - record.actions[t - 1]).max()) for record, t in switches
        ]
        inpainted = sum(record.metadata["robot_runtime"]["rtc_chunks"] for record in records)
        chunks = sum(len(record.chunks) for record in records)
        assert inpainted == (chunks - len(records) if mode == "rtc" else 0), "all but each first chunk"
    assert np.mean(errors["rtc"]) < 0.5 * np.mean(errors["async"]), errors
    assert np.mean(jumps["rtc"]) < np.mean(jumps["async"]), jumps
