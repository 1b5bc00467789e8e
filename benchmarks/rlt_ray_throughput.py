"""Online RLT throughput: single process (``OnlineRLT``) vs Ray (``actors.rlt_learner.RLTCluster``) on the toy task.

Both arms do the same warm-up and then the same number of online learner-mode episodes, with the same learner
settings. The online phase's wall time, env steps per second and gradient steps are printed side by side.
Throughput only: success is not compared here. On a loaded 2-core machine the ratio mostly measures contention.

    OMP_NUM_THREADS=1 python benchmarks/rlt_ray_throughput.py --episodes 40 --workers 2
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from actors.cluster import ensure_ray
from actors.rlt_learner import RLTCluster
from rlt.online import OnlineRLT
from rlt.td3 import LearnerConfig
from rlt.toy import toy_online_loop


def toy_loop(seed: int, warmup_episodes: int = 20) -> OnlineRLT:
    """The CI toy loop (``rlt.toy``) with the learner settings of ``tests/test_rlt_online.py``."""
    learner = LearnerConfig(batch_size=128, learning_starts=128, net_arch=(128, 128), seed=seed)
    return toy_online_loop(seed, learner, warmup_episodes)


def single_process(episodes: int, seed: int) -> dict[str, float]:
    """Warm up, then ``episodes`` online episodes each followed by its updates; time the online phase."""
    torch.set_num_threads(1)
    loop = toy_loop(seed)
    loop.warm_up()
    updates_before = loop.learner.weights_version
    started = time.perf_counter()
    for _ in range(episodes):
        loop.learn([loop.run_episode("learner")[0]])
    seconds = time.perf_counter() - started
    return {
        "episodes": episodes,
        "seconds": seconds,
        "updates": loop.learner.weights_version - updates_before,
    }


def on_ray(episodes: int, workers: int, seed: int) -> dict[str, float]:
    """The same budget split over ``workers`` rollout actors and one learner actor."""
    cluster = RLTCluster(toy_loop, workers, seed=seed, learner_cpus=0.5, cpus_per_worker=0.5)
    try:
        cluster.warm_up()
        updates_before = ray.get(cluster.learner.latest.remote())[0]
        started = time.perf_counter()
        played = cluster.run(episodes // workers)
        seconds = time.perf_counter() - started
        updates_after = ray.get(cluster.learner.latest.remote())[0]
    finally:
        cluster.shutdown()
    return {
        "episodes": sum(len(run) for run in played),
        "seconds": seconds,
        "updates": updates_after - updates_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    baseline = single_process(args.episodes, args.seed)
    ensure_ray(num_cpus=2)
    distributed = on_ray(args.episodes, args.workers, args.seed)
    ray.shutdown()
    print(f"online episodes: {args.episodes}, rollout workers: {args.workers}, seed {args.seed}")
    for name, arm in (("single process", baseline), (f"ray ({args.workers} workers)", distributed)):
        print(
            f"{name:>18}: {arm['episodes']} episodes in {arm['seconds']:.1f} s "
            f"({arm['episodes'] / arm['seconds']:.2f} episodes/s), {arm['updates']} gradient steps "
            f"({arm['updates'] / arm['seconds']:.0f}/s)"
        )
    print(f"wall-time ratio single / ray: {baseline['seconds'] / distributed['seconds']:.2f}")


if __name__ == "__main__":
    main()
