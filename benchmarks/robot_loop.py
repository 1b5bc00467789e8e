"""Robot control loop at a fixed rate against a real policy server: sync vs async under injected latency,
plus a network outage between robot and platform.

Setup: a ``SimRobot`` (Meta-World, state only) in its own process, a ``PolicyServer`` on loopback serving the
scripted expert with ``--horizon``-step chunks, a simulated human taking over at random, and the robot runtime
at ``--rate-hz``. For each injected inference latency and mode it reports:

- tick lateness p50/p99 (ms after the fixed-rate schedule) and period jitter p50/p99 (|period − 1/rate|),
  next to the same figures for an empty loop on the same clock in the same run (the machine's baseline);
- command time p50/p99: tick start to the command being sent (observe, chunk pick, teleop poll);
- success rate; pauses between chunks: steps the robot held for lack of a chunk after the first one (async)
  or ticks that started more than half
  a period late (sync: the robot waits for inference);
- max action jump (∞-norm) at chunk boundaries and at takeovers/hand-backs (bumpless transfer on), and the
  takeover jump with bumpless transfer off as its baseline.

Then the outage variant: the ingest endpoint is down for ``--outage-s`` seconds (60 in the issue) while the
robot keeps recording and the uploader retries with backoff; afterwards every episode must be in the store
exactly once. The scripted expert cannot inpaint, so async in that table is naive async.

RTC over the wire: the tiny built-in VLA, trained for ``--rtc-train-steps`` steps on smooth synthetic
trajectories (so its chunks are smooth within a chunk, like a real policy's, but differ between samples),
served by a ``PolicyServer``, drives a rendering ``SimRobot`` at ``--rtc-rate-hz`` with ``execute_horizon`` =
H/2 and bumpless transfer off, in ``async`` (naive) and ``rtc`` mode on the same seeds. Per mode: the chunk-boundary jump (∞-norm change
of the command where the robot switches to the next chunk; mean and max), the continuation error (the new
chunk's first executed action vs what the old chunk had for that step), the measured delay in steps, pauses,
and how many chunks the server inpainted. ``--rtc-episodes 0`` skips it.

    python benchmarks/robot_loop.py                         # full: 3 episodes per cell, 60 s outage
    python benchmarks/robot_loop.py --episodes 2 --outage-s 5   # quick
"""

from __future__ import annotations

import argparse
import itertools
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from actors.robot import RobotProcess, sim_robot_factory
from actors.robot_runtime import (
    RateClock,
    RobotRuntime,
    RuntimeConfig,
    action_jumps,
    realtime_thread,
    remote_chunks,
)
from actors.upload import UploadConfig, Uploader
from envs import EnvConfig, SimulatedHuman, SimulatedHumanConfig
from envs.scripted import ScriptedPolicy
from experiments.ingest import IngestConfig, IngestServer
from policies.openpi_client import OpenPIClientPolicy
from policies.serving import BackgroundServer, PolicyServer, ServerConfig
from storage.records import EpisodeRecord
from storage.spool import EpisodeSpool
from storage.store import ExperienceStore

TASK = "reach-v3"
VERSION = "scripted-bench"


def _percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def _period_jitter(late_ms: list[float]) -> list[float]:
    return [abs(b - a) for a, b in itertools.pairwise(late_ms)]


def empty_loop_baseline(rate_hz: float, ticks: int, priority: int | None) -> tuple[list[float], list[float]]:
    """Tick lateness and period jitter of a loop that does nothing, on the same clock and priority."""
    clock = RateClock(1 / rate_hz, 0.0015)
    with realtime_thread(priority):
        late = [clock.wait() * 1000 for _ in range(ticks)]
    return late, _period_jitter(late)


