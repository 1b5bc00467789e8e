"""RECAP label quality against known-bad data: how well do cross-fitted advantage labels find injected bad steps?

One collection per run, no policy training: ``--episodes`` rollouts of the scripted expert with action noise
``--noise`` in which ``envs.BadSegmentWrapper`` injects bad segments (``--kinds``, started with probability
``--rate`` per step, ``--length`` steps; the ground truth lands in ``steps.injected``), optionally watched by a
late (phase-gated) simulated human (``--late-distance``) → ``recap.cross_fit`` with the value model of
``--value-inputs`` (2 folds, ``--value-steps``, N from the horizon unless ``--n-step``). Reported, from
``record.diagnostics`` (``recap.diagnostics``): label AUC (the advantage ranks clean autonomous steps above
injected ones), P(positive) on injected vs clean steps and per kind / expert phase, the sanity floor's verdict —
and the same figures for the baseline measured on the same episodes: labels from a constant value (the reward
sums alone), which the floor must fail.

    python benchmarks/label_quality.py --task reach-v3 --seed 0
    python benchmarks/label_quality.py --task pick-place-v3 --steps 150 --seed 0

One JSON per (task, kinds, value inputs, seed) under ``benchmarks/results/label_quality_*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from envs import EnvConfig, InjectionConfig, SimulatedHumanConfig
from experiments.collection import CollectConfig, run_collection
from recap import AdvantageConfig, RelabelConfig, RewardConfig, ValueConfig, cross_fit
from recap.diagnostics import label_diagnostics
from recap.relabel import score_episodes
from storage import ExperienceStore, Outcome

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = (
    "label_auc",
    "p_positive_injected",
    "p_positive_clean",
    "injected_fraction",
    "positive_gap",
    "value_episode_rank",
    "value_return_correlation",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100, help="episode time limit")
    parser.add_argument("--noise", type=float, default=0.3, help="action noise of the scripted expert")
    parser.add_argument("--kinds", default="detour", help="comma-separated: detour, random, pause")
    parser.add_argument("--rate", type=float, default=0.02)
    parser.add_argument("--length", type=int, default=15)
    parser.add_argument(
        "--late-distance", type=float, default=None, help="a late human watches this near the goal"
    )
    parser.add_argument(
        "--value-inputs", default="privileged", choices=["state", "privileged", "state_privileged"]
    )
    parser.add_argument("--value-steps", type=int, default=1500)
    parser.add_argument("--n-step", type=int, default=None, help="N (default: from the horizon)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args(argv)


def collect(args: argparse.Namespace, url: str) -> list:
    """The run's episodes (no images) with the injected ground truth and expert-phase subtasks."""
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    human = None
    if args.late_distance is not None:
        human = SimulatedHumanConfig(
            no_progress_steps=15, takeover_steps=20, late_distance=args.late_distance
        )
    config = CollectConfig(
        env=EnvConfig(task=args.task, render=False, max_episode_steps=args.steps),
        noise=args.noise,
        episodes=args.episodes,
        human=human,
        inject=InjectionConfig(kinds=kinds, rate=args.rate, length=args.length, seed=args.seed),
        store_url=url,
        run_id="label-quality",
        seed=args.seed,
        record_images=False,
        subtask_labels=True,
    )
    run_collection(config, progress=False)
    store = ExperienceStore(url)
    return [store.load_episode(s.uuid, images=False) for s in store.list_episodes(run_id="label-quality")]


def figures(diagnostics: dict) -> dict:
    pooled = diagnostics["all"]
    return {key: pooled.get(key) for key in FIGURES} | {
        "p_positive_by_kind": pooled.get("p_positive_by_kind"),
        "p_positive_by_phase": pooled.get("p_positive_by_phase"),
        "sanity_ok": diagnostics["sanity_ok"],
        "sanity_failures": diagnostics["sanity_failures"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        episodes = collect(args, f"sqlite:///{folder}/store.db")
    config = RelabelConfig(
        value=ValueConfig(
            inputs=args.value_inputs,
            train_steps=args.value_steps,
            reward=RewardConfig(max_episode_length=args.steps),
            device="cpu",
            seed=args.seed,
        ),
        advantage=AdvantageConfig(n_step=args.n_step),
        fold_seed=args.seed,
    )
    result = cross_fit(episodes, config)
    horizons = {args.task: args.steps}
    constant = float(np.concatenate([item.values for item in result.scores]).mean())
    baseline_scores, thresholds = score_episodes(
        episodes, [np.full(ep.length, constant) for ep in episodes], horizons, config
    )
    report = {
        "args": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
        },
        "episodes": len(episodes),
        "success_rate": float(np.mean([ep.outcome == Outcome.SUCCESS for ep in episodes])),
        "human_steps": int(sum(int(ep.sources.sum()) for ep in episodes)),
        "windows": result.record.config.get("windows"),
        "labels": figures(result.record.diagnostics),
        "constant_value_baseline": figures(label_diagnostics(baseline_scores, thresholds, config.sanity)),
        "seconds": time.perf_counter() - started,
    }
    print_report(report)
    output = args.output or RESULTS / (
        f"label_quality_{args.task}_{args.kinds.replace(',', '-')}_{args.value_inputs}_seed{args.seed}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(f"wrote {output}")
    return report


def print_report(report: dict) -> None:
    args = report["args"]
    print(
        f"{args['task']}: {report['episodes']} episodes of the scripted expert (noise {args['noise']}), "
        f"{args['kinds']} at {args['rate']}/step × {args['length']} steps; success {report['success_rate']:.2f}, "
        f"human steps {report['human_steps']}, windows {report['windows']}, value {args['value_inputs']}"
    )
    print(f"{'labels from':<24}" + "".join(f"{key:>26}" for key in FIGURES) + f"{'floor':>8}")
    for name, row in (
        ("cross-fitted value", report["labels"]),
        ("constant value", report["constant_value_baseline"]),
    ):
        cells = "".join(f"{'—' if row[key] is None else f'{row[key]:.3f}':>26}" for key in FIGURES)
        print(f"{name:<24}{cells}{'pass' if row['sanity_ok'] else 'FAIL':>8}")
    print(f"P(positive) by kind {report['labels']['p_positive_by_kind']}")
    phases = report["labels"]["p_positive_by_phase"] or {}
    print(
        "P(positive) by expert phase "
        + ", ".join(f"{k} {v['p_positive']:.2f} ({v['steps']})" for k, v in phases.items())
    )


if __name__ == "__main__":
    main()
