"""Evidence for one RECAP iteration: a mediocre VLA prior → collect with interventions → relabel → retrain.

Per task, in one SQLite store: ``--demos`` scripted demos (noisy expert) → a deliberately under-trained BC prior
(few demos / few steps, stated in the table) → ``--collect`` rollouts of the prior with the simulated human
(``envs.SimulatedHumanConfig``: takes over after ``no_progress_steps`` without progress) → one RECAP iteration
through ``experiments.recap_iteration.run_recap_iteration`` (2-fold cross-fitted relabel, retrain from the prior
checkpoint on all aggregated data conditioned on the advantage, evaluate conditioned on "Advantage: positive").
Ablations retrain from the same prior on exactly the same episodes with the same steps and seed: BC on all data,
filtered BC (successful episodes + intervention steps) and AWR (weights exp(A / τσ) from the same relabel). Every
arm is evaluated on the same ``--eval-episodes`` fresh seeds: success with a Wilson 95% interval, mean successful
episode length and successes per hour of robot time (10 Hz).

    python benchmarks/recap_iteration.py --tasks reach-v3 button-press-topdown-v3
    python benchmarks/recap_iteration.py --quick

Issue 20's scenarios, where failures live inside episodes (injected detours, late corrections; state or image
tier; every arm under one convergence rule), are in ``benchmarks/recap_scenarios.py``; ``--scenario`` runs them:

    python benchmarks/recap_iteration.py --scenario detours --tasks reach-v3 drawer-open-v3 --seed 0

There ``--train-seeds K`` trains every retrained arm K times on the same collected data and pools the
evaluations; ``recap_scenarios.py --combine`` clusters them by data seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from core.types import LEARNABLE_OUTCOMES
from envs import EnvSettings, SimulatedHumanConfig
from experiments.collection import collect_scripted_demos
from experiments.evaluation import EvalResult, evaluate, wilson_interval
from experiments.recap_iteration import RecapIterationConfig, run_recap_iteration
from experiments.training import BCConfig, load_training_episodes, train_vla
from recap import RelabelConfig, ValueConfig, awr_weights, filtered_bc_weights
from storage import EpisodeQuery, EpisodeRecord, ExperienceStore, RelabelRecord

EVAL_SEED = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "button-press-topdown-v3"])
    parser.add_argument("--demos", type=int, default=10, help="scripted demos per task for the prior")
    parser.add_argument("--noise", type=float, default=0.1, help="scripted demonstrator's action noise")
    parser.add_argument("--prior-steps", type=int, default=120, help="BC steps of the (mediocre) prior")
    parser.add_argument("--collect", type=int, default=40, help="rollouts of the prior with interventions")
    parser.add_argument("--retrain-steps", type=int, default=300, help="steps of every retrained arm")
    parser.add_argument("--no-progress-steps", type=int, default=30, help="simulated human's trigger")
    parser.add_argument("--takeover-steps", type=int, default=20)
    parser.add_argument("--value-steps", type=int, default=1500)
    parser.add_argument(
        "--value-inputs",
        choices=["state", "privileged", "state_privileged"],
        default="state",
        help="what the value model reads: the policy's proprio state or the simulator's privileged state",
    )
    parser.add_argument(
        "--cfg-betas",
        type=float,
        nargs="*",
        default=[],
        help="also evaluate the RECAP policy with classifier-free guidance at these β (eval-only arms)",
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--max-episode-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the table (.txt) and json here")
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="print the table pooled over earlier runs' .json outputs (e.g. one per seed) instead of running",
    )
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.demos, args.prior_steps, args.collect = ["reach-v3"], 3, 10, 4
        args.retrain_steps, args.value_steps, args.eval_episodes, args.image_size = 5, 30, 3, 48
        args.max_episode_steps, args.cfg_betas = 60, [2.0]
    return args


def arm_row(task: str, arm: str, result: EvalResult, prior: EvalResult, seconds: float) -> dict[str, Any]:
    """One table row as a json-able dict (deltas against the prior on the same seeds)."""
    ratio = result.successes_per_hour / prior.successes_per_hour if prior.successes_per_hour else math.inf
    return {
        "task": task,
        "arm": arm,
        **result.as_row(),
        "delta_points": 100 * (result.success_rate - prior.success_rate),
        "throughput_ratio": ratio,
        "train_seconds": seconds,
    }


def relabel_summary(record: RelabelRecord, task: str) -> dict[str, Any]:
    """The label-quality figures of ``task`` in ``record``."""
    stats = record.diagnostics["tasks"][task]
    keys = (
        "episodes", "successes", "failures", "steps", "intervention_steps", "p_positive_given_success",
        "p_positive_given_failure", "positive_gap", "positive_gap_bootstrapped", "value_return_correlation",
        "value_return_mae", "first_step_value_auc",
    )  # fmt: skip
    return {key: stats.get(key) for key in keys} | {"sanity_ok": record.diagnostics.get("sanity_ok")}


def run_task(task: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Demos → prior → RECAP iteration → ablations on the same data, for one task."""
    url = f"sqlite:///{workdir / f'{task}.db'}"
    settings = EnvSettings(image_size=args.image_size, max_episode_steps=args.max_episode_steps)
    env = settings.env(task, args.seed)
    demos = f"demos-{task}"
    started = time.perf_counter()
    collect_scripted_demos(env, url, demos, args.demos, args.noise, seed=args.seed)
    store = ExperienceStore(url)
    prior_config = BCConfig(env=settings, steps=args.prior_steps, seed=args.seed)
    prior = train_vla(
        store, EpisodeQuery(tasks=[task], run_ids=[demos]), prior_config, workdir, progress=False
    )
    print(f"[{task}] prior trained ({time.perf_counter() - started:.0f} s)", flush=True)
    retrain = BCConfig(
        env=settings,
        steps=args.retrain_steps,
        seed=args.seed,
        condition_dropout=0.3,
    )
    config = RecapIterationConfig(
        task=task,
        policy=str(prior.checkpoint),
        store_url=url,
        collect_episodes=args.collect,
        human=SimulatedHumanConfig(
            no_progress_steps=args.no_progress_steps, takeover_steps=args.takeover_steps, seed=args.seed
        ),
        relabel=RelabelConfig(value=ValueConfig(train_steps=args.value_steps, inputs=args.value_inputs)),
        bc=retrain,
        eval_episodes=args.eval_episodes,
        retrain_from=prior.checkpoint,
        seed=args.seed,
    )
    clock = time.perf_counter()
    iteration = run_recap_iteration(config, workdir, progress=False)
    recap_seconds = time.perf_counter() - clock
    assert iteration.before is not None and iteration.after is not None  # eval_episodes >= 1
    print(f"[{task}] RECAP iteration done ({time.perf_counter() - started:.0f} s)", flush=True)
    selection = EpisodeQuery(tasks=[task], outcomes=[o.value for o in LEARNABLE_OUTCOMES])
    episodes = load_training_episodes(store, selection, images=False)
    plain = retrain.model_copy(update={"condition_dropout": 0.0})
    arms: dict[str, Callable[[EpisodeRecord], np.ndarray | None] | None] = {
        "bc_all": None,
        "filtered_bc": _lookup(filtered_bc_weights(episodes)),
        "awr": _lookup(awr_weights(episodes, iteration.relabel)),
    }
    before = iteration.before
    rows = [
        arm_row(task, "prior", before, before, 0.0),
        arm_row(task, "recap", iteration.after, before, recap_seconds),
    ]
    for beta in args.cfg_betas:
        guided = copy.copy(iteration.trained.policy)
        guided.cfg_beta = beta
        result, _ = evaluate(guided, env, args.eval_episodes, seed=EVAL_SEED)
        rows.append(arm_row(task, f"recap β={beta:g}", result, before, 0.0))
        print(
            f"[{task}] recap with CFG β={beta:g} evaluated ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    for arm, weights in arms.items():
        clock = time.perf_counter()
        trained = train_vla(
            store, selection, plain, workdir, weights=weights, init_from=prior.checkpoint,
            parent_version=prior.version, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - clock
        result, _ = evaluate(trained.policy, env, args.eval_episodes, seed=EVAL_SEED)
        rows.append(arm_row(task, arm, result, before, seconds))
        print(f"[{task}] {arm} done ({time.perf_counter() - started:.0f} s)", flush=True)
    collection = iteration.collection
    return {
        "task": task,
        "rows": rows,
        "relabel": relabel_summary(iteration.relabel, task),
        "relabel_id": iteration.relabel.relabel_id,
        "data": {
            "demos": args.demos,
            "collected": collection.episodes,
            "collected_successes": collection.successes,
            "collected_steps": collection.env_steps,
            "human_steps": collection.human_steps,
            "episodes_total": len(episodes),
        },
        "wall_seconds": time.perf_counter() - started,
    }


def _lookup(weights: dict) -> Callable[[EpisodeRecord], np.ndarray]:
    return lambda episode: weights[episode.uuid]


def format_report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The printed table: one block per task plus its data and relabel diagnostics."""
    lines = [
        f"prior: tiny VLA, {args.demos} scripted demos (noise {args.noise}), {args.prior_steps} BC steps, "
        f"{args.image_size} px, camera corner2, {args.max_episode_steps}-step episodes; every arm retrains from the "
        f"prior for {args.retrain_steps} steps (batch 32) on the same demos + {args.collect} rollouts with the "
        f"simulated human (takes over for {args.takeover_steps} steps after {args.no_progress_steps} without "
        f"progress); value model reads the {args.value_inputs} state; 'recap β=b': the same RECAP policy "
        f"sampled with classifier-free guidance β=b; eval: {args.eval_episodes} episodes, seeds {EVAL_SEED}+, identical for every arm; "
        f"seed {args.seed}. 'train s': wall seconds of the arm's training (recap: the whole iteration incl. "
        "collection, relabel and both evaluations); succ/h: successes per hour of robot time at 10 Hz",
        "",
        f"{'task':<24} {'arm':<12} {'success':>8} {'rate':>5} {'95% CI':>13} {'Δ pts':>6} "
        f"{'succ len':>8} {'succ/h':>7} {'× prior':>7} {'train s':>7}",
    ]
    for result in results:
        for row in result["rows"]:
            low, high = row["ci95"]
            lines.append(
                f"{row['task']:<24} {row['arm']:<12} {row['successes']:>3}/{row['n']:<4} "
                f"{row['success_rate']:>5.2f} [{low:.2f}, {high:.2f}] {row['delta_points']:>+6.0f} "
                f"{row['mean_success_length']:>8.1f} {row['successes_per_hour']:>7.0f} "
                f"{row['throughput_ratio']:>7.2f} {row['train_seconds']:>7.0f}"
            )
        data, rel = result["data"], result["relabel"]
        lines.append(
            f"  data: {data['episodes_total']} episodes ({data['demos']} demos + {data['collected']} rollouts, "
            f"{data['collected_successes']} successful, {data['human_steps']}/{data['collected_steps']} "
            f"human steps); wall {result['wall_seconds'] / 60:.1f} min"
        )
        lines.append(
            "  relabel: P(pos|success) {} P(pos|failure) {} gap {} gap(bootstrapped) {} corr(V,G) {} "
            "AUC V(o0) {} sanity_ok {}".format(
                *(
                    _fmt(rel[k])
                    for k in (
                        "p_positive_given_success",
                        "p_positive_given_failure",
                        "positive_gap",
                        "positive_gap_bootstrapped",
                        "value_return_correlation",
                        "first_step_value_auc",
                    )
                ),
                rel["sanity_ok"],
            )
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def pooled_report(paths: list[Path]) -> str:
    """Per task and arm, pooled over runs (seeds): successes/n with a Wilson interval, mean Δ and × prior."""
    runs = [json.loads(path.read_text()) for path in paths]
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for result in run["results"]:
            for row in result["rows"]:
                cells.setdefault((row["task"], row["arm"]), []).append(row)
    seeds = sorted({run["settings"]["seed"] for run in runs})
    lines = [
        f"pooled over {len(runs)} runs (seeds {seeds}); runs: how many of them have the arm",
        f"{'task':<24} {'arm':<12} {'runs':>4} {'success':>9} {'rate':>5} {'95% CI':>13} {'Δ pts':>6} "
        f"{'× prior':>7}  per-run rates",
    ]
    for (task, arm), rows in cells.items():
        successes, n = sum(row["successes"] for row in rows), sum(row["n"] for row in rows)
        low, high = wilson_interval(successes, n)
        lines.append(
            f"{task:<24} {arm:<12} {len(rows):>4} {successes:>4}/{n:<4} {successes / n:>5.2f} "
            f"[{low:.2f}, {high:.2f}] {np.mean([r['delta_points'] for r in rows]):>+6.0f} "
            f"{np.mean([r['throughput_ratio'] for r in rows]):>7.2f}  "
            + " ".join(f"{row['success_rate']:.2f}" for row in rows)
        )
    return "\n".join(lines)


def main() -> None:
    if "--scenario" in sys.argv[1:]:  # issue 20's scenarios (their own options and arms)
        from recap_scenarios import main as scenario_main

        scenario_main(sys.argv[1:])
        return
    args = parse_args()
    if args.combine:
        print(pooled_report(args.combine))
        return
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-recap-"))
    results: list[dict[str, Any]] = []
    for task in args.tasks:
        results.append(run_task(task, args, workdir))
        report = format_report(results, args)
        if args.output is not None:  # after every task, so a long run keeps what it finished
            write_output(args, results, report)
    print(report)


def write_output(args: argparse.Namespace, results: list[dict[str, Any]], report: str) -> None:
    """The table as ``<output>.txt`` and settings + results as ``<output>.json``."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".txt").write_text(report + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "results": results}
    args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=float))


if __name__ == "__main__":
    main()
