"""Episode-metadata prompts (π0.7) vs unconditioned BC vs filtered BC vs RECAP, on the same mixed-quality data.

Collects scripted demos at several noise levels into one store, then trains the built-in VLA four ways on exactly
those episodes and evaluates each on the same fresh seeds (success with a Wilson 95% interval, episode length):

- ``bc``: every episode, no condition;
- ``filtered``: successful episodes only;
- ``metadata``: every episode, prompt + "quality: …, speed: …, mistakes: …" (30% dropout); asked for
  "quality: high, speed: fast, mistakes: none" at evaluation;
- ``recap``: every episode, cross-fitted advantage labels as "Advantage: positive/negative" (30% dropout); asked
  for positive at evaluation.

    python benchmarks/metadata_conditioning.py --task push-v3 --episodes-per-noise 20 --steps 1500 --eval-episodes 50
    python benchmarks/metadata_conditioning.py --quick     # a smoke run of a few minutes

The table and the settings are written to ``--output`` (JSON) and next to it as ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from envs import EnvConfig, EnvSettings
from experiments.collection import collect_scripted_demos
from experiments.context import DESIRED_METADATA, metadata_conditions
from experiments.evaluation import EvalResult, evaluate
from experiments.stages import with_task_horizons
from experiments.training import BCConfig, load_training_episodes, train_vla
from recap import POSITIVE_PROMPT, RelabelConfig, ValueConfig, conditioned_episodes, relabel
from storage import EpisodeQuery, ExperienceStore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="push-v3")
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="demonstrator noise levels"
    )
    parser.add_argument("--episodes-per-noise", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1500, help="VLA training steps per variant")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-episode-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "metadata_conditioning.json",
        help="JSON summary (a .txt table is written next to it)",
    )
    args = parser.parse_args()
    if args.quick:
        args.episodes_per_noise, args.steps, args.eval_episodes, args.max_episode_steps = 3, 30, 5, 60
    return args


def collect(args: argparse.Namespace, env: EnvConfig, url: str) -> list[str]:
    """One run per noise level; returns the run ids."""
    runs = []
    for noise in args.noise:
        run_id = f"demos-noise{noise:g}"
        collect_scripted_demos(env, url, run_id, args.episodes_per_noise, noise, seed=args.seed)
        runs.append(run_id)
    return runs


def main() -> None:
    args = parse_args()
    env = EnvConfig(
        task=args.task,
        width=args.image_size,
        height=args.image_size,
        max_episode_steps=args.max_episode_steps,
    )
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-metadata-"))
    url = f"sqlite:///{workdir / 'store.db'}"
    runs = collect(args, env, url)
    store = ExperienceStore(url)
    selection = EpisodeQuery(tasks=[args.task], run_ids=runs)
    episodes = load_training_episodes(store, selection)
    successes = sum(e.outcome == "success" for e in episodes)
    print(f"data: {len(episodes)} episodes ({successes} successful) at noise {args.noise} on {args.task}")
    bc = BCConfig(env=EnvSettings(image_size=args.image_size), steps=args.steps, seed=args.seed)
    conditioned = bc.model_copy(update={"condition_dropout": 0.3})
    metadata = metadata_conditions(episodes)
    labels = relabel(
        episodes,
        with_task_horizons(
            RelabelConfig(value=ValueConfig(inputs="privileged")), {args.task: env.episode_steps}
        ),
    )
    recap_conditions = {item.episode.uuid: item.conditions for item in conditioned_episodes(episodes, labels)}
    variants = {
        "bc": (selection, bc, None, None),
        "filtered": (selection.model_copy(update={"outcomes": ["success"]}), bc, None, None),
        "metadata": (selection, conditioned, lambda e: metadata[e.uuid], DESIRED_METADATA),
        "recap": (selection, conditioned, lambda e: recap_conditions[e.uuid], POSITIVE_PROMPT),
    }
    results: dict[str, EvalResult] = {}
    for name, (chosen, config, conditions, ask) in variants.items():
        started = time.perf_counter()
        trained = train_vla(store, chosen, config, workdir, conditions=conditions, progress=False)
        trained.policy.conditions = ask
        results[name], _ = evaluate(trained.policy, env, args.eval_episodes, seed=10_000 + args.seed)
        print(
            f"trained {name}: {trained.episodes_used} episodes, final loss "
            f"{trained.train.history[-1]['loss']:.4f} ({time.perf_counter() - started:.0f} s train + eval)"
        )
    table = format_table(results)
    print(f"\n{table}\n(store and checkpoints in {workdir})")
    save(args, results, table, data=f"{len(episodes)} episodes ({successes} successful)")


def format_table(results: dict[str, EvalResult]) -> str:
    """The comparison as a fixed-width text table."""
    lines = [f"{'variant':<10} {'success':>8} {'95% CI':>15} {'mean length':>12} {'success length':>15}"]
    for name, result in results.items():
        lines.append(
            f"{name:<10} {result.successes:>3}/{result.n:<4} [{result.ci_low:.2f}, {result.ci_high:.2f}]"
            f" {result.mean_length:>12.1f} {result.mean_success_length:>15.1f}"
        )
    return "\n".join(lines)


def save(args: argparse.Namespace, results: dict[str, EvalResult], table: str, data: str) -> None:
    """Write the settings and results as JSON to ``args.output`` and the text table next to it."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "settings": settings,
        "data": data,
        "eval_seed": 10_000 + args.seed,
        "results": {name: {**r.as_metrics(), "task": r.task} for name, r in results.items()},
    }
    args.output.write_text(json.dumps(summary, indent=1))
    args.output.with_suffix(".txt").write_text(f"{settings}\ndata: {data}\n\n{table}\n")


if __name__ == "__main__":
    main()
