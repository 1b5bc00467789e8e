"""The robot runtime: a fixed-rate control loop over a ``RobotInterface`` that executes action chunks from a
policy server, lets a teleop device take over, and spools every episode with per-step provenance and timing.

Each tick (period ``1 / rate_hz``; sleep, then a short spin to the deadline) the loop reads the observation,
picks the policy's action from the current chunk, polls the teleop device, and sends one command.

- ``async`` (default): inference runs in a background thread. The next chunk is requested ``lead`` steps
  before the current one reaches ``execute_horizon`` (``lead`` = the measured inference delay in steps, plus
  one); while it runs the robot keeps executing the current chunk (up to its full horizon), and when the reply
  arrives the loop switches to it at the offset of the elapsed steps (action ``i`` of a chunk requested at
  step ``t`` is meant for step ``t + i``; a chunk that arrives after its horizon still gives its last action,
  so an H=1 policy runs as a one-step-late closed loop). Only when no chunk has actions left does the robot hold (zero motion,
  gripper command kept) — after the episode's first chunk that is a *starved* step (a pause between chunks),
  counted per episode. With one request in flight, continuous execution needs ``H ≥ 2·d`` (H the chunk
  length, d the inference delay in steps): a chunk that arrives d steps late has ``H − d`` actions left, and
  the next request must go out d steps before they run out.
- ``rtc``: as ``async``, but each request carries the unexecuted rest of the current chunk and the measured
  inference delay in steps (flywheel's optional ``rtc`` request field, :mod:`policies.serving.inpainting`),
  so a server whose policy supports inpainting generates the next chunk by Real-Time Chunking: its first
  ``d`` actions repeat what the robot executes meanwhile and the rest of the overlap stays close to it. A
  server that cannot inpaint answers as in ``async`` (``metadata["robot_runtime"]["rtc_chunks"]`` counts the
  chunks that were inpainted).
- ``sync``: the robot waits for every chunk (the loop blocks on inference), for comparison.

The chunk bookkeeping (offsets, when the next request is due, the hold) is ``actors.execution.ChunkSchedule``,
the scheduler simulated rollouts use, driven in real time (``receive(..., arrived_after=k)``).

Takeover and hand-back are bumpless: after the source of the command changes (policy ↔ human), or the policy
resumes after a hold, or starts holding, the command moves from the last executed action toward the new source's action by at
most ``max_action_delta`` per dimension and step, until it has caught up. ``e_stop()`` (any thread) stops the robot at once and ends the run;
the interrupted episode is spooled with outcome ``error``. If the policy server fails (error frame, lost
connection, timeout), the loop stops commanding at once, spools the steps so far with outcome ``error`` and
raises ``PolicyUnavailableError``.

Recorded per step: source (policy/human), the chunk and offset, the policy version named in the server's
reply, the chunk's inference latency (``latency_ms``), and in ``metadata["timing"]`` the tick lateness
(``tick_late_ms``: tick start after its fixed-rate deadline), ``command_ms`` (tick start to the command being
sent: observation, chunk bookkeeping, teleop poll) and each chunk's delay in steps.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.execution import ChunkSchedule, ExecutionConfig
from actors.recorder import EpisodeRecorder
from actors.robot import EStopError, RobotInterface
from core.teleop import TakeoverSegments, TeleopContext, TeleopDevice
from core.types import Observation, Outcome, StepSource, episode_outcome
from policies.openpi_client import OpenPIClientPolicy
from policies.serving.inpainting import RTC_FIELD, RTCRequest
from policies.serving.observations import ObservationSpec
from storage.records import EpisodeRecord
from storage.spool import EpisodeSpool

logger = logging.getLogger(__name__)

#: Camera and square image side a robot renders when asked for images by a server that declares none.
DEFAULT_CAMERAS = ("corner2",)
DEFAULT_IMAGE_SIZE = 64


class RobotCamerasError(ValueError):
    """Cameras or an image size asked for that the server's policy does not take (one line naming both)."""


@dataclass(frozen=True)
class RobotCameras:
    """What the robot renders for the policy: camera names and the image (height, width); no names = no images."""

    names: tuple[str, ...]
    height: int = DEFAULT_IMAGE_SIZE
    width: int = DEFAULT_IMAGE_SIZE


