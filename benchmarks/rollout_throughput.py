"""Rollout throughput: Ray rollout workers vs a single-process loop and SB3's ``SubprocVecEnv``; batched vs per-worker
inference with the built-in VLA.

Part 1 (env-bound): Meta-World ``reach-v3`` without rendering, the scripted expert as the policy (one action per
chunk, so every step is a policy call). It measures env steps/s of

- one ``RolloutWorker`` stepping ``E`` envs in this process (the single-process loop),
- ``W`` Ray rollout actors with ``E`` envs each (target ≥ 0.8 × W of the single-process loop),
- SB3 ``SubprocVecEnv`` with ``W × E`` envs (one process each, SB3's usual set-up) and with ``W`` envs, stepped
  by the same batched scripted policy (target: Ray ≥ 1.0 × the better SB3 figure).

Every path runs the same env, the same policy call per step and discards episodes (no store), so the figures
compare stepping machinery; the rollout workers additionally record every step into episode records.

Part 2 (inference-bound): the tiny built-in VLA (randomly initialized; timing only) with 64 px images at ``W``
workers × ``I`` envs, each worker holding its own copy vs one ``BatchingInferenceServer`` (target ≥ 1.5×).

The Ray workers are the actors ``RolloutCluster`` runs (``actors.cluster.rollout_actor``: two threads, so envs
are built on one thread and stepped on another, as in ``flywheel collect``). All figures and ratios are measured
in the same run, ``--rounds`` times interleaved; the best of each counts (the machine is shared with other jobs,
whose load changes from minute to minute).

    python benchmarks/rollout_throughput.py [--workers 2] [--envs-per-worker 4] [--steps 2000] [--vla-steps 240]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import ray
import torch
from stable_baselines3.common.vec_env import SubprocVecEnv

from actors.cluster import ensure_ray, rollout_actor, start_inference_server
from actors.rollout import RolloutWorker
from envs import EnvConfig, make_env
from envs.scripted import ScriptedPolicy
from policies.base import Policy
from policies.training import EpisodeArrays, build_dataset, create_policy
from policies.vla import VLAConfig, VLAPolicy

STATE_ENV = EnvConfig(task="reach-v3", render=False)
IMAGE = 64
IMAGE_ENV = EnvConfig(task="reach-v3", cameras=("corner2",), width=IMAGE, height=IMAGE)


@dataclass
class Rate:
    """A timed run: env steps, wall seconds, CPU seconds of the processes doing the work, mean inference batch."""

    steps: int
    seconds: float
    cpu_seconds: float
    batch: float | None = None

    @property
    def per_second(self) -> float:
        """Env steps per wall-clock second."""
        return self.steps / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Env steps per CPU second (independent of how much CPU other jobs left us)."""
        return self.steps / max(self.cpu_seconds, 1e-9)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by the processes ``pids`` (Linux ``/proc/<pid>/stat``)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def discard(_record) -> None:
    """An episode sink that keeps nothing (picklable, module level)."""


def tiny_vla(env: EnvConfig, horizon: int = 10, seed: int = 0) -> VLAPolicy:
    """The tiny built-in VLA for ``env``'s observations, randomly initialized (statistics from random data)."""
    rng = np.random.default_rng(seed)
    steps = 32
    episode = EpisodeArrays(
        images={
            camera: rng.integers(0, 256, (steps, env.height, env.width, 3), np.uint8)
            for camera in env.cameras
        },
        state=rng.normal(size=(steps, 7)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32),
        prompt=env.instruction,
    )
    config = VLAConfig.preset(
        "tiny", image_size=env.width, cameras=env.cameras, state_dim=7, action_dim=4, action_horizon=horizon
    )
    return create_policy(config, build_dataset([episode], horizon=horizon), seed=seed)


def single_process(policy: Policy, env: EnvConfig, envs: int, steps: int) -> Rate:
    """One in-process ``RolloutWorker`` with ``envs`` envs."""
    worker = RolloutWorker(
        [functools.partial(make_env, env)] * envs, policy, discard, task=env.task, record_images=False
    )
    worker.run(env_steps=min(200, steps))  # warm-up: first resets, lazy imports
    cpu, started = time.process_time(), time.perf_counter()
    stats = worker.run(env_steps=steps)
    rate = Rate(stats.env_steps, time.perf_counter() - started, time.process_time() - cpu)
    worker.close()
    return rate


def ray_workers(policy: Policy, env: EnvConfig, workers: int, envs: int, steps: int) -> Rate:
    """``workers`` Ray rollout actors (1 CPU each) with ``envs`` envs each, ``steps`` each."""
    actor = rollout_actor(cpus_per_worker=1)  # the collection path's actor: two threads, envs built on one
    handles = [
        actor.remote(
            [functools.partial(make_env, env)] * envs,
            policy,
            discard,
            task=env.task,
            worker_id=index,
            record_images=False,
        )
        for index in range(workers)
    ]
    ray.get([handle.run.remote(env_steps=min(200, steps)) for handle in handles])  # warm-up
    pids = ray.get([handle.pid.remote() for handle in handles])
    cpu, started = cpu_seconds(pids), time.perf_counter()
    results = ray.get([handle.run.remote(env_steps=steps) for handle in handles])
    rate = Rate(sum(r.env_steps for r in results), time.perf_counter() - started, cpu_seconds(pids) - cpu)
    for handle in handles:
        ray.kill(handle)
    return rate


