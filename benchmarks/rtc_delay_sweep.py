"""RTC delay sweep: success rate and episode length vs inference delay d for sync, naive async and RTC execution.

Per task (one process each, in parallel): collect scripted-expert demos (closed loop, small action noise), train
the tiny built-in VLA on them by behaviour cloning (flow matching, chunk H = 12, 10 Euler steps), then
roll it out with a ``RolloutWorker`` for every mode × d ∈ {0, 1, 2, 4, 6} with execution horizon s = 6 (s + d ≤ H
for every d) on the same episode seeds. Inference delay is simulated in steps (see ``actors/execution.py``).

Reported per (task, mode, d): success rate, mean episode length (failures count their full length), the mean
action jump ‖a_t − a_{t−1}‖ at chunk switches, and the share of waiting steps. The plot goes to
``benchmarks/results/rtc_delay_sweep.png`` and the table to ``benchmarks/results/rtc_delay_sweep.json``; the
trained policy is cached there too (reused by the next run with the same settings unless ``--retrain``).

State-conditioned variant: rendering cost ~50 ms per 48 px frame on the shared 2-core machine (≈25 min for the
sweep's ~30k steps), so the envs do not render and the VLA's camera input is a constant blank 16 px frame
(``BlankCamera``); it conditions on the prompt and the 7-D state (hand xyz, gripper, goal xyz), which is all
these tasks need. Everything else (flow-matching head, chunking, guidance) is the built-in VLA unchanged. It is a
small model trained for a couple of minutes on CPU, not a converged policy.

    python benchmarks/rtc_delay_sweep.py [--tasks reach-v3 button-press-topdown-v3] [--episodes 10] [--demos 16]
        [--train-steps 1500]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

MODES = ("sync", "naive_async", "rtc")
DELAYS = (0, 1, 2, 4, 6)
HORIZON, EXECUTE = 12, 6
IMAGE = 16
CAMERA = "blank"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class SweepPoint:
    """One (task, mode, delay) cell of the sweep."""

    task: str
    mode: str
    delay: int
    episodes: int
    success_rate: float
    mean_length: float
    mean_switch_jump: float
    waiting_share: float
    seconds: float


def _env_config(task: str, max_steps: int):
    from envs import EnvConfig

    return EnvConfig(task=task, render=False, max_episode_steps=max_steps)


def blank_camera_env(env):
    """The Meta-World env without rendering, its observations given a constant blank ``IMAGE`` px frame."""
    import gymnasium as gym

    from envs import make_env

    class BlankCamera(gym.ObservationWrapper):
        def observation(self, observation: dict) -> dict:
            return {**observation, "images": {CAMERA: np.zeros((IMAGE, IMAGE, 3), np.uint8)}}

    return BlankCamera(make_env(env))


def _rollout(policy, env, episodes: int, envs: int, seed: int, execution=None) -> list:
    from actors.rollout import RolloutWorker

    records: list = []
    worker = RolloutWorker(
        [functools.partial(blank_camera_env, env)] * envs,
        policy,
        records.append,
        task=env.task,
        seed=seed,
        execution=execution,
        record_images=execution is None,  # demos keep their images for training
    )
    worker.run(episodes=episodes)
    worker.close()
    return records


def train_policy(task: str, demos: int, train_steps: int, max_steps: int, seed: int):
    """Scripted demos → BC-trained tiny VLA for ``task``; returns the policy and the demos' success rate."""
    from envs.scripted import ScriptedPolicy
    from policies.training import EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
    from policies.vla import VLAConfig

    env = _env_config(task, max_steps)
    expert = ScriptedPolicy(task, noise_std=0.1, seed=seed, version="expert")
    records = _rollout(expert, env, demos, envs=4, seed=seed + 1000)
    good = [r for r in records if r.outcome == "success"] or records
    episodes = [EpisodeArrays(dict(r.images), r.states, r.actions, env.instruction) for r in good]
    dataset = build_dataset(episodes, horizon=HORIZON)
    config = VLAConfig.preset(
        "tiny",
        image_size=IMAGE,
        image_grid=2,
        cameras=(CAMERA,),
        state_dim=7,
        action_dim=4,
        action_horizon=HORIZON,
    )
    policy = create_policy(config, dataset, seed=seed, version=f"bc-{task}")
    train_bc(
        policy,
        dataset,
        TrainConfig(steps=train_steps, batch_size=32, progress=False, seed=seed, image_shift=0),
    )
    return policy, len(good) / len(records), len(dataset)