def robot_cameras(
    metadata: dict,
    cameras: tuple[str, ...] | None = None,
    image_size: int | None = None,
    images: bool | None = None,
) -> RobotCameras:
    """The cameras to render, from the server's metadata (its observation spec) unless given.

    ``images=None`` renders exactly when the server's policy declares cameras or cameras / a size are given;
    given values that disagree with a declared spec, or ``images=False`` for a policy that needs cameras, raise
    a one-line :class:`RobotCamerasError` naming both sides.
    """
    served = dict(ObservationSpec.from_metadata(metadata).cameras)
    wanted = ", ".join(f"{name} {h}×{w}" for name, (h, w) in served.items())
    if images is False:
        if served:
            raise RobotCamerasError(f"--no-images: the server's policy needs camera images ({wanted})")
        return RobotCameras(())
    if served and cameras is not None and set(cameras) != set(served):
        raise RobotCamerasError(
            f"--cameras {','.join(cameras)}: the server's policy takes cameras {','.join(served)}"
        )
    names = cameras or tuple(served) or (DEFAULT_CAMERAS if images or image_size else ())
    sizes = {served[name] for name in names if name in served}
    if image_size is not None and sizes - {(image_size, image_size)}:
        raise RobotCamerasError(f"--image-size {image_size}: the server's policy takes {wanted}")
    if len(sizes) > 1:
        raise RobotCamerasError(
            f"the server's policy takes cameras of different sizes ({wanted}); the sim robot renders one"
        )
    height, width = sizes.pop() if sizes else (image_size or DEFAULT_IMAGE_SIZE,) * 2
    return RobotCameras(names, height, width)


class RuntimeConfig(BaseModel):
    """Control-loop settings (validated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_hz: float = Field(default=50.0, ge=1.0, le=1000.0)
    mode: Literal["async", "rtc", "sync"] = "async"
    execute_horizon: int | None = Field(default=None, ge=1)
    max_steps: int = Field(default=200, ge=1)
    max_action_delta: float | None = Field(default=0.25, gt=0.0)
    injected_latency_ms: float = Field(default=0.0, ge=0.0)
    spin_ms: float = Field(default=1.5, ge=0.0)
    record_images: bool = True
    held_dims: tuple[int, ...] = (3,)
    realtime_priority: int | None = Field(default=None, ge=1, le=99)

    @property
    def period_s(self) -> float:
        """Seconds per tick."""
        return 1.0 / self.rate_hz


#: The runtime's modes as ``actors.execution`` names them (its ``async`` is the naive async schedule).
_EXECUTION_MODES = {"async": "naive_async", "rtc": "rtc", "sync": "sync"}


class PolicyUnavailableError(RuntimeError):
    """The policy server failed mid-episode: the robot stopped commanding; the steps so far were spooled."""


@dataclass(frozen=True)
class ChunkReply:
    """One chunk from the policy: ``H×D`` actions, the version that produced them, the latency, and whether
    it was generated by RTC inpainting."""

    actions: np.ndarray
    version: str
    latency_ms: float
    inpainted: bool = False


class ChunkSource(Protocol):
    """Where chunks come from: called with the observation (and, in ``rtc`` mode, the RTC request)."""

    def __call__(self, observation: Observation, rtc: RTCRequest | None = None) -> ChunkReply: ...


def remote_chunks(client: OpenPIClientPolicy) -> ChunkSource:
    """Chunks from a policy server: one lock-step request per observation; the version comes from the reply."""

    def infer(observation: Observation, rtc: RTCRequest | None = None) -> ChunkReply:
        reply = client.infer_one(observation, rtc)
        actions = np.asarray(reply["actions"], dtype=np.float32)[: client.action_horizon]
        version = str(reply.get("policy_version") or client.version)
        return ChunkReply(actions, version, float(reply["round_trip_ms"]), bool(reply.get(RTC_FIELD)))

    return infer


class RateClock:
    """Fixed-rate ticks: sleep until ``spin`` before the deadline, then spin; an overrun restarts the grid."""

    def __init__(self, period_s: float, spin_s: float) -> None:
        self.period_s = period_s
        self.spin_s = spin_s
        self._next: float | None = None

    def wait(self) -> float:
        """Block until the next tick; return how late it started (seconds, ≥ 0)."""
        now = time.perf_counter()
        if self._next is None:
            self._next = now
        target = self._next
        if target - now > self.spin_s:
            time.sleep(target - now - self.spin_s)
        while (now := time.perf_counter()) < target:
            pass
        late = now - target
        self._next = now + self.period_s if late > self.period_s else target + self.period_s
        return late


@dataclass
class _Pending:
    future: Future[ChunkReply]
    step: int


@dataclass
class _ChunkLog:
    """Per episode: each chunk's delay in steps, and how many were RTC-inpainted."""

    delays: list[int] = field(default_factory=list)
    inpainted: int = 0

    def add(self, delay: int, reply: ChunkReply) -> None:
        self.delays.append(delay)
        self.inpainted += reply.inpainted


