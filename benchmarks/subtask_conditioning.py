"""Subtask prompts (Hi-Robot / π0.5): flat VLA vs hierarchical (high-level subtask model + subtask-conditioned VLA).

For each multi-stage task: collect scripted demos labelled with the expert's phases into one SQLite store, then
train on exactly those stored episodes, with the same VLA budget (steps, batch, seed):

- ``flat``: the built-in VLA on the task prompt (plain BC, as ``flywheel train bc``);
- ``hierarchical``: the VLA on task prompt + ``subtask: <phase>``, plus a small high-level ``SubtaskModel``
  (camera + state + prompt → phase; ``--subtask-steps`` extra steps of a ~48k-parameter model), as
  ``flywheel train bc --subtasks``;
- ``oracle`` (diagnostic, not a deployable policy): the hierarchical low level given the true expert phase
  from the simulator state, which separates high-level mistakes from what subtask conditioning can buy.

Each is evaluated on the same fresh seeds: success with a Wilson 95% interval, mean length, and where failures
end (the furthest expert phase reached and the phase at the last step; for the hierarchical policy the subtask it
named last and how often its named subtask equals the expert's phase, next to the same agreement on the training
demos).

    python benchmarks/subtask_conditioning.py --tasks pick-place-v3 push-v3 --demos 30 --steps 800 --eval-episodes 50
    python benchmarks/subtask_conditioning.py --quick      # a smoke run of a few minutes
    python benchmarks/subtask_conditioning.py --combine results/a.json results/b.json   # pool seeds
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from scipy import stats as scipy_stats

from envs import EnvConfig, EnvSettings
from envs.experts import ScriptedExpert
from envs.tasks import task_prompt
from experiments.collection import collect_scripted_demos
from experiments.context import SubtaskTrainConfig, phase_outcomes, subtask_prompt, train_hierarchical
from experiments.evaluation import EvalResult, evaluate, wilson_interval
from experiments.training import BCConfig, load_training_episodes, train_vla
from policies.base import ActionChunk, ObservationBatch, Policy
from policies.hierarchical import SubtaskModel, previous_subtasks
from storage import EpisodeQuery, ExperienceStore


class OracleSubtasks:
    """Diagnostic: the low level conditioned on the scripted expert's true phase (reads the simulator state)."""

    def __init__(self, low_level: Policy, task: str) -> None:
        self.low_level, self.expert = low_level, ScriptedExpert(task)
        self.action_horizon, self.action_dim = low_level.action_horizon, low_level.action_dim
        self.version = f"oracle-{low_level.version}"
        self.last_subtasks: list[str] = []

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """Condition each row on its expert phase."""
        self.last_subtasks = [self.expert.phase(row) for row in batch["privileged"]]
        return self.low_level.infer(batch, conditions=[subtask_prompt(s) for s in self.last_subtasks])

    def reset(self) -> None:
        """Reset the low level."""
        self.low_level.reset()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["pick-place-v3", "push-v3"])
    parser.add_argument("--demos", type=int, default=30, help="scripted demos per task")
    parser.add_argument("--noise", type=float, default=0.1, help="scripted demonstrator's action noise")
    parser.add_argument("--steps", type=int, default=800, help="VLA training steps (both variants)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--subtask-steps", type=int, default=500, help="high-level model training steps")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-episode-steps", type=int, default=150)
    parser.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the oracle diagnostic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="pool finished runs' JSON files (no training)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "subtask_conditioning.json",
        help="JSON summary (a .txt table is written next to it)",
    )
    args = parser.parse_args()
    if args.quick:
        args.demos, args.steps, args.subtask_steps, args.eval_episodes, args.max_episode_steps = (
            3,
            20,
            20,
            3,
            60,
        )
    return args