def run_cell(robot, client, spool, args, mode: str, latency_ms: float, bumpless: bool = True) -> dict:
    """Run ``args.episodes`` episodes in one configuration and summarize them."""
    config = RuntimeConfig(
        rate_hz=args.rate_hz,
        mode=mode,
        max_steps=args.max_steps,
        injected_latency_ms=latency_ms,
        record_images=False,
        max_action_delta=0.25 if bumpless else None,
        realtime_priority=args.realtime,
    )
    human = SimulatedHuman(
        TASK, SimulatedHumanConfig(no_progress_steps=None, random_rate=0.02, takeover_steps=10)
    )
    runtime = RobotRuntime(robot, remote_chunks(client), spool, config, task=TASK, env_id="sim", teleop=human)
    results = runtime.run(args.episodes, seed=args.seed)
    runtime.close()
    late = [v for r in results for v in r.tick_late_ms[1:]]
    jitter = [v for r in results for v in _period_jitter(r.tick_late_ms[1:])]
    jumps = [action_jumps(r.record) for r in results]
    command = [v for r in results for v in r.record.metadata["timing"]["command_ms"]]
    half_period = 500 / args.rate_hz
    pauses = sum(r.starved_steps for r in results) if mode == "async" else sum(v > half_period for v in late)
    return {
        "late": _percentiles(late),
        "jitter": _percentiles(jitter),
        "command": _percentiles(command),
        "success": float(np.mean([r.record.outcome == "success" for r in results])),
        "pauses": pauses,
        "steps": sum(r.record.length for r in results),
        "chunk_jump": max(j["chunk_boundary"] for j in jumps),
        "takeover_jump": max(j["takeover"] for j in jumps),
        "takeovers": int(sum(j["switches"] for j in jumps)),
    }


def latency_table(args: argparse.Namespace, workdir: Path) -> None:
    policy = ScriptedPolicy(TASK, action_horizon=args.horizon, version=VERSION)
    env = EnvConfig(task=TASK, render=False, max_episode_steps=args.max_steps)
    robot = RobotProcess(sim_robot_factory(env))
    spool = EpisodeSpool(workdir / "bench-spool.db")
    base_late, base_jitter = empty_loop_baseline(args.rate_hz, 200, args.realtime)
    print(
        f"baseline empty loop @ {args.rate_hz:g} Hz: lateness p50/p99 {np.percentile(base_late, 50):.3f}/"
        f"{np.percentile(base_late, 99):.3f} ms, period jitter p50/p99 {np.percentile(base_jitter, 50):.3f}/"
        f"{np.percentile(base_jitter, 99):.3f} ms"
    )
    header = (
        f"{'latency':>8} {'mode':>6} {'late p50/p99 ms':>16} {'jitter p50/p99 ms':>18} {'success':>8} "
        f"{'cmd p50/p99 ms':>15} {'pauses':>7} {'steps':>6} {'chunk jump':>10} {'takeover jump':>13} {'takeovers':>9}"
    )
    print(header)
    server = PolicyServer(policy, ServerConfig(port=0, allow_privileged=True))
    with (
        BackgroundServer(server) as background,
        OpenPIClientPolicy(background.url, send_privileged=True) as client,
    ):
        for latency in args.latencies:
            for mode in ("sync", "async"):
                cell = run_cell(robot, client, spool, args, mode, latency)
                print(
                    f"{latency:>6g}ms {mode:>6} {cell['late'][0]:>7.3f}/{cell['late'][1]:<8.3f} "
                    f"{cell['jitter'][0]:>8.3f}/{cell['jitter'][1]:<9.3f} {cell['success']:>8.2f} "
                    f"{cell['command'][0]:>6.3f}/{cell['command'][1]:<8.3f} "
                    f"{cell['pauses']:>7d} {cell['steps']:>6d} {cell['chunk_jump']:>10.3f} "
                    f"{cell['takeover_jump']:>13.3f} {cell['takeovers']:>9d}",
                    flush=True,
                )
        off = run_cell(robot, client, spool, args, "async", args.latencies[-1], bumpless=False)
        print(
            f"baseline, bumpless transfer off (async, {args.latencies[-1]:g} ms): "
            f"takeover jump {off['takeover_jump']:.3f} over {off['takeovers']} switches"
        )
    robot.close()


