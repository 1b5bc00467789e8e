"""The stages of an improvement iteration as functions with typed inputs and outputs.

``collect`` → ``relabel`` → ``train`` → ``evaluate`` → ``gate`` take the store and a typed input and return a
typed output (:class:`StageOutput`, a frozen pydantic model); :class:`experiments.pipeline.Pipeline` runs them in
its stage machine (and adds ``rlt``, ``register``, ``deploy`` and ``report``, whose outputs are declared here too),
and ``flywheel recap iterate`` runs collect → relabel → train → evaluate → gate once
(:func:`experiments.recap_iteration.run_recap_iteration`). An output's JSON (``model_dump(mode="json")``) is the
stage record the pipeline persists for resume; :data:`OUTPUT_TYPES` reads it back.

An iteration's episodes are read from the store once (:func:`iteration_episodes`) and handed to relabel and
train.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.types import LEARNABLE_OUTCOMES
from envs import EnvConfig, GymEnvConfig
from envs.tasks import TASK_PROMPTS
from experiments.collection import CollectConfig, CollectReport, run_collection
from experiments.context import ExpertPhaseLabels
from experiments.evaluation import EvalResult
from experiments.evaluation import evaluate as run_evaluation
from experiments.gate import GateDecision, decide
from experiments.pipeline_config import GateSettings
from experiments.policy_loader import load
from experiments.training import BCConfig, TrainedPolicy, load_training_episodes, train_vla
from recap import POSITIVE_PROMPT, RelabelConfig, conditioned_episodes
from recap.config import Conditioning
from recap.relabel import cross_fit
from recap.value import ValueTrainer, train_value
from storage import EpisodeQuery, EpisodeRecord, ExperienceStore, RelabelRecord

logger = logging.getLogger(__name__)

#: Per-task evaluation figures (``EvalResult.as_metrics``; a NaN figure is persisted as null).
Figures = dict[str, float | None]


class StageOutput(BaseModel):
    """What a finished stage produced: its JSON is the stage record (fields marked ``exclude`` are in-memory
    extras for the driver that ran it, absent when read back)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class CollectOutput(StageOutput):
    """The version collected with and each task's collection run."""

    policy: str
    runs: dict[str, str]
    metrics: dict[str, float | None] = {}
    reports: dict[str, CollectReport] = Field(default_factory=dict, exclude=True)


class RelabelOutput(StageOutput):
    """The stored relabel (``sanity_ok``: its label-quality floor held)."""

    relabel_id: str
    sanity_ok: bool
    metrics: dict[str, float | None] = {}
    record: RelabelRecord | None = Field(default=None, exclude=True)


class TrainOutput(StageOutput):
    """The retrained, registered policy version and its checkpoint folder."""

    version: str
    checkpoint: str
    metrics: dict[str, float | None] = {}
    loss_curve: list[float] = Field(default_factory=list, exclude=True)
    tags: dict[str, str] = Field(default_factory=dict, exclude=True)
    trained: TrainedPolicy | None = Field(default=None, exclude=True)


class RLTOutput(StageOutput):
    """The RLT learner's version around ``prior`` (``deployed``: the version deployed when the stage started)."""

    version: str
    checkpoint: str
    prior: str
    deployed: str
    metrics: dict[str, float | None] = {}
    curve: list[list[float]] = []


class EvaluateOutput(StageOutput):
    """Per-task figures of the candidate and of the deployed version (``versions``: role → version)."""

    versions: dict[str, str]
    candidate: dict[str, Figures]
    deployed: dict[str, Figures]
    results: dict[str, dict[str, EvalResult]] = Field(default_factory=dict, exclude=True)

    def pooled(self, role: str) -> tuple[int, int]:
        """``(successes, n)`` of ``role`` over every task."""
        figures = getattr(self, role).values()
        return int(sum(f["successes"] or 0 for f in figures)), int(sum(f["n"] or 0 for f in figures))


class GateOutput(StageOutput, GateDecision):
    """The gate's decision (``experiments.gate.GateDecision``) as recorded."""


class RegisterOutput(StageOutput):
    """The MLflow model version the candidate was registered as."""

    model: str
    model_version: str
    store_version: str


class DeployOutput(StageOutput):
    """The version deployed after the gate and the ``flywheel serve`` processes told to reload it."""

    deployed: str
    promoted: bool
    deploy_file: str
    notified: list[int] = []


class ReportOutput(StageOutput):
    """The iteration-level metrics and the artifact files logged to MLflow."""

    metrics: dict[str, float | None] = {}
    artifacts: list[str] = []


OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    "collect": CollectOutput,
    "relabel": RelabelOutput,
    "train": TrainOutput,
    "rlt": RLTOutput,
    "evaluate": EvaluateOutput,
    "gate": GateOutput,
    "register": RegisterOutput,
    "deploy": DeployOutput,
    "report": ReportOutput,
}
"""The output type of each stage name (reads a persisted stage record back)."""


# ---- collect ----


