"""RECAP where failures live inside episodes (issue 20): the ``detours`` and ``late-corrections`` scenarios of
``benchmarks/recap_iteration.py`` (run through it with ``--scenario``, or directly).

Per task and seed, one SQLite store: ``--demos`` scripted demos (noise ``--demo-noise``) → a prior pretrained
with the advantage text (every demo step "Advantage: positive", 30% dropout; queried positive) for
``--prior-steps`` steps (deliberately short) → ``--collect`` rollouts of the prior into the store:

- ``detours``: ``envs.BadSegmentWrapper`` injects detours away from the goal (``--inject-rate`` per step,
  ``--inject-length`` steps) with the simulated human watching (takes over after ``--no-progress-steps``
  without progress); the ground truth of every step lands in ``steps.injected``;
- ``late-corrections``: no injection; a phase-gated simulated human that only watches once the task's goal
  distance is ≤ ``--late-distance`` (``SimulatedHumanConfig.late_distance``), so corrected episodes keep their
  sloppy early autonomous stretches.

Then a 2-fold cross-fitted relabel (value on ``--value-inputs``, N from the horizon, windows stopping at a
change of step source) and every arm retrained **from the prior** on the same demos + rollouts, under one
convergence rule (20% of the episodes held out — the same ones for every arm —, held-out flow loss every
``--validate-every`` steps, ``--smoothing`` of the held-out loss, stop after ``--patience`` measurements
without improvement but not before ``--min-steps`` (default half the cap), best weights kept, at most
``--retrain-steps``): BC on all data, filtered BC (successful episodes + intervention steps), AWR,
advantage-filtered BC (the steps RECAP's labels mark positive, the rest dropped: the labels as a filter), RECAP
(explicit positive/negative text, 30% dropout), RECAP positive-only (negatives unconditioned), and where the
ground truth exists RECAP on the true labels (a step is positive unless injected) and filtered BC on the
truly good steps (every step not injected). Every arm is evaluated on the same ``--eval-episodes`` fresh
seeds: success within the time limit (Wilson 95% interval), successes per hour of robot time (10 Hz), mean
episode length. ``--train-seeds K`` trains every retrained arm K times on the same data (training seeds: the data
seed, then data seed + 1000·k; each changes the held-out episodes, batch order, flow noise and condition dropout)
and pools their evaluations: the arm's row sums the K evaluations, ``runs`` keeps each one;
``--train-seed-start k`` starts at the k-th training seed (more seeds for a data seed run before);
``--cfg-betas β…`` also samples each conditioned arm's weights with classifier-free guidance (rows ``<arm>_cfg<β>``,
the same trainings evaluated again). Label quality against the ground truth: P(positive | injected) vs P(positive | clean) over the
autonomous rollout steps and the AUC of the advantage for clean vs injected.

One JSON (+ txt) per (scenario, tier, task, seed) under ``--output-dir`` (``_train<K>`` appended for K > 1,
``_trains<k>-<k+K-1>`` from ``--train-seed-start k``),
written when the seed lands; ``--combine FILES`` pools them with the data seed as the cluster: per arm the mean of
the per-data-seed means with a t interval over data seeds, the same for the difference to filtered BC, and the SD
between training seeds of one data seed. The state tier (``--tier state``, default) trains the VLA without a camera.

    python benchmarks/recap_iteration.py --scenario detours --tasks reach-v3 --seed 0
    python benchmarks/recap_scenarios.py --combine benchmarks/results/recap_detours_state_reach-v3_seed*.json
"""

from __future__ import annotations

import argparse
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
from scipy import stats as scipy_stats

