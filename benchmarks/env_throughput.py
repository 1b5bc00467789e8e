"""Env steps/s through flywheel's ``MetaWorldEnv`` vs raw Meta-World step + render, measured in the same run.

Baseline: the bare Meta-World env class (``render_mode="rgb_array"``, same camera and size, shadows and
multisampling off) stepping and calling ``render()`` — Meta-World's own path, without flywheel's observation dict,
orientation fix or state extraction. Both run the same seeded action sequence; measurements alternate between the
two in short blocks so that load from other processes on the machine hits both alike. Resets are not timed.
Also reported: image-free steps/s (flywheel ``render=False`` vs raw ``step`` only). Target: overhead ≤ 15%.

Run: ``python benchmarks/env_throughput.py [--task pick-place-v3] [--camera corner2] [--size 96] [--steps 600]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from envs import EnvConfig, MetaWorldEnv
from envs.rendering import configure_fast_rendering

EPISODE_STEPS = 150
BLOCK_STEPS = 25
OVERHEAD_TARGET = 0.15  # flywheel's time per step with images at most 15% above raw Meta-World's


class RawMetaWorld:
    """Meta-World's env class stepped and rendered directly (the baseline)."""

    def __init__(self, task: str, camera: str, size: int, render: bool) -> None:
        mode = "rgb_array" if render else None
        self.sim = ALL_V3_ENVIRONMENTS[task](render_mode=mode, camera_name=camera, width=size, height=size)
        self.sim._partially_observable = False
        del self.sim.sawyer_observation_space
        self.sim._freeze_rand_vec = False
        self.sim.seeded_rand_vec = True
        self.sim._set_task_called = True
        self.sim.seed(0)
        configure_fast_rendering(self.sim.model, size, size)
        self.render = render

    def reset(self) -> None:
        self.sim.reset()

    def step(self, action: np.ndarray) -> None:
        self.sim.step(action)
        if self.render:
            self.sim.render()

    def close(self) -> None:
        self.sim.close()


class Flywheel:
    """flywheel's env, observation dict and all."""

    def __init__(self, config: EnvConfig) -> None:
        self.env = MetaWorldEnv(config)

    def reset(self) -> None:
        self.env.reset(seed=0)

    def step(self, action: np.ndarray) -> None:
        self.env.step(action)

    def close(self) -> None:
        self.env.close()


def interleaved_rates(runners: dict[str, object], actions: np.ndarray) -> dict[str, float]:
    """Steps/s of each runner over the same actions, alternating ``BLOCK_STEPS``-step blocks between them."""
    seconds = dict.fromkeys(runners, 0.0)
    positions = dict.fromkeys(runners, 0)
    for runner in runners.values():
        runner.reset()
    for start in range(0, len(actions), BLOCK_STEPS):
        block = actions[start : start + BLOCK_STEPS]
        for name, runner in runners.items():
            seconds[name] += _timed_block(runner, block, positions, name)
    return {name: len(actions) / seconds[name] for name in runners}


def _timed_block(runner: object, block: np.ndarray, positions: dict[str, int], name: str) -> float:
    elapsed = 0.0
    for action in block:
        if positions[name] == EPISODE_STEPS:
            runner.reset()
            positions[name] = 0
        started = time.perf_counter()
        runner.step(action)
        elapsed += time.perf_counter() - started
        positions[name] += 1
    return elapsed


def measure(
    label: str,
    make: dict[str, Callable[[], object]],
    actions: np.ndarray,
    target: float | None = None,
) -> dict[str, float]:
    """Print both rates and the overhead; with ``target`` also whether the overhead MEETS or MISSES it."""
    runners = {name: factory() for name, factory in make.items()}
    try:
        rates = interleaved_rates(runners, actions)
    finally:
        for runner in runners.values():
            runner.close()
    raw, ours = rates["raw"], rates["flywheel"]
    overhead = raw / ours - 1.0
    verdict = (
        "" if target is None else f" ({'MEETS' if overhead <= target else 'MISSES'} target <= {target:.0%})"
    )
    print(
        f"{label}: raw Meta-World {raw:8.1f} steps/s | flywheel {ours:8.1f} steps/s"
        f" | overhead {overhead * 100:+.1f}% (time per step){verdict}"
    )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--camera", default="corner2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    actions = np.random.default_rng(0).uniform(-1, 1, size=(args.steps, 4)).astype(np.float32)
    print(f"task {args.task}, camera {args.camera}, {args.size}x{args.size}, {args.steps} timed steps each")
    image = EnvConfig(task=args.task, cameras=(args.camera,), width=args.size, height=args.size, seed=0)
    measure(
        "with images",
        {
            "raw": lambda: RawMetaWorld(args.task, args.camera, args.size, render=True),
            "flywheel": lambda: Flywheel(image),
        },
        actions,
        target=OVERHEAD_TARGET,
    )
    free = image.model_copy(update={"render": False})
    measure(
        "image-free ",
        {
            "raw": lambda: RawMetaWorld(args.task, args.camera, args.size, render=False),
            "flywheel": lambda: Flywheel(free),
        },
        np.tile(actions, (5, 1)),
    )


if __name__ == "__main__":
    main()