@dataclass(frozen=True)
class CollectInput:
    """Collect with the registered ``policy``: one collection per task (its run id, seed and env in ``jobs``)."""

    policy: str
    jobs: dict[str, CollectConfig]


def collect(store: ExperienceStore, job: CollectInput, progress: bool = True) -> CollectOutput:
    """Run (or top up) every task's collection; every episode is committed to the store."""
    runs, metrics, reports = {}, {}, {}
    for task, config in job.jobs.items():
        policy = load(job.policy, task=task, store=store, seed=config.seed)
        report = run_collection(config, progress=progress, policy=policy)
        summaries = store.list_episodes(run_id=report.run_id)
        steps = sum(s.length for s in summaries)
        runs[task], reports[task] = report.run_id, report
        metrics |= {
            f"{task}/collect_success_rate": report.success_rate,
            f"{task}/intervention_rate": sum(s.human_steps for s in summaries) / max(steps, 1),
            f"{task}/collect_episode_length": steps / max(len(summaries), 1),
            f"{task}/collect_steps_per_second": report.env_steps / max(report.seconds, 1e-9),
        }
    return CollectOutput(policy=job.policy, runs=runs, metrics=metrics, reports=reports)


# ---- the iteration's episodes ----


def training_selection(tasks: list[str], runs: list[str] | None) -> EpisodeQuery:
    """The episodes an iteration learns from: the learnable outcomes of ``tasks`` in ``runs`` (None: every run)."""
    return EpisodeQuery(tasks=tasks, run_ids=runs, outcomes=LEARNABLE_OUTCOMES)


def iteration_episodes(
    store: ExperienceStore, selection: EpisodeQuery, relabel: RelabelConfig, training: BCConfig
) -> list[EpisodeRecord]:
    """The iteration's episodes, read once for relabel and train: with images when the value model or π (trained
    in this process) reads a camera."""
    cameras = training.env.camera_names(selection.tasks[0]) if selection.tasks else ()
    images = relabel.value.camera is not None or (bool(cameras) and training.train_workers == 1)
    return load_training_episodes(store, selection, images=images)


# ---- relabel ----


@dataclass(frozen=True)
class RelabelInput:
    """Cross-fit value models on ``episodes`` and label them; ``horizons`` are the tasks' episode limits (the
    return horizon unless ``config`` sets one); ``extra`` is added to the stored relabel's config."""

    episodes: list[EpisodeRecord]
    config: RelabelConfig
    horizons: Mapping[str, int] = field(default_factory=dict)
    trainer: ValueTrainer = train_value
    extra: Mapping[str, Any] = field(default_factory=dict)


def relabel(store: ExperienceStore, job: RelabelInput) -> RelabelOutput:
    """Cross-fitted RECAP relabel of the iteration's episodes (each labelled by a value model that never saw
    it), stored as a new relabel version."""
    episodes = [_with_expert_phases(episode) for episode in job.episodes]
    result = cross_fit(episodes, with_task_horizons(job.config, job.horizons), job.trainer)
    record = result.record
    record.config |= dict(job.extra)
    record.relabel_id = store.write_relabel(record)
    if not record.diagnostics.get("sanity_ok", True):
        logger.warning(
            "relabel %s failed its sanity floor: %s",
            record.relabel_id,
            record.diagnostics.get("sanity_failures"),
        )
    losses = [fold.model.training_loss for fold in result.folds if fold.model.training_loss is not None]
    return relabel_output(record, losses)


def relabel_output(record: RelabelRecord, value_losses: list[float]) -> RelabelOutput:
    """The output of a stored relabel (``value_losses``: its folds' final value losses, if known)."""
    indicators = [bool(x) for labels in record.labels for x in labels.indicators]
    pooled = record.diagnostics.get("all", {})
    metrics = {
        "advantage_positive_fraction": sum(indicators) / max(len(indicators), 1),
        "relabel_episodes": float(len(record.labels)),
        **{f"diag/{k}": v for k, v in pooled.items() if isinstance(v, int | float)},
        **{f"diag/p_positive_kind/{k}": v for k, v in (pooled.get("p_positive_by_kind") or {}).items()},
        **{
            f"diag/p_positive_phase/{phase}": figures["p_positive"]
            for phase, figures in (pooled.get("p_positive_by_phase") or {}).items()
            if figures["p_positive"] is not None
        },
    }
    if value_losses:
        metrics["value_loss"] = sum(value_losses) / len(value_losses)
    return RelabelOutput(
        relabel_id=str(record.relabel_id),
        sanity_ok=bool(record.diagnostics.get("sanity_ok", True)),
        metrics=metrics,
        record=record,
    )


def with_task_horizons(config: RelabelConfig, horizons: Mapping[str, int]) -> RelabelConfig:
    """The relabel config with each task's episode limit as its return horizon (unless one is configured; a task
    whose env declares no limit, 0, gets the longest stored episode)."""
    reward = config.value.reward
    limits = {task: horizon for task, horizon in horizons.items() if horizon}
    if reward.max_episode_length is not None or not limits:
        return config
    value = config.value.model_copy(
        update={"reward": reward.model_copy(update={"max_episode_length": limits})}
    )
    return config.model_copy(update={"value": value})