from envs import EnvConfig, EnvSettings, InjectionConfig, SimulatedHumanConfig
from experiments.collection import CollectConfig, collect_scripted_demos, run_collection
from experiments.evaluation import EvalResult, evaluate, wilson_interval
from experiments.stages import with_task_horizons
from experiments.training import BCConfig, TrainedPolicy, load_training_episodes, train_vla
from recap import (
    POSITIVE_PROMPT,
    AdvantageConfig,
    RelabelConfig,
    ValueConfig,
    advantage_filtered_weights,
    awr_weights,
    conditioned_episodes,
    cross_fit,
    filtered_bc_weights,
)
from recap.conditioning import condition_texts
from recap.diagnostics import auc
from storage import EpisodeQuery, EpisodeRecord, ExperienceStore, RelabelRecord, StepSource

EVAL_SEED = 10_000
SCENARIOS = ("detours", "late-corrections")
#: Episode limits (the time limit success is measured within) per task; others use the task default.
HORIZONS = {"reach-v3": 100, "drawer-open-v3": 150, "pick-place-v3": 150, "button-press-topdown-v3": 150}
ARMS = (
    "prior", "bc_all", "filtered_bc", "awr", "advantage_filtered_bc", "recap", "recap_positive_only",
    "recap_true_labels", "filtered_bc_true",
)  # fmt: skip

StepFn = Callable[[EpisodeRecord], Any]
#: The detours (rate per step, length) every file without ``-rate<r>`` / ``-len<n>`` in its name was collected with.
DEFAULT_INJECTION = (0.02, 15)
#: The retrain cap every file without ``-cap<N>`` in its name was run at.
DEFAULT_CAP = 1500
#: Training seed k of data seed s is s + TRAIN_SEED_STRIDE · k (k = 0 is the data seed: a one-seed run as before).
TRAIN_SEED_STRIDE = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario options (shared with ``recap_iteration.py --scenario``)."""
    parser.add_argument("--tier", choices=["state", "image"], default="state")
    parser.add_argument(
        "--state-parts",
        nargs="+",
        default=None,
        help="the policy state's parts of the Meta-World observation (envs.metaworld_env.STATE_PARTS; default hand "
        "gripper goal); the state tier of an object task needs the object, e.g. hand gripper object goal",
    )
    parser.add_argument("--demos", type=int, default=10)
    parser.add_argument("--demo-noise", type=float, default=0.1)
    parser.add_argument("--prior-steps", type=int, default=150)
    parser.add_argument("--collect", type=int, default=40)
    parser.add_argument(
        "--collector",
        choices=["prior", "scripted"],
        default="prior",
        help="who acts in the rollouts: the prior, or the scripted expert (noise --collect-noise; the regime of the "
        "issue's outside probe, where episodes mostly succeed and the bad steps are the injected ones)",
    )
    parser.add_argument("--collect-noise", type=float, default=0.1)
    parser.add_argument("--inject-rate", type=float, default=DEFAULT_INJECTION[0])
    parser.add_argument("--inject-length", type=int, default=DEFAULT_INJECTION[1])
    parser.add_argument("--no-progress-steps", type=int, default=30)
    parser.add_argument("--takeover-steps", type=int, default=20)
    parser.add_argument("--late-distance", type=float, default=0.1)
    parser.add_argument(
        "--release-grip",
        action="store_true",
        help="the human opens the gripper where the expert applies no grip (SimulatedHumanConfig.release_grip), "
        "so it can regrasp on pick tasks",
    )
    parser.add_argument(
        "--value-inputs", choices=["state", "privileged", "state_privileged"], default="privileged"
    )
    parser.add_argument("--value-steps", type=int, default=1500)
    parser.add_argument(
        "--n-step", type=int, default=None, help="N of the advantage (default: from the horizon)"
    )
    parser.add_argument("--demos-positive", action="store_true", help="force every demo step positive")
    parser.add_argument(
        "--retrain-steps", type=int, default=DEFAULT_CAP, help="cap of every retrained arm"
    )
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="no early stop before this step (default: half of --retrain-steps; 0 = the old rule, any step)",
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.5,
        help="the convergence rule compares an exponential moving average of the held-out loss (0 = the old rule)",
    )
    parser.add_argument(
        "--schedule-steps",
        type=int,
        default=None,
        help="span of the learning-rate schedule (default: --retrain-steps, so the rate at a step depends on the cap)",
    )
    parser.add_argument(
        "--ema-decay", type=float, default=0.0, help="keep an exponential moving average of the weights (0 = off)"
    )
    parser.add_argument(
        "--cfg-betas",
        type=float,
        nargs="*",
        default=[],
        help="also evaluate every conditioned arm's trained weights with classifier-free guidance at these β "
        "(eval-only rows <arm>_cfg<β>, paired with the arm's training runs)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--train-seeds",
        type=int,
        default=1,
        help="train every retrained arm this many times on the same data (different init/batch/held-out seeds) "
        "and pool their evaluations",
    )
    parser.add_argument(
        "--train-seed-start",
        type=int,
        default=0,
        help="index k of the first training seed (data seed + 1000·k): more training seeds for an earlier run's "
        "data seed, whose file --combine pools with this one",
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--max-episode-steps", type=int, default=None, help="default: per task (HORIZONS)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))


def quick(args: argparse.Namespace) -> None:
    """Tiny budgets for a smoke run (numbers meaningless)."""
    args.tasks, args.demos, args.prior_steps, args.collect = args.tasks[:1], 2, 5, 3
    args.retrain_steps, args.validate_every, args.patience, args.min_steps = 6, 3, 1, 0
    args.value_steps, args.eval_episodes, args.max_episode_steps = 30, 2, 40
    args.inject_rate = 0.1


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every task of ``args`` at ``args.seed``; each result is written when it lands."""
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-recap-scenario-"))
    results = []
    for task in args.tasks:
        result = run_task(task, args, workdir)
        path = write_result(args, result)
        print(format_result(result), flush=True)
        print(f"wrote {path}", flush=True)
        results.append(result)
    return results