@dataclass
class EpisodeResult:
    """What one episode did: outcome, steps, starved (holding) steps, tick lateness and the spooled record."""

    record: EpisodeRecord
    starved_steps: int
    tick_late_ms: list[float]
    e_stopped: bool = False

    @property
    def uuid(self) -> uuid.UUID:
        """The episode's UUID."""
        return self.record.uuid


@dataclass
class _Takeover:
    """Source switching and the bumpless transition."""

    human: bool = False
    transition: bool = False
    segments: TakeoverSegments = field(default_factory=TakeoverSegments)

    def switch(self, human: bool, t: int, reason: str) -> None:
        if human != self.human:
            self.transition = True
            if human:
                self.segments.start(t, reason)
            else:
                self.segments.stop(t)
        self.human = human


class RobotRuntime:
    """Runs episodes on ``robot`` with chunks from ``chunks``, optional ``teleop``, spooling into ``spool``."""

    def __init__(
        self,
        robot: RobotInterface,
        chunks: ChunkSource,
        spool: EpisodeSpool,
        config: RuntimeConfig | None = None,
        *,
        task: str,
        env_id: str,
        teleop: TeleopDevice | None = None,
        run_id: str | None = None,
    ) -> None:
        self.robot = robot
        self.chunks = chunks
        self.spool = spool
        self.config = config or RuntimeConfig()
        self.task = task
        self.env_id = env_id
        self.teleop = teleop
        self.run_id = run_id
        self._execution = ExecutionConfig(
            mode=_EXECUTION_MODES[self.config.mode],
            execute_horizon=self.config.execute_horizon,
            held_dims=self.config.held_dims,
        )
        self._e_stop = threading.Event()
        self._pool = ThreadPoolExecutor(1, "robot-inference", initializer=self._prioritize_inference_thread)
        self._latency_ema_ms: float | None = None

    def _prioritize_inference_thread(self) -> None:
        """Under ``realtime_priority`` the inference thread runs SCHED_FIFO one level lower, so the loop never
        waits for a GIL held by a thread the OS has descheduled (priority inversion)."""
        priority = self.config.realtime_priority
        if priority is not None and hasattr(os, "sched_setscheduler"):
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(max(1, priority - 1)))
            except PermissionError:
                logger.warning("realtime_priority: SCHED_FIFO refused for the inference thread")

    # ---- control ----

    def e_stop(self) -> None:
        """Stop the robot now (any thread); the loop ends at its next check and the run stops."""
        self._e_stop.set()
        self.robot.e_stop()

    @property
    def stopped(self) -> bool:
        """Whether ``e_stop`` was called."""
        return self._e_stop.is_set()

    def run(self, episodes: int, seed: int = 0) -> list[EpisodeResult]:
        """Run up to ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...), stopping early on e-stop."""
        results = []
        for index in range(episodes):
            if self.stopped:
                break
            results.append(self.run_episode(seed + index))
        return results

    def close(self) -> None:
        """Stop the inference thread."""
        self._pool.shutdown(wait=True)

    # ---- one episode ----

    def run_episode(self, seed: int) -> EpisodeResult:
        """Run one episode at the fixed rate and spool it; returns its record and timing.

        With ``realtime_priority`` the calling thread runs under ``SCHED_FIFO`` for the episode (Linux, needs
        ``CAP_SYS_NICE``; without it a warning is logged and the loop runs at normal priority).
        """
        with realtime_thread(self.config.realtime_priority):
            return self._run_episode(seed)

    def _run_episode(self, seed: int) -> EpisodeResult:
        config = self.config
        observation = self.robot.reset(seed)
        if self.teleop is not None:
            self.teleop.reset(seed)
        recorder = EpisodeRecorder(
            self.task,
            self.env_id,
            seed,
            self.run_id,
            record_images=config.record_images,
            prompt=observation.get("prompt") or None,
        )
        clock = RateClock(config.period_s, config.spin_ms / 1000)
        last = np.zeros(self.robot.action_dim, dtype=np.float32)
        schedule = ChunkSchedule(self._execution, None, self.robot.action_dim)
        pending: _Pending | None = None
        takeover = _Takeover()
        late_ms: list[float] = []
        command_ms: list[float] = []
        chunk_log = _ChunkLog()
        starved, holding = 0, False
        reward, info, error = 0.0, {}, None
        outcome: Outcome | None = None  # set here only when the episode stops early (ERROR)
        succeeded = terminated = truncated = False
        policy_error: str | None = None
        for t in range(config.max_steps):
            late_ms.append(clock.wait() * 1000)
            tick_start = time.perf_counter()
            if self.stopped:
                outcome, error = Outcome.ERROR, f"e-stop before step {t}"
                break
            observation = self.robot.observe()
            try:
                pending = self._advance_chunks(schedule, pending, observation, t, recorder, chunk_log)
            except Exception as failure:  # the policy server failed: stop commanding, keep what happened
                policy_error = f"policy: {type(failure).__name__}: {failure}"
                outcome, error, pending = Outcome.ERROR, policy_error, None
                break
            scheduled = schedule.next_action(hold_from=last)
            policy_action, chunk_id, offset = scheduled.action, scheduled.chunk_id, scheduled.offset
            if (chunk_id < 0) != holding:
                takeover.transition = True  # entering or leaving a hold is bumpless too
            holding = chunk_id < 0
            starved += holding and bool(chunk_log.delays)  # a hold after the first chunk: a pause
            command = None
            if self.teleop is not None:
                command = self.teleop.poll(TeleopContext(observation, policy_action, t, reward, info))
            human = command is not None and command.takeover
            takeover.switch(human, t, command.reason if human else "")
            target = np.asarray(command.action if human else policy_action, dtype=np.float32)
            executed = self._bumpless(last, target, takeover)
            try:
                command_ms.append((time.perf_counter() - tick_start) * 1000)
                feedback = self.robot.act(executed)
            except EStopError:
                outcome, error = Outcome.ERROR, f"e-stop at step {t}"
                break
            last, reward = executed, feedback.reward
            info = {"success": feedback.success, "dense_reward": feedback.reward}
            done = feedback.terminated or feedback.truncated or t == config.max_steps - 1
            recorder.add_step(
                observation,
                executed,
                feedback.reward,
                feedback.terminated,
                done and not feedback.terminated,
                source=StepSource.HUMAN if human else StepSource.POLICY,
                policy_version=None if human else scheduled.version,
                chunk_id=-1 if human else chunk_id,
                chunk_offset=-1 if human else offset,
                latency_ms=0.0 if human or chunk_id < 0 else scheduled.latency_ms,
            )
            succeeded = succeeded or feedback.success
            terminated, truncated = feedback.terminated, done and not feedback.terminated
            if done:
                break
        if outcome is None:
            outcome = episode_outcome(succeeded, terminated, truncated)
        takeover.segments.stop(recorder.length)
        if pending is not None:
            pending.future.cancel()
        recorder.metadata = {
            "robot_runtime": {
                "mode": config.mode,
                "rate_hz": config.rate_hz,
                "starved_steps": starved,
                "rtc_chunks": chunk_log.inpainted,
            },
            "timing": {
                "tick_late_ms": [round(v, 3) for v in late_ms[: recorder.length]],
                "command_ms": [round(v, 3) for v in command_ms[: recorder.length]],
                "chunk_delay_steps": chunk_log.delays,
            },
        }
        segments = [s for s in takeover.segments.closed if s.t_start < s.t_end <= recorder.length]
        record = recorder.finish(outcome, segments, error)
        if record.length:
            self.spool.put(record)
        if policy_error is not None:
            raise PolicyUnavailableError(
                f"episode {record.uuid} stopped at step {record.length}: {policy_error}"
            )
        return EpisodeResult(record, starved, late_ms, e_stopped=self.stopped)

    # ---- chunks ----

    def _advance_chunks(
        self,
        schedule: ChunkSchedule,
        pending: _Pending | None,
        observation: Observation,
        t: int,
        recorder: EpisodeRecorder,
        chunk_log: _ChunkLog,
    ) -> _Pending | None:
        """Hand an arrived chunk to the schedule, and request the next one when it is due (in sync: wait for
        it); returns the request in flight."""
        if self.config.mode == "sync":
            if schedule.needs_chunk():
                reply = self._infer(observation)
                self._receive(schedule, reply, 0, recorder, chunk_log)
            return None
        if pending is not None and pending.future.done():
            self._receive(schedule, pending.future.result(), t - pending.step, recorder, chunk_log)
            pending = None
        if pending is None and schedule.needs_chunk(self._lead_steps()):
            rtc = self._rtc_request(schedule) if self.config.mode == "rtc" else None
            pending = _Pending(self._pool.submit(self._infer, observation, rtc), t)
        return pending

    @staticmethod
    def _receive(
        schedule: ChunkSchedule,
        reply: ChunkReply,
        delay: int,
        recorder: EpisodeRecorder,
        chunk_log: _ChunkLog,
    ) -> None:
        """Record the chunk that arrived ``delay`` steps after its request and make it the schedule's."""
        chunk_log.add(delay, reply)
        chunk_id = recorder.add_chunk(reply.actions)
        schedule.receive(reply.actions, chunk_id, reply.version, reply.latency_ms, arrived_after=delay)

    def _rtc_request(self, schedule: ChunkSchedule) -> RTCRequest | None:
        """The unexecuted rest of the current chunk (index 0 = this step's action) and the expected delay."""
        rest = schedule.remaining()
        return None if rest is None else RTCRequest(rest, self._lead_steps() - 1)

    def _lead_steps(self) -> int:
        latency = self._latency_ema_ms if self._latency_ema_ms is not None else 0.0
        return math.ceil(latency / 1000 / self.config.period_s) + 1

    def _infer(self, observation: Observation, rtc: RTCRequest | None = None) -> ChunkReply:
        started = time.perf_counter()
        if self.config.injected_latency_ms:
            time.sleep(self.config.injected_latency_ms / 1000)
        reply = self.chunks(observation) if rtc is None else self.chunks(observation, rtc)
        latency = (time.perf_counter() - started) * 1000
        self._latency_ema_ms = (
            latency if self._latency_ema_ms is None else 0.7 * self._latency_ema_ms + 0.3 * latency
        )
        return ChunkReply(reply.actions, reply.version, latency, reply.inpainted)

    def _bumpless(self, last: np.ndarray, target: np.ndarray, takeover: _Takeover) -> np.ndarray:
        """During a transition, move from ``last`` toward ``target`` by at most ``max_action_delta`` per step."""
        delta = self.config.max_action_delta
        if not takeover.transition or delta is None:
            return target.astype(np.float32)
        step = np.clip(target - last, -delta, delta)
        if np.array_equal(step, target - last):
            takeover.transition = False
        return (last + step).astype(np.float32)