def _with_expert_phases(episode: EpisodeRecord) -> EpisodeRecord:
    """``episode`` labelled with the scripted expert's phases (in memory, for the relabel's P(positive) per
    phase) when it is a Meta-World episode with simulator state and no subtasks of its own."""
    if episode.subtasks is not None or episode.task not in TASK_PROMPTS:
        return episode
    return ExpertPhaseLabels(lambda record: record, episode.task)(episode)


# ---- train ----


@dataclass(frozen=True)
class TrainInput:
    """Retrain π on ``episodes`` (the iteration's, selected by ``selection``) conditioned on relabel
    ``record`` ("Advantage: positive/negative" per step, per ``conditioning``), from ``init_from`` if given."""

    episodes: list[EpisodeRecord]
    selection: EpisodeQuery
    record: RelabelRecord
    config: BCConfig
    output_dir: Path
    parent_version: str
    cfg_beta: float = 1.0
    conditioning: Conditioning = "explicit"
    init_from: Path | None = None


def train(store: ExperienceStore, job: TrainInput, progress: bool = True) -> TrainOutput:
    """Advantage-conditioned retraining; the policy answers "Advantage: positive" (with CFG β) once deployed."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    by_uuid = {
        item.episode.uuid: item.conditions
        for item in conditioned_episodes(job.episodes, job.record, job.conditioning)
    }
    trained = train_vla(
        store,
        job.selection,
        job.config,
        job.output_dir,
        records=job.episodes,
        conditions=lambda episode: by_uuid[episode.uuid],
        init_from=job.init_from,
        inference_conditions=POSITIVE_PROMPT,
        cfg_beta=job.cfg_beta,
        parent_version=job.parent_version,
        progress=progress,
    )
    losses = [row["loss"] for row in trained.train.history]
    metrics = {"final_train_loss": losses[-1]} if losses else {}
    metrics["train_episodes"] = float(trained.episodes_used)
    metrics |= {
        f"conditioning/{key}": float(value)
        for key, value in (trained.conditioning or {}).items()
        if value is not None
    }
    tags = {
        "device": trained.train.device,
        "train_workers": str(job.config.train_workers),
        "resumed_from_step": str(trained.train.resumed_from),
    }
    return TrainOutput(
        version=trained.version,
        checkpoint=str(trained.checkpoint.resolve()),
        metrics=metrics,
        loss_curve=losses,
        tags=tags,
        trained=trained,
    )


# ---- evaluate and gate ----


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a version is evaluated: ``episodes`` fresh episodes from ``seed`` in every task's env (``envs``), the
    policy loaded with ``policy_seed``."""

    envs: dict[str, EnvConfig | GymEnvConfig]
    episodes: int
    seed: int
    policy_seed: int = 0


@dataclass(frozen=True)
class EvaluateInput:
    """Evaluate each role's version (``versions``: role → version, roles ``candidate`` and ``deployed``) under
    ``protocol``; ``runs`` names each role's evaluation run in the store."""

    protocol: EvaluationProtocol
    versions: dict[str, str]
    runs: dict[str, str]


def evaluate(store: ExperienceStore, job: EvaluateInput) -> EvaluateOutput:
    """The candidate's and the deployed version's success, interval, lengths and throughput per task."""
    figures, results = {}, {}
    for role, version in job.versions.items():
        figures[role], results[role] = evaluate_version(store, job.protocol, version, job.runs[role])
    return EvaluateOutput(versions=job.versions, results=results, **figures)


def evaluate_version(
    store: ExperienceStore, protocol: EvaluationProtocol, version: str, eval_run: str
) -> tuple[dict[str, Figures], dict[str, EvalResult]]:
    """Per-task figures of ``version`` (reused from the store when already recorded under ``eval_run``) and the
    results of the tasks evaluated now."""
    done: dict[str, Figures] = {
        e.task: e.metrics for e in store.list_evaluations(policy_version=version) if e.run_id == eval_run
    }
    results = {}
    for task, env in protocol.envs.items():
        if task in done:
            continue
        policy = load(version, task=task, store=store, seed=protocol.policy_seed)
        result, _ = run_evaluation(policy, env, protocol.episodes, seed=protocol.seed)
        results[task] = result
        done[task] = result.as_metrics()  # the store keeps NaN (no successes → no mean length) as null
        store.write_evaluation(version, task, result.n, result.successes, metrics=done[task], run_id=eval_run)
    return {task: done[task] for task in protocol.envs}, results


def gate(evaluation: EvaluateOutput, settings: GateSettings) -> GateOutput:
    """Whether the candidate replaces the deployed version (pooled over tasks, ``settings.rule``)."""
    decision = decide(evaluation.pooled("candidate"), evaluation.pooled("deployed"), settings)
    return GateOutput(**dict(decision))