def env_config(task: str, args: argparse.Namespace) -> EnvConfig:
    limit = args.max_episode_steps or HORIZONS.get(task)
    state = {"state_parts": tuple(args.state_parts)} if args.state_parts else {}
    if args.tier == "state":
        return EnvConfig(task=task, render=False, max_episode_steps=limit, **state)
    size = args.image_size
    cameras = ("corner2",)
    return EnvConfig(task=task, cameras=cameras, width=size, height=size, max_episode_steps=limit, **state)


def train_seeds(args: argparse.Namespace) -> list[int]:
    """The training seeds of every retrained arm (``--train-seeds`` of them, the data seed first)."""
    first = args.train_seed_start
    return [args.seed + TRAIN_SEED_STRIDE * k for k in range(first, first + args.train_seeds)]


def bc_config(args: argparse.Namespace, steps: int, seed: int | None = None, **overrides: Any) -> BCConfig:
    """The scenario's BC settings at ``seed`` (default: the data seed)."""
    cameras = () if args.tier == "state" else ("corner2",)
    return BCConfig(
        env=EnvSettings(cameras=cameras, image_size=args.image_size), steps=steps, batch_size=args.batch_size,
        seed=args.seed if seed is None else seed, checkpoint_every=0, **overrides,
    )  # fmt: skip


def collect_config(
    task: str, args: argparse.Namespace, env: EnvConfig, policy: str, url: str
) -> CollectConfig:
    """The scenario's rollouts of ``policy``: injected detours or a late (phase-gated) human."""
    human = SimulatedHumanConfig(
        no_progress_steps=args.no_progress_steps, takeover_steps=args.takeover_steps, seed=args.seed,
        late_distance=args.late_distance if args.scenario == "late-corrections" else None,
        release_grip=args.release_grip,
    )  # fmt: skip
    inject = None
    if args.scenario == "detours":
        inject = InjectionConfig(
            kinds=("detour",), rate=args.inject_rate, length=args.inject_length, seed=args.seed
        )
    if args.collector == "scripted":
        policy = "scripted"
    return CollectConfig(
        env=env, policy=policy, episodes=args.collect, human=human, inject=inject, store_url=url,
        run_id="rollouts", seed=args.seed, record_images=args.tier == "image",
        noise=args.collect_noise if args.collector == "scripted" else 0.0,
    )  # fmt: skip


