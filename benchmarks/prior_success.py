"""Evidence for the built-in VLA prior: success of a `tiny` model trained from the store on scripted demos.

For each task: collect ``--demos`` scripted demos (noisy expert) into one SQLite store, train the built-in VLA by
behaviour cloning through the same path as ``flywheel train bc``, and evaluate it on ``--eval-episodes`` fresh
seeds (success with a Wilson 95% interval, mean episode length, training wall and CPU time). The scripted expert
on the same evaluation seeds is the reference row of each task.

    python benchmarks/prior_success.py --tasks reach-v3 drawer-open-v3 button-press-topdown-v3 pick-place-v3
    python benchmarks/prior_success.py --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from envs import EnvConfig, EnvSettings
from envs.scripted import ScriptedPolicy
from experiments.collection import collect_scripted_demos
from experiments.evaluation import EvalResult, evaluate
from experiments.training import BCConfig, train_vla
from storage import EpisodeQuery, ExperienceStore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["reach-v3", "drawer-open-v3", "button-press-topdown-v3"]
    )
    parser.add_argument("--demos", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.1, help="scripted demonstrator's action noise")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--max-episode-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.demos, args.steps, args.eval_episodes, args.image_size = ["reach-v3"], 4, 20, 4, 48
    return args


def row(name: str, result: EvalResult, extra: str = "") -> str:
    return (
        f"{name:<28} {result.successes:>3}/{result.n:<3} {result.success_rate:>5.2f} "
        f"[{result.ci_low:.2f}, {result.ci_high:.2f}] {result.mean_length:>7.1f} {extra}"
    )


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-prior-"))
    url = f"sqlite:///{workdir / 'store.db'}"
    lines = []
    for task in args.tasks:
        env = EnvConfig(
            task=task, width=args.image_size, height=args.image_size, max_episode_steps=args.max_episode_steps
        )
        run_id = f"demos-{task}"
        collect_scripted_demos(env, url, run_id, args.demos, args.noise, seed=args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        config = BCConfig(env=EnvSettings(image_size=args.image_size), steps=args.steps, seed=args.seed)
        trained = train_vla(
            ExperienceStore(url), EpisodeQuery(tasks=[task], run_ids=[run_id]), config, workdir
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        prior, _ = evaluate(trained.policy, env, args.eval_episodes, seed=10_000 + args.seed)
        expert, _ = evaluate(
            ScriptedPolicy(task, noise_std=args.noise), env, args.eval_episodes, seed=10_000 + args.seed
        )
        lines.append(
            row(f"{task} VLA prior", prior, f"train {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU")
        )
        lines.append(row(f"{task} scripted expert", expert))
    print(
        f"\n{args.demos} demos/task (noise {args.noise}), {args.steps} steps, {args.image_size} px, tiny VLA"
    )
    print(f"{'policy':<28} {'succ':>7} {'rate':>5} {'95% CI':>13} {'length':>7}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