def smooth_vla(env: EnvConfig, train_steps: int, horizon: int = 10):
    """The tiny VLA for ``env`` (one 48×48 camera, 7-D state), trained briefly on sinusoidal trajectories."""
    from policies.training import EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
    from policies.vla import VLAConfig

    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(8):
        phase, amplitude = rng.uniform(0, 2 * np.pi, size=4), rng.uniform(0.3, 1.0, size=4)
        actions = amplitude * np.sin(0.15 * np.arange(40)[:, None] + phase)
        images = rng.integers(0, 256, size=(40, env.height, env.width, 3), dtype=np.uint8)
        episodes.append(
            EpisodeArrays(
                images={env.cameras[0]: images},
                state=rng.normal(size=(40, 7)).astype(np.float32),
                actions=actions.astype(np.float32),
                prompt=env.instruction,
            )
        )
    config = VLAConfig.preset(
        "tiny", image_size=env.width, cameras=env.cameras, state_dim=7, action_dim=4, action_horizon=horizon
    )
    dataset = build_dataset(episodes, horizon=horizon)
    policy = create_policy(config, dataset, seed=0)
    settings = TrainConfig(
        steps=train_steps, learning_rate=1e-3, warmup_steps=10, image_shift=0, progress=False
    )
    train_bc(policy, dataset, settings)
    return policy


def chunk_switches(record: EpisodeRecord) -> list[tuple[float, float]]:
    """At each switch straight from one chunk to the next: (command jump, continuation error)."""
    ids, offsets, chunks = record.chunk_ids, record.chunk_offsets, record.chunks
    switches = []
    for t in range(1, record.length):
        if ids[t - 1] >= 0 and ids[t] == ids[t - 1] + 1:
            planned = chunks[ids[t - 1]][min(offsets[t - 1] + 1, chunks.shape[1] - 1)]
            jump = np.abs(record.actions[t] - record.actions[t - 1]).max()
            switches.append((float(jump), float(np.abs(chunks[ids[t]][offsets[t]] - planned).max())))
    return switches


def rtc_table(args: argparse.Namespace, workdir: Path) -> None:
    """Naive async vs RTC through the robot loop against a served, inpainting-capable VLA."""
    env = EnvConfig(task=TASK, cameras=("corner2",), width=48, height=48, max_episode_steps=args.max_steps)
    policy = smooth_vla(env, args.rtc_train_steps)
    print(
        f"\nRTC over the wire: tiny VLA ({args.rtc_train_steps} training steps), {args.rtc_rate_hz:g} Hz, "
        f"H = {policy.action_horizon}, execute_horizon = {policy.action_horizon // 2}, "
        f"{args.rtc_episodes} episode(s) of ≤ {args.max_steps} steps per mode"
    )
    print(
        f"{'mode':>6} {'switches':>8} {'jump mean/max':>14} {'continuation mean/max':>22} "
        f"{'delay steps':>11} {'pauses':>6} {'inpainted':>9}"
    )
    robot = RobotProcess(sim_robot_factory(env))
    with (
        BackgroundServer(PolicyServer(policy, ServerConfig(port=0))) as background,
        OpenPIClientPolicy(background.url) as client,
    ):
        for mode in ("async", "rtc"):
            config = RuntimeConfig(
                rate_hz=args.rtc_rate_hz,
                mode=mode,
                execute_horizon=policy.action_horizon // 2,
                max_steps=args.max_steps,
                max_action_delta=None,  # raw boundary jumps: no rate limit after a pause
                record_images=False,
                realtime_priority=args.realtime,
            )
            spool = EpisodeSpool(workdir / f"rtc-{mode}.db")
            runtime = RobotRuntime(robot, remote_chunks(client), spool, config, task=TASK, env_id="sim")
            results = runtime.run(args.rtc_episodes, seed=args.seed)
            runtime.close()
            switches = np.array([s for r in results for s in chunk_switches(r.record)]).reshape(-1, 2)
            delays = [d for r in results for d in r.record.metadata["timing"]["chunk_delay_steps"][1:]]
            inpainted = sum(r.record.metadata["robot_runtime"]["rtc_chunks"] for r in results)
            chunks = sum(len(r.record.chunks) for r in results)
            if not len(switches):
                print(
                    f"{mode:>6}: no chunk switch in {args.rtc_episodes} episode(s); raise --max-steps",
                    flush=True,
                )
                continue
            print(
                f"{mode:>6} {len(switches):>8d} {switches[:, 0].mean():>6.3f}/{switches[:, 0].max():<7.3f} "
                f"{switches[:, 1].mean():>10.3f}/{switches[:, 1].max():<11.3f} {np.mean(delays):>11.2f} "
                f"{sum(r.starved_steps for r in results):>6d} {inpainted:>4d}/{chunks:<4d}",
                flush=True,
            )
    robot.close()