def sweep_task(task: str, args: argparse.Namespace) -> list[SweepPoint]:
    """Train on ``task`` and roll out every mode × delay; one process per task."""
    import torch

    from actors.execution import ExecutionConfig
    from policies.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    started = time.perf_counter()
    checkpoint = RESULTS / f"rtc_sweep_{task}_demos{args.demos}_steps{args.train_steps}_seed{args.seed}"
    if checkpoint.exists() and not args.retrain:
        policy = load_checkpoint(checkpoint)
        print(f"[{task}] loaded the trained policy from {checkpoint}", flush=True)
    else:
        policy, demo_success, samples = train_policy(
            task, args.demos, args.train_steps, args.max_steps, args.seed
        )
        save_checkpoint(policy, checkpoint)
        print(
            f"[{task}] demos success {demo_success:.0%}, {samples} samples, trained in"
            f" {time.perf_counter() - started:.0f} s ({time.process_time():.0f} CPU s so far)",
            flush=True,
        )
    env = _env_config(task, args.max_steps)
    points = []
    for mode in MODES:
        for delay in DELAYS:
            execution = ExecutionConfig(mode=mode, delay=delay, execute_horizon=EXECUTE)
            began = time.perf_counter()
            policy.generator.manual_seed(args.seed)  # the same flow noise stream for every cell
            records = _rollout(policy, env, args.episodes, args.envs, args.seed, execution)
            point = _summarize(task, mode, delay, records, time.perf_counter() - began)
            print(
                f"[{task}] {mode:11s} d={delay}: success {point.success_rate:4.0%}  length {point.mean_length:6.1f}"
                f"  switch jump {point.mean_switch_jump:.3f}  waiting {point.waiting_share:4.0%}"
                f"  ({point.seconds:.0f} s)",
                flush=True,
            )
            points.append(point)
    print(
        f"[{task}] done: {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} CPU s",
        flush=True,
    )
    return points


def _summarize(task: str, mode: str, delay: int, records: list, seconds: float) -> SweepPoint:
    jumps, waiting, steps = [], 0, 0
    for record in records:
        ids = record.chunk_ids
        executed = np.flatnonzero(ids >= 0)
        switches = executed[1:][ids[executed[1:]] != ids[executed[:-1]]]
        jumps += [float(np.linalg.norm(record.actions[t, :3] - record.actions[t - 1, :3])) for t in switches]
        waiting += int((ids < 0).sum())
        steps += record.length
    return SweepPoint(
        task=task,
        mode=mode,
        delay=delay,
        episodes=len(records),
        success_rate=float(np.mean([r.outcome == "success" for r in records])),
        mean_length=float(np.mean([r.length for r in records])),
        mean_switch_jump=float(np.mean(jumps)) if jumps else 0.0,
        waiting_share=waiting / max(steps, 1),
        seconds=seconds,
    )


def plot(points: list[SweepPoint], path: Path) -> None:
    """Success rate, episode length and switch jump vs d: one row per task, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p.task for p in points})
    metrics = (
        ("success_rate", "success rate"),
        ("mean_length", "episode length"),
        ("mean_switch_jump", "jump"),
    )
    figure, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (field, label) in enumerate(metrics):
            axis = axes[row][col]
            for mode in MODES:
                series = sorted(
                    (p.delay, getattr(p, field)) for p in points if p.task == task and p.mode == mode
                )
                axis.plot(*zip(*series, strict=True), marker="o", label=mode)
            axis.set_title(f"{task}: {label}")
            axis.set_xlabel("inference delay d (steps)")
            axis.grid(alpha=0.3)
        axes[row][0].set_ylim(-0.05, 1.05)
        axes[row][0].legend()
    figure.suptitle(f"tiny VLA, H={HORIZON}, s={EXECUTE}: sync vs naive async vs RTC")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "button-press-topdown-v3"])
    parser.add_argument("--episodes", type=int, default=10, help="episodes per (task, mode, d)")
    parser.add_argument("--envs", type=int, default=5, help="envs stepped together per rollout")
    parser.add_argument("--demos", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--max-steps", type=int, default=150, help="episode step limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="ignore a cached trained policy")
    args = parser.parse_args()
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(len(args.tasks), 2)) as pool:
        points = [
            p
            for task_points in pool.map(functools.partial(sweep_task, args=args), args.tasks)
            for p in task_points
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rtc_delay_sweep.json").write_text(json.dumps([asdict(p) for p in points], indent=1))
    plot(points, RESULTS / "rtc_delay_sweep.png")
    print(f"\n{'task':26s} {'mode':11s} " + " ".join(f"d={d:<11d}" for d in DELAYS))
    for task in args.tasks:
        for mode in MODES:
            cells = [p for d in DELAYS for p in points if p.task == task and p.mode == mode and p.delay == d]
            print(
                f"{task:26s} {mode:11s} "
                + " ".join(f"{p.success_rate:4.0%}/{p.mean_length:5.1f}  " for p in cells)
            )
    print(
        f"(success / mean length)  total {time.perf_counter() - started:.0f} s; plot {RESULTS / 'rtc_delay_sweep.png'}"
    )


if __name__ == "__main__":
    main()
