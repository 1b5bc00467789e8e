"""``flywheel demo``: the whole loop on the embedded defaults, on a laptop-class CPU.

Scripted demos from a noisy expert → BC-train the built-in VLA (tiny) as a mediocre prior → one pipeline
iteration (collect with simulated interventions → cross-fitted value + advantage relabel → advantage-conditioned
retraining → evaluation of prior and candidate → gate → registry → deploy), then the baseline a user would try
first: filtered BC (the successful episodes and the human steps of the others) trained on the same data with the
candidate's budget and seed, evaluated on the same episodes, so the table shows RECAP next to it, not only
before/after. Every step is idempotent, so a rerun after an interruption continues where it stopped; the pipeline
part is the same runner ``flywheel iterate`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs import SimulatedHumanConfig
from experiments.collection import collect_scripted_demos
from experiments.evaluation import wilson_interval
from experiments.paths import checkpoints_dir, default_mlflow_uri, default_store_url
from experiments.pipeline import IterationState, Pipeline
from experiments.pipeline_config import (
    CollectionSettings,
    EnvSettings,
    EvaluationSettings,
    PipelineConfig,
    PriorConfig,
)
from experiments.stages import Figures, StageOutput, evaluate_version, training_selection
from experiments.training import BCConfig, load_training_episodes, train_vla
from recap import RelabelConfig, ValueConfig, filtered_bc_weights
from storage import EpisodeQuery, ExperienceStore

DEMO_RUN = "demo/scripted-demos"


@dataclass(frozen=True)
class DemoPlan:
    """Budgets of one demo variant."""

    name: str
    task: str
    demo_episodes: int
    demo_noise: float
    prior_steps: int
    collect_episodes: int
    value_steps: int
    policy_steps: int
    eval_episodes: int
    image_size: int
    max_episode_steps: int


FULL = DemoPlan("demo", "reach-v3", 40, 1.0, 1000, 60, 400, 1500, 50, 48, 60)
QUICK = DemoPlan("demo-quick", "reach-v3", 6, 1.0, 20, 6, 30, 20, 4, 48, 40)


def demo_config(plan: DemoPlan, prior_version: str, store_url: str, mlflow_uri: str) -> PipelineConfig:
    """The pipeline config the demo runs (prior = the BC-trained VLA, demos always in the training data)."""
    return PipelineConfig(
        name=plan.name,
        tasks=[plan.task],
        prior=PriorConfig(policy=prior_version),
        env=_env(plan),
        collection=CollectionSettings(episodes_per_task=plan.collect_episodes),
        interventions=SimulatedHumanConfig(no_progress_steps=10, takeover_steps=15),
        relabel=RelabelConfig(
            value=ValueConfig(inputs="privileged", hidden_dim=64, train_steps=plan.value_steps, eval_every=50)
        ),
        training=_bc(plan, plan.policy_steps, condition_dropout=0.3),
        evaluation=EvaluationSettings(episodes=plan.eval_episodes),
        store_url=store_url,
        mlflow_uri=mlflow_uri,
        data_runs=[f"{DEMO_RUN}/{plan.task}"],
    )


def _env(plan: DemoPlan) -> EnvSettings:
    return EnvSettings(image_size=plan.image_size, max_episode_steps=plan.max_episode_steps)


def _bc(plan: DemoPlan, steps: int, condition_dropout: float = 0.0) -> BCConfig:
    return BCConfig(env=_env(plan), steps=steps, batch_size=16, condition_dropout=condition_dropout)


def collect_demos(plan: DemoPlan, store_url: str, progress: bool) -> str:
    """Noisy scripted demonstrations (idempotent: the run is topped up to its target)."""
    run_id = f"{DEMO_RUN}/{plan.task}"
    env = _env(plan).env(plan.task, 0)
    collect_scripted_demos(env, store_url, run_id, plan.demo_episodes, plan.demo_noise, progress=progress)
    return run_id


def train_prior(plan: DemoPlan, store: ExperienceStore, demo_run: str, progress: bool) -> str:
    """BC-train the tiny VLA on the demos (reused if this plan's prior is already registered)."""
    folder = checkpoints_dir() / f"{plan.name}-prior"
    existing = store.policy_versions(uri_prefix=str(folder.resolve()))
    if existing:
        return existing[-1]["version"]
    folder.mkdir(parents=True, exist_ok=True)
    trained = train_vla(
        store,
        EpisodeQuery(tasks=[plan.task], run_ids=[demo_run]),
        _bc(plan, plan.prior_steps),
        folder,
        progress=progress,
    )
    return trained.version


def run_demo(quick: bool = False, progress: bool = True, on_step=None) -> tuple[Pipeline, IterationState]:
    """Run (or finish) the demo; returns the pipeline and its first iteration, whose outputs carry the filtered-BC
    baseline under ``"filtered_bc"`` (``{"version": …, <task>: figures}``)."""
    plan = QUICK if quick else FULL
    say = on_step or (lambda text: None)
    store_url, mlflow_uri = default_store_url(), default_mlflow_uri()
    store = ExperienceStore(store_url)
    store.upgrade()
    say(
        f"1/4 scripted demonstrations ({plan.demo_episodes} episodes of {plan.task}, noise {plan.demo_noise})"
    )
    demo_run = collect_demos(plan, store_url, progress)
    say(f"2/4 behaviour-cloning the built-in VLA prior ({plan.prior_steps} steps)")
    prior = train_prior(plan, store, demo_run, progress)
    say("3/4 one RECAP iteration: collect with interventions → relabel → retrain → evaluate → gate → deploy")
    pipeline = Pipeline(
        demo_config(plan, prior, store_url, mlflow_uri),
        progress=progress,
        on_stage=lambda i, s, o: say(f"    {s} done"),
    )
    states = pipeline.iterations()
    state = states[0] if states and states[0].finished else pipeline.run_iteration()
    say(
        "4/4 the baseline on the same data: filtered BC (successful episodes + human steps), same budget and seed"
    )
    state.outputs["filtered_bc"] = filtered_bc_baseline(pipeline, state, progress)
    return pipeline, state


class BaselineOutput(StageOutput):
    """The filtered-BC baseline's version and its per-task figures under the pipeline's protocol."""

    version: str
    figures: dict[str, Figures]


def filtered_bc_baseline(pipeline: Pipeline, state: IterationState, progress: bool) -> BaselineOutput:
    """Filtered BC trained like the iteration's candidate (same episodes, config, seed and fresh start; the
    successful episodes and the intervention steps of the others, unconditioned), evaluated with the pipeline's
    protocol (same episodes and seeds as the candidate); its figures go to the iteration's MLflow run as
    ``filtered_bc_*``. Reused when already trained and evaluated."""
    config, iteration = pipeline.config, state.iteration
    selection = training_selection(config.tasks, [*config.data_runs, *state.outputs["collect"].runs.values()])
    folder = pipeline.home / f"iter-{iteration:04d}" / "filtered-bc"
    existing = pipeline.store.policy_versions(uri_prefix=str(folder.resolve()))
    if existing:
        version = existing[-1]["version"]
    else:
        weights = filtered_bc_weights(load_training_episodes(pipeline.store, selection, images=False))
        folder.mkdir(parents=True, exist_ok=True)
        version = train_vla(
            pipeline.store,
            selection,
            config.training.model_copy(
                update={"eval_episodes": 0, "seed": config.seed + iteration, "condition_dropout": 0.0}
            ),
            folder,
            weights=lambda episode: weights[episode.uuid],
            parent_version=state.outputs["collect"].policy,
            progress=progress,
        ).version
    run_id = f"{pipeline.stage_id(iteration, 'evaluate')}/filtered-bc"
    figures, _ = evaluate_version(pipeline.store, pipeline.evaluation_protocol(), version, run_id)
    successes, n = sum(f["successes"] for f in figures.values()), sum(f["n"] for f in figures.values())
    low, high = wilson_interval(int(successes), int(n))
    run = pipeline.tracker.iteration_run(iteration, config.model_dump(mode="json"))
    pipeline.tracker.log_metrics(
        run,
        {
            "filtered_bc_success_rate": successes / max(n, 1),
            "filtered_bc_ci_low": low,
            "filtered_bc_ci_high": high,
            "filtered_bc_successes_per_hour": sum(f["successes_per_hour"] for f in figures.values())
            / len(figures),
            "filtered_bc_episode_length": sum(f["mean_length"] for f in figures.values()) / len(figures),
        },
        iteration,
    )
    pipeline.tracker.set_tags(run, {"filtered_bc": version})
    pipeline.tracker.finish(run)
    return BaselineOutput(version=version, figures=figures)


def comparison(state: IterationState) -> list[dict[str, Any]]:
    """Rows of the demo's table per task: the prior (deployed, before), the RECAP candidate (after) and filtered
    BC on the same data (when ``run_demo`` added it)."""
    evaluation = state.outputs["evaluate"]
    roles = [
        ("before (prior)", evaluation.versions["deployed"], evaluation.deployed),
        ("after (RECAP)", evaluation.versions["candidate"], evaluation.candidate),
    ]
    if "filtered_bc" in state.outputs:
        baseline = state.outputs["filtered_bc"]
        roles.append(("filtered BC, same data", baseline.version, baseline.figures))
    return [
        {"policy": label, "version": version, "task": task, **figures}
        for label, version, per_task in roles
        for task, figures in per_task.items()
    ]


def mlflow_hint(pipeline: Pipeline) -> str:
    """Where to look in MLflow."""
    return (
        f"MLflow: `flywheel dashboard` (tracking store {pipeline.config.mlflow_uri}) → experiment "
        f"'flywheel/{pipeline.config.name}' → run 'iteration-1' (metrics, plots/, videos/, nested stage runs); "
        f"Models → '{pipeline.tracker.model_name}' (alias 'deployed'). Deployed version file: {pipeline.deploy_file()}"
    )


def demo_home_note() -> Path:
    """The folder the demo writes to."""
    return checkpoints_dir().parent
