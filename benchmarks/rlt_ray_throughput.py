"""Online RLT throughput: single process (``actors.rlt_loop.RLTLoop``) vs Ray (``actors.rlt_learner.RLTCluster``:
rollout workers + one learner actor) on the toy task.

Both arms do the same warm-up and then at least the same online env-step budget with the same learner settings.
The online phase's wall time, env steps per second and gradient steps are printed side by side. Throughput
only: success is not compared here. On a loaded 2-core machine the ratio mostly measures contention.

    OMP_NUM_THREADS=1 python benchmarks/rlt_ray_throughput.py --env-steps 2400 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import ray
import torch

from actors.cluster import ensure_ray
from actors.rlt_learner import RLTCluster, Rollouts
from actors.rlt_loop import RLTLoop
from rlt.online import OnlineRLT
from rlt.td3 import LearnerConfig
from rlt.toy import PointReachEnv, toy_online_loop
from storage import ExperienceStore

EPISODE_STEPS = 60  # PointReachEnv's default limit


def toy_learner(seed: int, warmup_episodes: int = 20) -> OnlineRLT:
    """The CI toy learner (``rlt.toy``) with the learner settings of ``tests/test_rlt_online.py``."""
    learner = LearnerConfig(batch_size=128, learning_starts=128, net_arch=(128, 128), seed=seed)
    return toy_online_loop(seed, learner, warmup_episodes)


def toy_loop(seed: int) -> RLTLoop:
    """The toy learner with a ``RolloutWorker`` on ``PointReachEnv``."""
    env = PointReachEnv()
    return RLTLoop(toy_learner(seed), lambda: env)


def single_process(env_steps: int, seed: int) -> dict[str, float]:
    """Warm up, then online episodes (each followed by its updates) until ``env_steps``; time the online phase."""
    torch.set_num_threads(1)
    loop = toy_loop(seed)
    loop.warm_up()
    steps_before, updates_before = loop.env_steps, loop.rlt.learner.weights_version
    started = time.perf_counter()
    while loop.env_steps - steps_before < env_steps:
        loop.rlt.learn(loop.play("learner", 1))
    seconds = time.perf_counter() - started
    return {
        "env_steps": loop.env_steps - steps_before,
        "seconds": seconds,
        "updates": loop.rlt.learner.weights_version - updates_before,
    }


def on_ray(env_steps: int, workers: int, seed: int, folder: Path) -> dict[str, float]:
    """The same budget on ``workers`` rollout workers and one learner actor (weights published every round)."""
    store = ExperienceStore(f"sqlite:///{folder / 'throughput.db'}")
    store.upgrade()
    driver = toy_loop(seed)
    store.register_policy_version(driver.rlt.prior.version, "scripted")
    store.register_policy_version(driver.config.rl_version, "rlt")
    rollouts = Rollouts(
        [PointReachEnv], "point-reach", store.url, "throughput", seed + 1, False, EPISODE_STEPS
    )
    cluster = RLTCluster(
        functools.partial(toy_learner),
        driver.rlt,
        rollouts,
        workers,
        seed=seed,
        learner_cpus=0.5,
        cpus_per_worker=0.5,
    )
    try:
        cluster.warm_up(driver.play("prior", driver.config.warmup_episodes))
        updates_before = cluster.publish()  # starts the workers before the clock
        started = time.perf_counter()
        played = cluster.train(env_steps, workers * EPISODE_STEPS)
        seconds = time.perf_counter() - started
        updates_after = cluster.snapshot().learner.weights_version
    finally:
        cluster.shutdown()
    return {"env_steps": played, "seconds": seconds, "updates": updates_after - updates_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-steps", type=int, default=2400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    baseline = single_process(args.env_steps, args.seed)
    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as folder:
        distributed = on_ray(args.env_steps, args.workers, args.seed, Path(folder))
    ray.shutdown()
    print(f"online env steps: {args.env_steps}, rollout workers: {args.workers}, seed {args.seed}")
    for name, arm in (("single process", baseline), (f"ray ({args.workers} workers)", distributed)):
        print(
            f"{name:>18}: {arm['env_steps']} env steps in {arm['seconds']:.1f} s "
            f"({arm['env_steps'] / arm['seconds']:.0f} steps/s), {arm['updates']} gradient steps "
            f"({arm['updates'] / arm['seconds']:.0f}/s)"
        )
    print(f"wall-time ratio single / ray: {baseline['seconds'] / distributed['seconds']:.2f}")


if __name__ == "__main__":
    main()