def outage(args: argparse.Namespace, workdir: Path) -> None:
    """Robot records while the ingest endpoint is down for ``outage_s``; then everything must arrive once."""
    store = ExperienceStore(f"sqlite:///{workdir / 'platform.db'}")
    store.upgrade()
    store.register_policy_version(VERSION, kind="scripted", uri=f"scripted:{TASK}")
    spool = EpisodeSpool(workdir / "outage-spool.db")
    env = EnvConfig(task=TASK, render=False, max_episode_steps=args.max_steps)
    robot = RobotProcess(sim_robot_factory(env))
    config = RuntimeConfig(
        rate_hz=args.rate_hz, max_steps=args.max_steps, record_images=False, realtime_priority=args.realtime
    )
    port = _free_port()
    upload = UploadConfig(url=f"http://127.0.0.1:{port}", api_key="bench", backoff_s=0.5, max_backoff_s=8.0)
    uploader = Uploader(spool, upload)
    robot_done = threading.Event()
    retries: list[int] = []

    def upload_loop() -> None:  # what a robot's upload daemon does: pass, wait, pass again
        while not (robot_done.is_set() and not spool.pending()):
            retries.append(uploader.upload_pending().retries)
            time.sleep(0.5)

    started = time.monotonic()
    worker = threading.Thread(target=upload_loop)
    worker.start()
    policy = ScriptedPolicy(TASK, action_horizon=args.horizon, version=VERSION)
    server = PolicyServer(policy, ServerConfig(port=0, allow_privileged=True))
    episodes = 0
    with (
        BackgroundServer(server) as background,
        OpenPIClientPolicy(background.url, send_privileged=True) as client,
    ):
        runtime = RobotRuntime(robot, remote_chunks(client), spool, config, task=TASK, env_id="sim")
        while time.monotonic() - started < args.outage_s:
            runtime.run_episode(seed=episodes)
            episodes += 1
        runtime.close()
    robot.close()
    robot_done.set()
    remaining = len(spool.pending())
    up_at = time.monotonic()
    with IngestServer(store, IngestConfig(api_key="bench", port=port)):
        worker.join()
    drained_s = time.monotonic() - up_at
    stored = [s.uuid for s in store.list_episodes()]
    spooled = [e.uuid for e in spool.entries()]
    exactly_once = sorted(stored) == sorted(spooled) and len(set(stored)) == len(stored)
    print(
        f"outage {args.outage_s:g} s: {episodes} episodes recorded during it, {remaining} pending when the "
        f"ingest came back, drained in {drained_s:.1f} s, {sum(retries)} retries, stored {len(stored)}, "
        f"exactly once: {exactly_once}"
    )


def _free_port() -> int:
    """A free loopback port (the ingest endpoint binds it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate-hz", type=float, default=50.0)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 50, 100, 200])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument(
        "--horizon", type=int, default=30, help="Chunk length H (async needs H ≥ 2·delay steps)."
    )
    parser.add_argument("--outage-s", type=float, default=60.0, help="Ingest downtime (0 skips the variant).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--realtime", type=int, default=None, help="SCHED_FIFO priority of the loop thread.")
    parser.add_argument(
        "--rtc-episodes", type=int, default=2, help="Episodes per mode of the RTC table (0 skips)."
    )
    parser.add_argument("--rtc-rate-hz", type=float, default=10.0, help="Control rate of the RTC table.")
    parser.add_argument(
        "--rtc-train-steps", type=int, default=150, help="Training steps of the RTC table's VLA."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        latency_table(args, Path(workdir))
        if args.rtc_episodes > 0:
            rtc_table(args, Path(workdir))
        if args.outage_s > 0:
            outage(args, Path(workdir))


if __name__ == "__main__":
    main()