@contextmanager
def realtime_thread(priority: int | None) -> Iterator[None]:
    """Run the calling thread under SCHED_FIFO at ``priority`` (if allowed), restoring its policy after."""
    if priority is None or not hasattr(os, "sched_setscheduler"):
        yield
        return
    previous_policy, previous_param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError as error:
        logger.warning("realtime_priority: SCHED_FIFO refused (%s); running at normal priority", error)
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, previous_policy, previous_param)


def action_jumps(record: EpisodeRecord, window: int = 1) -> dict[str, float]:
    """Largest command change (∞-norm) at chunk boundaries and around takeovers / hand-backs.

    A chunk boundary is a policy step whose chunk differs from the previous policy step's (a hold step counts
    as chunk −1). A takeover's jump is the largest change over the ``window`` steps starting where the source
    changed (the bumpless transition).
    """
    actions, sources, chunk_ids = record.actions, record.sources, record.chunk_ids
    diffs = np.abs(np.diff(actions, axis=0)).max(axis=1) if len(actions) > 1 else np.zeros(0)
    policy = StepSource.POLICY
    boundary = [
        diffs[t - 1]
        for t in range(1, len(actions))
        if sources[t] == sources[t - 1] == policy and chunk_ids[t] != chunk_ids[t - 1]
    ]
    switches = [t for t in range(1, len(actions)) if sources[t] != sources[t - 1]]
    takeover = [diffs[t - 1 : t - 1 + window].max() for t in switches]
    return {
        "chunk_boundary": float(max(boundary, default=0.0)),
        "takeover": float(max(takeover, default=0.0)),
        "switches": float(len(switches)),
    }