def truth(episode: EpisodeRecord) -> np.ndarray:
    """Ground-truth good steps: not injected (demos and human steps are clean)."""
    injected = episode.injected or [None] * episode.length
    return np.array([kind is None for kind in injected])


def run_task(task: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Demos → advantage-text prior → scenario rollouts → relabel → every arm from the prior → evaluation."""
    started = time.perf_counter()
    url = f"sqlite:///{workdir / f'{task}-{args.scenario}-{args.seed}.db'}"
    env = env_config(task, args)
    collect_scripted_demos(env, url, "demos", args.demos, args.demo_noise, seed=args.seed)
    store = ExperienceStore(url)
    demo_selection = EpisodeQuery(tasks=[task], run_ids=["demos"])
    prior = train_vla(
        store, demo_selection, bc_config(args, args.prior_steps, condition_dropout=0.3), workdir,
        conditions=lambda ep: [POSITIVE_PROMPT] * ep.length, inference_conditions=POSITIVE_PROMPT,
        progress=False,
    )  # fmt: skip
    log(task, f"prior trained ({time.perf_counter() - started:.0f} s)")
    report = run_collection(collect_config(task, args, env, str(prior.checkpoint), url), progress=False)
    log(
        task,
        f"collected {report.episodes} rollouts, {report.successes} successful ({time.perf_counter() - started:.0f} s)",
    )
    selection = EpisodeQuery(tasks=[task], outcomes=["success", "failure", "truncated"])
    episodes = load_training_episodes(store, selection, images=False)
    advantage = AdvantageConfig(n_step=args.n_step, demonstrations_positive=args.demos_positive)
    relabel_config = RelabelConfig(
        value=ValueConfig(train_steps=args.value_steps, inputs=args.value_inputs, seed=args.seed),
        advantage=advantage,
    )
    clock = time.perf_counter()
    record = cross_fit(episodes, with_task_horizons(relabel_config, {task: env.episode_steps})).record
    relabel_seconds = time.perf_counter() - clock
    log(task, f"relabelled ({relabel_seconds:.0f} s)")
    arms = arm_specs(episodes, record, args)
    rows = [arm_row("prior", evaluate_arm(prior, env, args), 0.0)]
    log(task, f"prior: {rows[0]['success_rate']:.2f}")
    for arm, spec in arms.items():
        if arm not in args.arms:
            continue
        runs: dict[str, list[dict[str, Any]]] = {}
        for seed in train_seeds(args):
            for name, run in train_arm(arm, spec, seed, store, selection, prior, env, args, workdir).items():
                runs.setdefault(name, []).append(run)
                log(task, f"{name} (train seed {seed}): {run['success_rate']:.2f} (best step "
                    f"{run['best_step']}, {run['train_seconds']:.0f} s)")  # fmt: skip
        rows += [pool_runs(name, arm_runs) for name, arm_runs in runs.items()]
    return {
        "task": task,
        "scenario": args.scenario,
        "collector": args.collector,
        "tier": args.tier,
        "seed": args.seed,
        "train_seeds": train_seeds(args),
        "rows": rows,
        "labels": label_quality(episodes, record),
        "relabel": {k: record.diagnostics["tasks"][task].get(k) for k in RELABEL_KEYS}
        | {"windows": record.config.get("windows"), "relabel_seconds": relabel_seconds},
        "data": data_summary(episodes, report),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "combine"
        },
        "wall_seconds": time.perf_counter() - started,
    }


RELABEL_KEYS = (
    "p_positive_given_success",
    "p_positive_given_failure",
    "positive_gap",
    "value_return_correlation",
)


def train_arm(
    arm: str,
    spec: tuple[StepFn | None, StepFn | None, float],
    seed: int,
    store: ExperienceStore,
    selection: EpisodeQuery,
    prior: TrainedPolicy,
    env: EnvConfig,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    """One training of ``arm`` from the prior at training seed ``seed`` under the convergence rule, evaluated: the
    arm's run, and for a conditioned arm one more per ``--cfg-betas`` β (the same weights sampled with guidance)."""
    conditions, weights, dropout = spec
    clock = time.perf_counter()
    config = bc_config(
        args, args.retrain_steps, seed, condition_dropout=dropout, validation_fraction=0.2,
        validate_every=args.validate_every, patience=args.patience, min_steps=args.min_steps,
        smoothing=args.smoothing, schedule_steps=args.schedule_steps, ema_decay=args.ema_decay,
    )  # fmt: skip
    trained = train_vla(
        store, selection, config, workdir, conditions=conditions, weights=weights,
        init_from=prior.checkpoint, parent_version=prior.version, progress=False,
        inference_conditions=POSITIVE_PROMPT if conditions is not None else None,
    )  # fmt: skip
    seconds = time.perf_counter() - clock
    training = {
        "train_seed": seed,
        "best_step": trained.train.best_step,
        "stopped_at": trained.train.stopped_at,
        "heldout_curve": [
            [int(v["step"]), round(v["heldout_flow_loss"], 5)] for v in trained.train.validation
        ],
    }
    runs = {arm: arm_row(arm, evaluate_arm(trained, env, args), seconds) | training}
    for beta in args.cfg_betas if conditions is not None else ():
        trained.policy.cfg_beta = beta
        name = f"{arm}_cfg{beta:g}"
        runs[name] = arm_row(name, evaluate_arm(trained, env, args), seconds) | training
    return runs


def pool_runs(arm: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's row over its training runs (same eval seeds each): summed successes with a Wilson interval over
    all evaluation episodes, mean lengths and succ/h, summed training time; ``runs`` keeps every run's row."""
    successes, n = sum(r["successes"] for r in runs), sum(r["n"] for r in runs)
    low, high = wilson_interval(successes, n)
    success_lengths = [r["mean_success_length"] * r["successes"] for r in runs if r["successes"]]
    return {
        "arm": arm,
        "successes": successes,
        "n": n,
        "success_rate": successes / n if n else 0.0,
        "ci95": [low, high],
        "mean_length": float(np.mean([r["mean_length"] for r in runs])),
        "mean_success_length": sum(success_lengths) / successes if successes else math.nan,
        "successes_per_hour": float(np.mean([r["successes_per_hour"] for r in runs])),
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "best_step": runs[0]["best_step"] if len(runs) == 1 else None,
        "runs": runs,
    }


def arm_specs(
    episodes: list[EpisodeRecord], record: RelabelRecord, args: argparse.Namespace
) -> dict[str, tuple[StepFn | None, StepFn | None, float]]:
    """Per arm: (per-step conditions, per-step weights, condition dropout)."""
    explicit = {item.episode.uuid: item.conditions for item in conditioned_episodes(episodes, record)}
    positive_only = {
        item.episode.uuid: item.conditions
        for item in conditioned_episodes(episodes, record, scheme="positive_only")
    }
    filtered, awr = filtered_bc_weights(episodes), awr_weights(episodes, record)
    kept = advantage_filtered_weights(episodes, record)
    specs: dict[str, tuple[StepFn | None, StepFn | None, float]] = {
        "bc_all": (None, None, 0.0),
        "filtered_bc": (None, lambda ep: filtered[ep.uuid], 0.0),
        "awr": (None, lambda ep: awr[ep.uuid], 0.0),
        "advantage_filtered_bc": (None, lambda ep: kept[ep.uuid], 0.0),
        "recap": (lambda ep: explicit[ep.uuid], None, 0.3),
        "recap_positive_only": (lambda ep: positive_only[ep.uuid], None, 0.3),
    }
    if any(not truth(ep).all() for ep in episodes):  # ground truth exists: injected steps
        specs["recap_true_labels"] = (lambda ep: condition_texts(truth(ep)), None, 0.3)
        specs["filtered_bc_true"] = (None, lambda ep: truth(ep).astype(np.float32), 0.0)
    return specs


def evaluate_arm(trained: TrainedPolicy, env: EnvConfig, args: argparse.Namespace) -> EvalResult:
    result, _ = evaluate(trained.policy, env, args.eval_episodes, seed=EVAL_SEED)
    return result


def arm_row(arm: str, result: EvalResult, seconds: float) -> dict[str, Any]:
    return {"arm": arm, **result.as_row(), "train_seconds": seconds}


def label_quality(episodes: list[EpisodeRecord], record: RelabelRecord) -> dict[str, Any]:
    """RECAP's labels against the ground truth over the autonomous rollout steps (None without injections)."""
    labels = {item.episode_uuid: item for item in record.labels}
    good, positive, advantage = [], [], []
    for episode in episodes:
        autonomous = np.asarray(episode.sources) == StepSource.POLICY
        if episode.injected is None:
            continue
        good.append(truth(episode)[autonomous])
        positive.append(np.asarray(labels[episode.uuid].indicators, dtype=bool)[autonomous])
        advantage.append(np.asarray(labels[episode.uuid].advantages)[autonomous])
    if not good:
        return {"injected_steps": 0}
    clean, flags, values = np.concatenate(good), np.concatenate(positive), np.concatenate(advantage)
    return {
        "autonomous_steps": int(clean.size),
        "injected_steps": int((~clean).sum()),
        "p_positive_injected": float(flags[~clean].mean()) if (~clean).any() else None,
        "p_positive_clean": float(flags[clean].mean()) if clean.any() else None,
        "label_auc": auc(values, clean),
    }


def data_summary(episodes: list[EpisodeRecord], report: Any) -> dict[str, Any]:
    rollouts = [ep for ep in episodes if ep.run_id == "rollouts"]
    steps = sum(ep.length for ep in rollouts)
    injected = sum(int((~truth(ep)).sum()) for ep in rollouts)
    return {
        "episodes": len(episodes),
        "rollouts": len(rollouts),
        "rollout_successes": sum(ep.outcome.value == "success" for ep in rollouts),
        "rollout_steps": steps,
        "injected_steps": injected,
        "human_steps": int(sum(np.count_nonzero(ep.sources) for ep in rollouts)),
        "episodes_with_human": sum(bool(ep.interventions) for ep in rollouts),
        "interventions": sum(len(ep.interventions) for ep in rollouts),
        "episodes_with_injection": sum(not truth(ep).all() for ep in rollouts),
    }


def log(task: str, message: str) -> None:
    print(f"[{task}] {message}", flush=True)


def result_path(args: argparse.Namespace, task: str) -> Path:
    scenario = args.scenario + ("-expert" if args.collector == "scripted" else "")
    if args.scenario == "detours" and args.inject_rate != DEFAULT_INJECTION[0]:
        scenario += f"-rate{args.inject_rate:g}"
    if args.scenario == "detours" and args.inject_length != DEFAULT_INJECTION[1]:
        scenario += f"-len{args.inject_length}"
    first, count = args.train_seed_start, args.train_seeds
    train = f"_train{count}" if count > 1 else ""
    if first:
        train = f"_trains{first}-{first + count - 1}"
    return args.output_dir / f"recap_{scenario}{protocol_suffix(args)}_{args.tier}_{task}_seed{args.seed}{train}.json"


def protocol_suffix(args: argparse.Namespace) -> str:
    """The opt-in training protocol in a result's name, so runs under different protocols never share a file."""
    parts = []
    if args.retrain_steps != DEFAULT_CAP:
        parts.append(f"-cap{args.retrain_steps}")
    if args.schedule_steps:
        parts.append(f"-sched{args.schedule_steps}")
    if args.ema_decay:
        parts.append(f"-ema{args.ema_decay:g}")
    return "".join(parts)


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    path = result_path(args, result["task"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    path.with_suffix(".txt").write_text(format_result(result) + "\n")
    return path


def format_result(result: dict[str, Any]) -> str:
    """One seed's table: every arm with success, interval, Δ vs filtered BC, succ/h, mean length."""
    rows = {row["arm"]: row for row in result["rows"]}
    reference = rows.get("filtered_bc")
    lines = [
        f"{result['scenario']} / collector {result.get('collector', 'prior')} / {result['tier']} tier / "
        f"{result['task']} / seed {result['seed']}: success within "
        f"the time limit on {rows['prior']['n']} eval seeds ({EVAL_SEED}+, same for every arm); Δ fBC = points vs "
        "filtered BC; succ/h at 10 Hz; best = the step whose weights the convergence rule kept",
        f"{'arm':<20} {'success':>8} {'rate':>5} {'95% CI':>13} {'Δ fBC':>6} {'succ/h':>7} {'× fBC':>6} "
        f"{'mean len':>8} {'best':>5} {'train s':>7}",
    ]
    for arm, row in rows.items():
        low, high = row["ci95"]
        delta = 100 * (row["success_rate"] - reference["success_rate"]) if reference else math.nan
        ratio = (
            row["successes_per_hour"] / reference["successes_per_hour"]
            if reference and reference["successes_per_hour"]
            else math.nan
        )
        lines.append(
            f"{arm:<20} {row['successes']:>3}/{row['n']:<4} {row['success_rate']:>5.2f} [{low:.2f}, {high:.2f}] "
            f"{delta:>+6.0f} {row['successes_per_hour']:>7.0f} {ratio:>6.2f} {row['mean_length']:>8.1f} "
            f"{row.get('best_step') or '-':>5} {row['train_seconds']:>7.0f}"
        )
        if len(row.get("runs", [])) > 1:
            lines += [
                f"    train seed {run['train_seed']:<5} {run['successes']:>3}/{run['n']:<4} {run['success_rate']:>5.2f}"
                f" succ/h {run['successes_per_hour']:>4.0f} mean len {run['mean_length']:>5.1f} best {run['best_step']}"
                for run in row["runs"]
            ]
    data, labels, rel = result["data"], result["labels"], result["relabel"]
    lines.append(
        f"  data: {data['episodes']} episodes ({data['rollouts']} rollouts, {data['rollout_successes']} "
        f"successful; {data['injected_steps']}/{data['rollout_steps']} rollout steps injected in "
        f"{data['episodes_with_injection']} episodes; {data['human_steps']} human steps in "
        f"{data.get('interventions', '?')} takeovers over {data.get('episodes_with_human', '?')} episodes); wall "
        f"{result['wall_seconds'] / 60:.1f} min"
    )
    lines.append(
        f"  labels vs truth: P(pos|injected) {_fmt(labels.get('p_positive_injected'))} P(pos|clean) "
        f"{_fmt(labels.get('p_positive_clean'))} AUC {_fmt(labels.get('label_auc'))}; windows {rel['windows']}; "
        f"P(pos|success) {_fmt(rel['p_positive_given_success'])} P(pos|failure) {_fmt(rel['p_positive_given_failure'])}"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def pooled_report(paths: list[Path]) -> str:
    """Per (scenario, collector, tier, task, arm) pooled over data seeds and training seeds: successes/n (Wilson
    interval over all episodes), the mean of the per-data-seed means with a t interval over data seeds (the
    cluster), Δ vs filtered BC with its interval over data seeds, the SD between training seeds, succ/h."""
    cells: dict[tuple[str, ...], dict[str, dict[int, list[dict[str, Any]]]]] = {}
    labels: dict[tuple[str, ...], list[float]] = {}
    for result in (json.loads(path.read_text()) for path in paths):
        key = (result["scenario"], result.get("collector", "prior"), result["tier"], result["task"])
        for row in result["rows"]:
            runs = cells.setdefault(key, {}).setdefault(row["arm"], {}).setdefault(result["seed"], [])
            runs.extend(row.get("runs", [row]))
        if result["labels"].get("label_auc") is not None:
            labels.setdefault(key, []).append(result["labels"]["label_auc"])
    lines = []
    for key, arms in cells.items():
        seeds = sorted({seed for by_seed in arms.values() for seed in by_seed})
        reference = arms.get("filtered_bc", {})
        auc_text = ", ".join(f"{value:.2f}" for value in labels.get(key, [])) or "n/a"
        lines += [
            f"{' / '.join(key)}: pooled over data seeds {seeds}; label AUC per seed {auc_text}; mean [95% CI]: "
            "mean of the per-data-seed means, t interval over data seeds; SD train: between training seeds of "
            "one data seed (incl. evaluation noise); per seed: rate of each training run, / between runs",
            f"  {'arm':<20} {'seeds':>5} {'runs':>4} {'success':>9} {'Wilson 95%':>12} {'mean':>5} "
            f"{'95% CI':>14} {'Δ fBC':>6} {'Δ 95% CI':>16} {'SD train':>8} {'succ/h':>7} {'× fBC':>6} "
            f"{'mean len':>8}  per seed",
        ]
        for arm, by_seed in arms.items():
            lines.append("  " + _pooled_line(arm, by_seed, reference))
    return "\n".join(lines)


def cluster_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` (one per cluster) with a t interval; NaN bounds for fewer than 2."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = (
        scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
        * np.std(values, ddof=1)
        / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def between_training_sd(by_seed: dict[int, list[dict[str, Any]]]) -> float:
    """Root of the mean within-data-seed variance of the success rate over training runs (NaN without repeats)."""
    variances = [
        np.var([r["success_rate"] for r in runs], ddof=1) for runs in by_seed.values() if len(runs) > 1
    ]
    return float(math.sqrt(np.mean(variances))) if variances else math.nan


def _seed_means(by_seed: dict[int, list[dict[str, Any]]]) -> dict[int, float]:
    return {seed: float(np.mean([r["success_rate"] for r in runs])) for seed, runs in by_seed.items()}


def _pooled_line(
    arm: str,
    by_seed: dict[int, list[dict[str, Any]]],
    reference: dict[int, list[dict[str, Any]]],
) -> str:
    """One arm's pooled row; Δ and × fBC against filtered BC on the data seeds both have."""
    runs = [r for rs in by_seed.values() for r in rs]
    successes, n = sum(r["successes"] for r in runs), sum(r["n"] for r in runs)
    low, high = wilson_interval(successes, n)
    means, ref_means = _seed_means(by_seed), _seed_means(reference)
    mean, mean_low, mean_high = cluster_interval(list(means.values()))
    mean_low, mean_high = max(0.0, mean_low), min(1.0, mean_high)  # a rate; NaN stays NaN
    paired = [means[seed] - ref_means[seed] for seed in means if seed in ref_means]
    delta, delta_low, delta_high = cluster_interval(paired) if paired else (math.nan,) * 3
    per_hour = float(np.mean([r["successes_per_hour"] for r in runs]))
    shared = [r["successes_per_hour"] for seed, rs in reference.items() if seed in by_seed for r in rs]
    ref_hour = float(np.mean(shared)) if shared else math.nan
    per_seed = " ".join("/".join(f"{r['success_rate']:.2f}" for r in rs) for rs in by_seed.values())
    return (
        f"{arm:<20} {len(by_seed):>5} {len(runs):>4} {successes:>4}/{n:<4} [{low:.2f}, {high:.2f}] {mean:>5.2f} "
        f"[{mean_low:>5.2f}, {mean_high:>5.2f}] {100 * delta:>+6.0f} [{100 * delta_low:>+6.0f}, {100 * delta_high:>+6.0f}] "
        f"{between_training_sd(by_seed):>8.2f} {per_hour:>7.0f} {per_hour / ref_hour if ref_hour else math.nan:>6.2f} "
        f"{np.mean([r['mean_length'] for r in runs]):>8.1f}  {per_seed}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="detours")
    parser.add_argument("--tasks", nargs="+", default=["reach-v3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--combine", type=Path, nargs="+", default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.combine:
        print(pooled_report(args.combine))
        return
    if args.quick:
        quick(args)
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
