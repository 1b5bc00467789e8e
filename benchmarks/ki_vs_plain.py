"""Knowledge Insulation vs plain π0 training of the built-in VLA on the same Meta-World demos.

Collects scripted-expert demos (images + state), trains the ``tiny`` VLA twice from the same seed — plain flow
matching, and with Knowledge Insulation (FAST next-token loss on the backbone, stop-gradient into the expert) —
prints both loss curves and evaluates each in the env (success with a Wilson 95% interval).

    python benchmarks/ki_vs_plain.py --task reach-v3 --demos 50 --steps 1500 --eval-episodes 20
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch

from envs import EnvConfig, MetaWorldEnv, ScriptedExpert
from policies.base import stack_observations
from policies.training import EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
from policies.vla import VLAConfig, VLAPolicy


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of one comparison run."""

    task: str = "reach-v3"
    demos: int = 50
    noise_std: float = 0.1
    image_size: int = 96
    camera: str = "corner2"
    size: str = "tiny"
    steps: int = 1500
    batch_size: int = 32
    eval_episodes: int = 20
    execute_steps: int = 5
    max_episode_steps: int = 150
    seed: int = 0
    variants: tuple[str, ...] = ("plain", "ki")


def env_config(config: BenchmarkConfig, seed: int) -> EnvConfig:
    """The env both demos and evaluation use."""
    return EnvConfig(
        task=config.task,
        cameras=(config.camera,),
        width=config.image_size,
        height=config.image_size,
        max_episode_steps=config.max_episode_steps,
        seed=seed,
    )


def collect_demos(config: BenchmarkConfig) -> tuple[list[EpisodeArrays], int]:
    """Scripted-expert episodes (seeds 10_000+i, executed noisy actions as labels); returns them and successes."""
    env = MetaWorldEnv(env_config(config, config.seed))
    expert = ScriptedExpert(config.task, noise_std=config.noise_std, seed=config.seed)
    episodes, successes = [], 0
    for index in range(config.demos):
        obs, _ = env.reset(seed=10_000 + index)
        images, states, actions = [], [], []
        done = False
        while not done:
            action = expert.act(obs["privileged"])
            images.append(obs["images"][config.camera])
            states.append(obs["state"])
            actions.append(action)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        successes += int(info["success"])
        episodes.append(
            EpisodeArrays({config.camera: np.stack(images)}, np.stack(states), np.stack(actions), env.prompt)
        )
    env.close()
    return episodes, successes


def evaluate(policy: VLAPolicy, config: BenchmarkConfig, seed_offset: int = 0) -> int:
    """Successes over ``eval_episodes`` fresh scenes (seeds disjoint from the demos), replanning every
    ``execute_steps`` actions."""
    env = MetaWorldEnv(env_config(config, config.seed))
    successes = 0
    for index in range(config.eval_episodes):
        obs, _ = env.reset(seed=seed_offset + index)
        done, success, queue = False, False, []
        while not done:
            if not queue:
                batch = stack_observations([{k: v for k, v in obs.items() if k != "privileged"}])
                queue = list(policy.infer(batch).actions[0][: config.execute_steps])
            obs, _, terminated, truncated, info = env.step(queue.pop(0))
            success = success or bool(info["success"])
            done = terminated or truncated
        successes += int(success)
    env.close()
    return successes


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a success rate."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def run(config: BenchmarkConfig) -> dict[str, dict]:
    """Collect demos, train each variant, evaluate; returns per-variant loss history and success."""
    start = time.perf_counter()
    episodes, demo_successes = collect_demos(config)
    steps = sum(len(e.actions) for e in episodes)
    print(
        f"demos: {len(episodes)} episodes of {config.task}, {steps} steps, expert success {demo_successes}/"
        f"{len(episodes)} (noise {config.noise_std}), {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    results = {}
    for variant in config.variants:
        dataset = build_dataset(episodes, horizon=10)
        model_config = VLAConfig.preset(
            config.size,
            cameras=(config.camera,),
            image_size=config.image_size,
            state_dim=dataset.state.shape[1],
            action_dim=dataset.actions.shape[2],
            knowledge_insulation=variant == "ki",
        )
        policy = create_policy(model_config, dataset, seed=config.seed, fast_vocab_size=256)
        train_start = time.perf_counter()
        result = train_bc(
            policy,
            dataset,
            TrainConfig(steps=config.steps, batch_size=config.batch_size, seed=config.seed, log_every=50),
        )
        train_s = time.perf_counter() - train_start
        eval_start = time.perf_counter()
        successes = evaluate(policy, config) if config.eval_episodes else 0
        low, high = wilson_interval(successes, config.eval_episodes)
        results[variant] = {"history": result.history, "successes": successes, "train_s": train_s}
        curve = " ".join(
            f"{h['step']}:{h['flow_loss']:.3f}" for h in result.history[:: max(1, len(result.history) // 10)]
        )
        print(f"[{variant}] train {train_s:.0f} s; flow loss curve {curve}", flush=True)
        if variant == "ki":
            fast_curve = " ".join(
                f"{h['step']}:{h['fast_loss']:.3f}"
                for h in result.history[:: max(1, len(result.history) // 10)]
            )
            print(f"[{variant}] FAST next-token loss {fast_curve}", flush=True)
        print(
            f"[{variant}] success {successes}/{config.eval_episodes} = {successes / max(1, config.eval_episodes):.2f} "
            f"(95% CI {low:.2f}–{high:.2f}), eval {time.perf_counter() - eval_start:.0f} s",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchmarkConfig()
    parser.add_argument("--task", default=defaults.task)
    parser.add_argument("--demos", type=int, default=defaults.demos)
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--camera", default=defaults.camera)
    parser.add_argument("--size", default=defaults.size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    parser.add_argument("--execute-steps", type=int, default=defaults.execute_steps)
    parser.add_argument("--max-episode-steps", type=int, default=defaults.max_episode_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--variants", nargs="+", default=list(defaults.variants), choices=["plain", "ki"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = BenchmarkConfig(
        **{k: v for k, v in vars(args).items() if k != "threads"} | {"variants": tuple(args.variants)}
    )
    run(config)


if __name__ == "__main__":
    main()