def run_task(args: argparse.Namespace, task: str, workdir: Path) -> dict[str, dict]:
    """Collect, train both variants, evaluate all on the same seeds; returns per-variant summaries."""
    env = EnvConfig(
        task=task, width=args.image_size, height=args.image_size, max_episode_steps=args.max_episode_steps
    )
    url = f"sqlite:///{workdir / 'store.db'}"
    started = time.perf_counter()
    demos = collect_scripted_demos(
        env, url, f"demos-{task}", args.demos, args.noise, seed=args.seed, subtask_labels=True
    )
    print(
        f"{task}: {demos.episodes} demos ({demos.successes} successful) in {time.perf_counter() - started:.0f} s"
    )
    store = ExperienceStore(url)
    selection = EpisodeQuery(tasks=[task], run_ids=[demos.run_id])
    config = BCConfig(
        env=EnvSettings(image_size=args.image_size),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out: dict[str, dict] = {}
    started = time.perf_counter()
    flat = train_vla(store, selection, config, workdir, progress=False)
    out["flat"] = {
        "train_seconds": time.perf_counter() - started,
        "final_loss": flat.train.history[-1]["loss"],
    }
    started = time.perf_counter()
    hier = train_hierarchical(
        store,
        selection,
        config,
        workdir,
        subtask=SubtaskTrainConfig(steps=args.subtask_steps),
        progress=False,
    )
    out["hierarchical"] = {
        "train_seconds": time.perf_counter() - started,
        "final_loss": hier.low_level.train.history[-1]["loss"],
        "final_subtask_loss": hier.subtask_losses[-1],
        "subtasks": list(hier.subtasks),
        "demo_accuracy": demo_accuracy(hier.policy.high_level, load_training_episodes(store, selection)),
    }
    policies = {"flat": flat.policy, "hierarchical": hier.policy}
    if args.oracle:
        policies["oracle"] = OracleSubtasks(hier.policy.low_level, task)
        out["oracle"] = {}
    for name, policy in policies.items():
        started = time.perf_counter()
        result, records = evaluate(policy, env, args.eval_episodes, seed=10_000 + args.seed)
        out[name].update(
            task=task,
            eval_seconds=time.perf_counter() - started,
            **result.as_metrics(),
            where=phase_outcomes(records, task),
        )
        print(f"  {row(name, result)}  failures: {out[name]['where']}")
    out["demos"] = {"episodes": demos.episodes, "successes": demos.successes, "noise": args.noise}
    return out


def demo_accuracy(model: SubtaskModel, records: list) -> float:
    """Fraction of the training demos' steps whose stored subtask the high level names (in-distribution: its
    recent-subtask input is the demo's own previous labels)."""
    hits = total = 0
    for record in records:
        batch = {
            "images": {model.camera: record.images[model.camera]},
            "state": record.states,
            "prompt": [task_prompt(record.task)] * record.length,
        }
        named = model.predict(batch, previous_subtasks(record.subtasks, model.history))
        hits += sum(p == s for p, s in zip(named, record.subtasks, strict=True))
        total += record.length
    return hits / max(total, 1)


def row(name: str, result: EvalResult | dict) -> str:
    """One table row: successes, rate, Wilson interval, mean length."""
    r = result.as_metrics() if isinstance(result, EvalResult) else result
    return (
        f"{name:<13} {int(r['successes']):>3}/{int(r['n']):<3} {r['success_rate']:>5.2f} "
        f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] {r['mean_length']:>7.1f}"
    )


def format_table(summary: dict[str, dict]) -> str:
    """Success table plus where the failures ended, per task and variant."""
    lines = [f"{'task':<15} {'variant':<13} {'succ':>7} {'rate':>5} {'95% CI':>13} {'length':>7}  failures"]
    for task, variants in summary.items():
        for name, result in variants.items():
            if name == "demos":
                continue
            where = result["where"]
            agreement = where["subtask_agreement"]
            extra = f"furthest {where['furthest_phase']} last {where['final_phase']}"
            if where["final_named_subtask"]:
                extra += f" named-last {where['final_named_subtask']}"
            if agreement is not None:
                extra += f" named=expert {agreement:.0%}"
            if "demo_accuracy" in result:
                extra += f" (on demos {result['demo_accuracy']:.0%})"
            lines.append(f"{task:<15} {row(name, result)}  {where['failures']}: {extra}")
    return "\n".join(lines)


def combine(paths: list[Path]) -> str:
    """Per-task, per-variant successes pooled over several runs (seeds), with a Wilson 95% interval."""
    pooled: dict[tuple[str, str], list[int]] = {}
    for path in paths:
        for task, variants in json.loads(path.read_text())["results"].items():
            for name, result in variants.items():
                if name != "demos":
                    counts = pooled.setdefault((task, name), [0, 0])
                    counts[0] += int(result["successes"])
                    counts[1] += int(result["n"])
    lines = [f"pooled over {len(paths)} runs: {', '.join(p.name for p in paths)}"]
    for (task, name), (successes, n) in pooled.items():
        low, high = wilson_interval(successes, n)
        line = f"{task:<15} {name:<13} {successes:>3}/{n:<4} {successes / n:.2f} [{low:.2f}, {high:.2f}]"
        if name != "flat" and (task, "flat") in pooled:
            flat_successes, flat_n = pooled[(task, "flat")]
            table = [[successes, n - successes], [flat_successes, flat_n - flat_successes]]
            line += f"  vs flat: Fisher exact p = {scipy_stats.fisher_exact(table).pvalue:.3f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.combine:
        print(combine(args.combine))
        return
    started = time.perf_counter()
    summary = {}
    for task in args.tasks:
        workdir = Path(tempfile.mkdtemp(prefix=f"flywheel-subtask-{task}-"))
        summary[task] = run_task(args, task, workdir)
    table = format_table(summary)
    wall = time.perf_counter() - started
    print(f"\n{table}\n\nwall time {wall / 60:.1f} min")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {
        "settings": settings,
        "eval_seed": 10_000 + args.seed,
        "wall_seconds": wall,
        "results": summary,
    }
    args.output.write_text(json.dumps(payload, indent=1))
    args.output.with_suffix(".txt").write_text(f"{settings}\n\n{table}\n\nwall time {wall / 60:.1f} min\n")


if __name__ == "__main__":
    main()