class PrivilegedObservation(gym.ObservationWrapper):
    """The flywheel env with its privileged 39-D vector as a Box observation (what SB3's buffers can hold)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(39,), dtype=np.float32)

    def observation(self, observation: dict) -> np.ndarray:
        return observation["privileged"]


def _sb3_env(env: EnvConfig) -> gym.Env:
    return PrivilegedObservation(make_env(env))


def subproc_vec_env(policy: ScriptedPolicy, env: EnvConfig, envs: int, steps: int) -> Rate:
    """SB3 ``SubprocVecEnv`` with ``envs`` envs, stepped by the batched scripted policy (CPU: driver + envs)."""
    vec = SubprocVecEnv([functools.partial(_sb3_env, env)] * envs)
    prompts = [env.instruction] * envs

    def act(observation: np.ndarray) -> np.ndarray:
        batch = {"images": {}, "state": observation[:, :4], "prompt": prompts, "privileged": observation}
        return policy.infer(batch).actions[:, 0]

    observation = vec.reset()
    for _ in range(200 // envs):  # warm-up
        observation, *_ = vec.step(act(observation))
    rounds = max(1, steps // envs)
    pids = [os.getpid()] + [process.pid for process in vec.processes]
    cpu, started = cpu_seconds(pids), time.perf_counter()
    for _ in range(rounds):
        observation, *_ = vec.step(act(observation))
    rate = Rate(rounds * envs, time.perf_counter() - started, cpu_seconds(pids) - cpu)
    vec.close()
    return rate


def best_of(measurements: dict[str, Callable[[], Rate]], rounds: int) -> list[Rate]:
    """Run every measurement ``rounds`` times, interleaved; print each run and return each one's fastest run."""
    runs: dict[str, list[Rate]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            rate = measure()
            runs[name].append(rate)
            batch = f"  mean batch {rate.batch:.1f}" if rate.batch is not None else ""
            print(
                f"  {name:42s} {rate.per_second:8.1f} steps/s  {rate.per_cpu_second:7.1f} steps/CPU-s{batch}",
                flush=True,
            )
    best = [max(values, key=lambda rate: rate.per_second) for values in runs.values()]
    for name, rate, values in zip(runs, best, runs.values(), strict=True):
        median = np.median([r.per_second for r in values])
        print(f"best {name:42s} {rate.per_second:8.1f} steps/s  (median {median:.1f})")
    return best


def vla_inference(workers: int, envs: int, steps: int, batched: bool) -> Rate:
    """The tiny VLA at ``workers`` × ``envs``: a policy copy per worker or one batching server (wall time only)."""
    policy = tiny_vla(IMAGE_ENV)
    server = None
    if batched:
        server, policy = start_inference_server(policy, max_batch=workers * envs, max_wait_ms=10.0)
    rate = ray_workers(policy, IMAGE_ENV, workers, envs, steps)
    rate.batch = float(envs)
    if server is not None:
        rate.batch = ray.get(server.stats.remote())["mean_batch"]
        rate.cpu_seconds = float("nan")  # the workers' CPU alone would leave out the server's
        ray.kill(server)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--envs-per-worker", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000, help="env steps per worker (part 1)")
    parser.add_argument("--vla-envs-per-worker", type=int, default=8)
    parser.add_argument("--vla-steps", type=int, default=240, help="env steps per worker (part 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Ray starts worker processes at niceness 15 by default; on a machine shared with other jobs that alone starves
    # them against the nice-0 baselines, so the comparison runs every path at the same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ensure_ray(num_cpus=args.workers)
    w, e = args.workers, args.envs_per_worker
    expert = ScriptedPolicy(STATE_ENV.task, version="expert")

    print(
        f"# part 1: reach-v3 state-only, scripted expert, {w} workers x {e} envs, {args.steps} steps/worker"
    )
    print(f"# best of {args.rounds} interleaved rounds (the machine is shared: best = least disturbed)")
    part1 = {
        f"single-process RolloutWorker ({e} envs)": lambda: single_process(expert, STATE_ENV, e, args.steps),
        f"Ray: {w} RolloutWorker actors x {e} envs": lambda: ray_workers(expert, STATE_ENV, w, e, args.steps),
        f"SB3 SubprocVecEnv ({w * e} envs)": lambda: subproc_vec_env(
            expert, STATE_ENV, w * e, w * args.steps
        ),
        f"SB3 SubprocVecEnv ({w} envs)": lambda: subproc_vec_env(expert, STATE_ENV, w, w * args.steps),
    }
    single, distributed, sb3_many, sb3_few = best_of(part1, args.rounds)
    sb3 = max(sb3_many, sb3_few, key=lambda rate: rate.per_second)
    print(
        f"ratio Ray / single process: {distributed.per_second / single.per_second:.2f}  (target >= {0.8 * w:.1f})"
    )
    print(f"ratio Ray / best SubprocVecEnv: {distributed.per_second / sb3.per_second:.2f}  (target >= 1.0)")
    efficiency = distributed.per_cpu_second / single.per_cpu_second
    print(
        f"per CPU-second, Ray / single process: {efficiency:.2f} -> {w} free cores would give ~{w * efficiency:.2f}x;"
        f" Ray / SubprocVecEnv: {distributed.per_cpu_second / sb3.per_cpu_second:.2f}"
    )

    ve = args.vla_envs_per_worker
    print(f"\n# part 2: tiny VLA (random init), {IMAGE}px corner2 images, {w} workers x {ve} envs, H=10")
    part2 = {
        "per-worker inference (a copy per worker)": lambda: vla_inference(
            w, ve, args.vla_steps, batched=False
        ),
        "batched inference server (one copy)": lambda: vla_inference(w, ve, args.vla_steps, batched=True),
    }
    local, served = best_of(part2, args.rounds)
    print(f"ratio batched / per-worker: {served.per_second / local.per_second:.2f}  (target >= 1.5)")
    ray.shutdown()


if __name__ == "__main__":
    main()
