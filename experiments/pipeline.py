"""The improvement pipeline: collect → relabel (train value) → train policy → evaluate → gate → register →
deploy, one iteration at a time, every stage recorded in the experience store and tracked in MLflow.
``method: rlt`` replaces collect/relabel/train with an online RLT stage around the deployed policy; ``both``
runs RLT around the RECAP candidate after RECAP's train stage (``stages_for``).

Resumability: a finished stage writes a stage record (a row of the store's ``runs`` table with id
``pipeline:<name>/iter-NNNN/<stage>`` and the stage's outputs as its config). A rerun skips finished stages and
redoes the interrupted one, which is itself idempotent: collection tops its run up to the target; a relabel,
a trained checkpoint or an evaluation that was written just before a kill is found again (by the stage id in
the relabel's config, the iteration's checkpoint folder, the evaluation's run id) instead of being redone; an
interrupted RLT stage continues from its last online episode (learner, replay and optimizers restored), its
episodes landing on the same derived ids (no duplicates).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.tasks import TASK_PROMPTS
from experiments.collection import CollectConfig, run_collection
from experiments.context import ExpertPhaseLabels
from experiments.evaluation import evaluate, wilson_interval
from experiments.gate import decide
from experiments.paths import check_writable_folder
from experiments.pipeline_artifacts import dump_json, write_iteration_artifacts
from experiments.pipeline_config import PipelineConfig, PipelineConfigError
from experiments.pipeline_rlt import RLTResult, RLTStage, load_rlt_result, run_rlt
from experiments.policy_loader import load, register, resolve
from experiments.tracking import PipelineTracker
from experiments.training import EpisodeFilter, load_training_episodes, train_vla
from policies.base import Policy
from policies.manifest import RLT_KIND, checkpoint_kind
from recap import POSITIVE_PROMPT, conditioned_episodes
from recap.relabel import cross_fit
from recap.value import ValueTrainer, train_value
from rlt.deployment import PriorSpec
from storage import EpisodeRecord, ExperienceStore, Outcome

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("collect", "relabel", "train", "evaluate", "gate", "register", "deploy", "report")
"""RECAP's stages (``method: recap``)."""
STAGE_RECORD = "pipeline-stage"
_CLOSING = ("evaluate", "gate", "register", "deploy", "report")


def stages_for(method: str) -> tuple[str, ...]:
    """The stages of an iteration: RECAP's; ``rlt`` = online RLT around the deployed policy then the gate;
    ``both`` = RECAP's collect/relabel/train, then RLT around the RECAP candidate, then the gate."""
    if method == "rlt":
        return ("rlt", *_CLOSING)
    if method == "both":
        return ("collect", "relabel", "train", "rlt", *_CLOSING)
    return STAGES


@dataclass
class IterationState:
    """What the stages of one iteration produced so far (each entry is that stage's record)."""

    iteration: int
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once the last stage is recorded."""
        return STAGES[-1] in self.outputs


class Pipeline:
    """Runs iterations of one ``PipelineConfig`` against its store and MLflow tracking store."""

    def __init__(
        self,
        config: PipelineConfig,
        progress: bool = True,
        on_stage: Callable[[int, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config.resolved()
        self.home = Path(self.config.checkpoints) / self.config.name
        check_writable_folder(self.home, "checkpoints folder")
        self.store = ExperienceStore(self.config.store_url)
        self.store.upgrade()
        self.tracker = PipelineTracker(self.config.mlflow_uri, self.config.name)
        self.progress = progress
        self.on_stage = on_stage or (lambda iteration, stage, output: None)
        self.prefix = f"pipeline:{self.config.name}/"
        self.home.mkdir(parents=True, exist_ok=True)
        self._prior_version: str | None = None
        self.stages = stages_for(self.config.method)

    # ---- state ----

    def stage_id(self, iteration: int, stage: str) -> str:
        """The store run id that records ``stage`` of ``iteration`` as finished."""
        return f"{self.prefix}iter-{iteration:04d}/{stage}"

    def iterations(self) -> list[IterationState]:
        """Every iteration with at least one finished stage, in order."""
        states: dict[int, IterationState] = {}
        for run in self.store.list_runs(prefix=self.prefix):
            if run["name"] != STAGE_RECORD:
                continue
            iteration = int(run["config"]["iteration"])
            states.setdefault(iteration, IterationState(iteration)).outputs[run["config"]["stage"]] = run[
                "config"
            ]["output"]
        order = {stage: index for index, stage in enumerate(self.stages)}
        for state in states.values():
            state.outputs = dict(
                sorted(state.outputs.items(), key=lambda item: order.get(item[0], len(order)))
            )
        return [states[key] for key in sorted(states)]

    def deployed_version(self) -> str:
        """The version the last finished iteration deployed, else the prior's."""
        for state in reversed(self.iterations()):
            if "deploy" in state.outputs:
                return state.outputs["deploy"]["deployed"]
        return self.prior_version()

    def finished_at(self, iteration: int) -> dt.datetime:
        """When ``iteration``'s last stage was recorded (UTC)."""
        [run] = [
            r
            for r in self.store.list_runs(prefix=self.stage_id(iteration, STAGES[-1]))
            if r["name"] == STAGE_RECORD
        ]
        moment = run["created_at"]
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

    def deploy_file(self) -> Path:
        """The file holding the deployed version (``flywheel serve --policy @FILE --db URL`` reads it)."""
        return self.home / "deployed"

    # ---- running ----

    def run_iteration(self) -> IterationState:
        """Finish the last unfinished iteration, or run a new one; returns its outputs."""
        states = self.iterations()
        state = states[-1] if states and not states[-1].finished else IterationState(len(states) + 1)
        if states and states[-1].finished:  # killed after its last stage committed: runs may still be open
            self.tracker.end_committed_runs(states[-1].iteration, states[-1].outputs, iteration_done=True)
        self.tracker.end_committed_runs(state.iteration, state.outputs)
        parent_run = self.tracker.iteration_run(state.iteration, self.config.model_dump(mode="json"))
        stage_functions = {
            "collect": self._collect,
            "relabel": self._relabel,
            "train": self._train,
            "rlt": self._rlt,
            "evaluate": self._evaluate,
            "gate": self._gate,
            "register": self._register,
            "deploy": self._deploy,
            "report": lambda state, _run: self._report(state, parent_run),
        }
        for stage in self.stages:
            if stage in state.outputs:
                continue
            stage_run = self.tracker.stage_run(parent_run, state.iteration, stage)
            try:
                output = stage_functions[stage](state, stage_run)
            except BaseException:
                self.tracker.finish(stage_run, failed=True)
                raise
            self._record(state, stage, output)
            self.tracker.finish(stage_run)
        self.tracker.finish(parent_run)
        return state

    def _record(self, state: IterationState, stage: str, output: dict[str, Any]) -> None:
        output = _finite(json.loads(dump_json(output)))
        self.store.register_run(
            self.stage_id(state.iteration, stage),
            name=STAGE_RECORD,
            config={"iteration": state.iteration, "stage": stage, "output": output},
        )
        state.outputs[stage] = output
        logger.info("iteration %d: %s done %s", state.iteration, stage, output)
        self.on_stage(state.iteration, stage, output)

    # ---- stages ----

    def _collect(self, state: IterationState, run_id: str) -> dict[str, Any]:
        deployed = self.deployed_version()
        spec, noise = self._spec_of(deployed)
        if self.config.collection.workers and self._kind(deployed) == RLT_KIND:
            raise PipelineConfigError(
                f"collection.workers: the deployed RLT policy {deployed!r} is collected in-process only; set 0"
            )
        runs, metrics = {}, {}
        for index, task in enumerate(self.config.tasks):
            collection_run = f"{self.stage_id(state.iteration, 'collect')}/{task}"
            seed = self.config.seed + 1000 * state.iteration + index
            report = run_collection(
                CollectConfig(
                    env=self.config.env.env(task, seed),
                    policy=spec,
                    noise=noise,
                    episodes=self.config.collection.episodes_per_task,
                    human=self.config.interventions,
                    inject=self.config.injection,
                    workers=self.config.collection.workers,
                    envs_per_worker=self.config.collection.envs_per_worker,
                    inference=self.config.collection.inference,
                    ray_address=self.config.ray_address,
                    store_url=self.config.store_url,
                    run_id=collection_run,
                    seed=seed,
                    record_images=self.config.collection.record_images,
                    metadata={"pipeline": self.config.name, "iteration": state.iteration},
                    device=self.config.collection.device,
                ),
                progress=self.progress,
                policy=self._load(deployed, task, seed),
            )
            runs[task] = collection_run
            summaries = self.store.list_episodes(run_id=collection_run)
            steps = sum(s.length for s in summaries)
            metrics |= {
                f"{task}/collect_success_rate": report.success_rate,
                f"{task}/intervention_rate": sum(s.human_steps for s in summaries) / max(steps, 1),
                f"{task}/collect_episode_length": steps / max(len(summaries), 1),
                f"{task}/collect_steps_per_second": report.env_steps / max(report.seconds, 1e-9),
            }
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        return {"policy": deployed, "runs": runs, "metrics": metrics}

    def _data_runs(self, iteration: int) -> list[str]:
        runs = list(self.config.data_runs)
        for state in self.iterations():
            if state.iteration <= iteration and "collect" in state.outputs:
                runs += list(state.outputs["collect"]["runs"].values())
        return runs

    def _selection(self, iteration: int) -> EpisodeFilter:
        return EpisodeFilter(tasks=self.config.tasks, run_ids=self._data_runs(iteration))

    def _value_trainer(self, state_dir: Path) -> ValueTrainer:
        """How the relabel stage fits its value models: here (resumable from ``state_dir`` after a kill), or on
        Ray Train with ``value.train_workers``."""
        if self.config.relabel.value.train_workers == 1:
            return functools.partial(train_value, state_dir=state_dir)
        from experiments.distributed import train_value_data_parallel

        return functools.partial(train_value_data_parallel, self.config.store_url)

    def _relabel(self, state: IterationState, run_id: str) -> dict[str, Any]:
        stage_id = self.stage_id(state.iteration, "relabel")
        existing = [
            r for r in self.store.list_relabels(method="recap") if r.config.get("pipeline_stage") == stage_id
        ]
        if existing:
            record, value_losses = existing[-1], []
        else:
            episodes = [
                _with_expert_phases(episode)
                for episode in load_training_episodes(self.store, self._selection(state.iteration))
                if episode.outcome != Outcome.ERROR
            ]
            state_dir = self.home / f"iter-{state.iteration:04d}" / "value-state"
            result = cross_fit(episodes, self.config.relabel, self._value_trainer(state_dir))
            record = result.record
            record.config["pipeline_stage"] = stage_id
            record.relabel_id = self.store.write_relabel(record)
            value_losses = [
                fold.model.training_loss for fold in result.folds if fold.model.training_loss is not None
            ]
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
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        self.tracker.set_tags(run_id, {"relabel_id": str(record.relabel_id)})
        return {
            "relabel_id": str(record.relabel_id),
            "sanity_ok": bool(record.diagnostics.get("sanity_ok", True)),
            "metrics": metrics,
        }

    def _train(self, state: IterationState, run_id: str) -> dict[str, Any]:
        output_dir = self.home / f"iter-{state.iteration:04d}"
        found = self._version_under(output_dir)
        if found is not None:
            return {"version": found["version"], "checkpoint": found["uri"], "metrics": {}}
        output_dir.mkdir(parents=True, exist_ok=True)
        selection = self._selection(state.iteration)
        record = self.store.load_relabel(state.outputs["relabel"]["relabel_id"])
        by_uuid = {
            item.episode.uuid: item.conditions
            for item in conditioned_episodes(load_training_episodes(self.store, selection), record)
        }
        trained = train_vla(
            self.store,
            selection,
            self.config.training.model_copy(
                update={"eval_episodes": 0, "seed": self.config.seed + state.iteration}
            ),
            output_dir,
            conditions=lambda episode: by_uuid.get(episode.uuid),
            inference_conditions=POSITIVE_PROMPT,
            cfg_beta=self.config.cfg_beta,
            parent_version=state.outputs["collect"]["policy"],
            progress=self.progress,
        )
        losses = [row["loss"] for row in trained.train.history]
        self.tracker.log_curve(run_id, "train_loss", losses)
        metrics = {"final_train_loss": losses[-1]} if losses else {}
        metrics["train_episodes"] = float(trained.episodes_used)
        metrics |= {
            f"conditioning/{key}": float(value)
            for key, value in (trained.conditioning or {}).items()
            if value is not None
        }
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        self.tracker.set_tags(
            run_id,
            {
                "device": trained.train.device,
                "train_workers": str(self.config.training.train_workers),
                "resumed_from_step": str(trained.train.resumed_from),
            },
        )
        return {
            "version": trained.version,
            "checkpoint": str(trained.checkpoint.resolve()),
            "metrics": metrics,
        }

    def _rlt(self, state: IterationState, run_id: str) -> dict[str, Any]:
        """Online RLT around the deployed policy (``rlt``) or the RECAP candidate (``both``)."""
        deployed = (
            state.outputs["collect"]["policy"] if "collect" in state.outputs else self.deployed_version()
        )
        prior = state.outputs["train"]["version"] if "train" in state.outputs else deployed
        folder = self.home / f"iter-{state.iteration:04d}" / "rlt"
        version = f"rlt:{self.config.name}/iter-{state.iteration:04d}"
        output = {
            "version": version,
            "checkpoint": str(folder.resolve()),
            "prior": prior,
            "deployed": deployed,
        }
        task, seed = self.config.tasks[0], self.config.seed + 1000 * state.iteration
        collected = [
            summary.uuid
            for run in state.outputs.get("collect", {}).get("runs", {}).values()
            for summary in self.store.list_episodes(run_id=run)
            if summary.outcome != Outcome.ERROR
        ]
        if checkpoint_kind(folder) == RLT_KIND:
            result = load_rlt_result(folder)
        else:
            settings, images = self.config.rlt, not self._scripted(prior)
            result = run_rlt(
                RLTStage(
                    self.store,
                    self._prior_spec(prior, seed),
                    lambda spec: self._load(spec, task, seed),
                    self.config.env.env(task, seed, render=settings.online.record_images or images),
                    settings,
                    version=version,
                    run_id=self.rlt_run(state.iteration),
                    folder=folder,
                    seed=seed,
                    records=(self.store.load_episode(episode, images=images) for episode in collected),
                    stored_episodes=len(collected),
                )
            )
        self._log_rl_history(run_id, result)
        metrics = {
            "rl_env_steps": float(result.manifest.env_steps),
            "rl_episodes": float(len(result.episode_stats)),
            "rl_warmup_stored_episodes": float(len(collected)),
        }
        if result.curve:
            metrics["rl_final_eval_success_rate"] = result.curve[-1].success_rate
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        curve = [[point.env_steps, point.success_rate] for point in result.curve]
        return output | {"metrics": metrics, "curve": curve}

    def _log_rl_history(self, run_id: str, result: RLTResult) -> None:
        """The RL curve (eval success per eval point) and per-episode training figures, at their env step."""
        for point in result.curve:
            self.tracker.log_metrics(run_id, {"rl_eval_success_rate": point.success_rate}, point.env_steps)
        for stats in result.episode_stats:
            if stats.mode != "eval":  # eval episodes are summarised by the curve
                figures = {
                    "rl_train_success": float(stats.success),
                    "rl_train_episode_length": float(stats.length),
                    **{f"rl_{key}": value for key, value in stats.losses.items()},
                }
                self.tracker.log_metrics(run_id, figures, stats.env_steps)

    def rlt_run(self, iteration: int) -> str:
        """The store run holding the episodes of ``iteration``'s RLT stage."""
        return f"{self.stage_id(iteration, 'rlt')}/{self.config.tasks[0]}"

    def _candidate_stage(self) -> str:
        return "train" if self.config.method == "recap" else "rlt"

    def _deployed_at(self, state: IterationState) -> str:
        """The version deployed when ``state``'s iteration started."""
        return (
            state.outputs["collect"]["policy"]
            if "collect" in state.outputs
            else state.outputs["rlt"]["deployed"]
        )

    def _evaluate(self, state: IterationState, run_id: str) -> dict[str, Any]:
        candidate = state.outputs[self._candidate_stage()]["version"]
        deployed = self._deployed_at(state)
        results = {
            "candidate": self._evaluations(
                candidate, f"{self.stage_id(state.iteration, 'evaluate')}/candidate"
            ),
            "deployed": self._evaluations(deployed, f"{self.prefix}baseline/{deployed}"),
        }
        metrics: dict[str, float] = {}
        for role, per_task in results.items():
            for task, figures in per_task.items():
                metrics |= {f"{role}/{task}/{key}": value for key, value in figures.items()}
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        return {"versions": {"candidate": candidate, "deployed": deployed}, **results}

    def _evaluations(self, version: str, eval_run: str) -> dict[str, dict[str, float]]:
        """Per-task evaluation figures of ``version`` (reused from the store when already recorded)."""
        done = {
            e.task: e.metrics
            for e in self.store.list_evaluations(policy_version=version)
            if e.run_id == eval_run
        }
        protocol = self.config.evaluation
        for task in self.config.tasks:
            if task in done:
                continue
            policy = self._load(version, task)
            env = self.config.env.env(task, protocol.seed)
            result, _ = evaluate(policy, env, protocol.episodes, seed=protocol.seed)
            metrics = result.as_metrics()  # the store keeps NaN (no successes → no mean length) as null
            self.store.write_evaluation(
                version, task, result.n, result.successes, metrics=metrics, run_id=eval_run
            )
            done[task] = metrics
        return {task: done[task] for task in self.config.tasks}

    def _gate(self, state: IterationState, run_id: str) -> dict[str, Any]:
        evaluation = state.outputs["evaluate"]

        def pooled(role: str) -> tuple[int, int]:
            figures = evaluation[role].values()
            return int(sum(f["successes"] for f in figures)), int(sum(f["n"] for f in figures))

        decision = decide(pooled("candidate"), pooled("deployed"), self.config.gate)
        self.tracker.log_metrics(
            run_id,
            {
                "promoted": float(decision.promote),
                "candidate_success_rate": decision.candidate_rate,
                "deployed_success_rate": decision.deployed_rate,
            },
            state.iteration,
        )
        self.tracker.set_tags(run_id, {"gate_reason": decision.reason})
        return decision.as_dict()

    def _register(self, state: IterationState, run_id: str) -> dict[str, Any]:
        train, gate = state.outputs[self._candidate_stage()], state.outputs["gate"]
        model_version = self.tracker.register(
            train["version"], train["checkpoint"], run_id, description=gate["reason"]
        )
        self.tracker.tag_version(
            model_version,
            {
                "gate": "promoted" if gate["promote"] else "rejected",
                "gate_reason": gate["reason"],
                "policy_kind": RLT_KIND if self._candidate_stage() == "rlt" else "vla",
            },
        )
        return {
            "model": self.tracker.model_name,
            "model_version": model_version,
            "store_version": train["version"],
        }

    def _deploy(self, state: IterationState, run_id: str) -> dict[str, Any]:
        promoted = state.outputs["gate"]["promote"]
        candidate = state.outputs[self._candidate_stage()]["version"]
        deployed = candidate if promoted else self._deployed_at(state)
        if promoted:
            self.tracker.set_deployed(state.outputs["register"]["model_version"])
        _write_atomically(self.deploy_file(), deployed + "\n")
        notified = self._notify_servers()
        self.tracker.set_tags(run_id, {"deployed": deployed})
        return {
            "deployed": deployed,
            "promoted": promoted,
            "deploy_file": str(self.deploy_file()),
            "notified": notified,
        }

    def _notify_servers(self) -> list[int]:
        """SIGHUP every ``flywheel serve`` whose pid is listed in ``deploy.pid_files`` so it reloads @FILE."""
        notified = []
        for pid_file in self.config.serve_pid_files:
            try:
                pid = int(Path(pid_file).read_text().strip())
                os.kill(pid, signal.SIGHUP)
                notified.append(pid)
            except (OSError, ValueError) as error:
                logger.warning("could not notify the server of %s: %s", pid_file, error)
        return notified

    # ---- summary ----

    def _report(self, state: IterationState, parent_run: str) -> dict[str, Any]:
        """Iteration-level metrics, tags and artifacts on the iteration run."""
        evaluation = state.outputs["evaluate"]
        metrics: dict[str, float] = {"promoted": float(state.outputs["gate"]["promote"])}
        for role in ("candidate", "deployed"):
            figures = list(evaluation[role].values())
            successes, n = sum(f["successes"] for f in figures), sum(f["n"] for f in figures)
            low, high = wilson_interval(int(successes), int(n))
            metrics |= {
                f"{role}_success_rate": successes / max(n, 1),
                f"{role}_ci_low": low,
                f"{role}_ci_high": high,
                f"{role}_successes_per_hour": sum(f["successes_per_hour"] for f in figures) / len(figures),
                f"{role}_episode_length": sum(f["mean_length"] for f in figures) / len(figures),
            }
        for stage in ("collect", "relabel", "train", "rlt"):
            metrics |= {
                k: v
                for k, v in state.outputs.get(stage, {}).get("metrics", {}).items()
                if isinstance(v, float | int)
            }
        self.tracker.log_metrics(parent_run, metrics, state.iteration)
        tags = {
            "candidate": state.outputs[self._candidate_stage()]["version"],
            "deployed": state.outputs["deploy"]["deployed"],
            "gate_reason": state.outputs["gate"]["reason"],
        }
        if "relabel" in state.outputs:
            tags["relabel_id"] = state.outputs["relabel"]["relabel_id"]
        self.tracker.set_tags(parent_run, tags)
        folder = self.home / f"iter-{state.iteration:04d}" / "artifacts"
        artifacts = []
        for path, artifact_folder in write_iteration_artifacts(self, state, folder):
            self.tracker.log_artifact(parent_run, path, artifact_folder)
            artifacts.append(f"{artifact_folder}/{path.name}" if artifact_folder else path.name)
        return {"metrics": metrics, "artifacts": artifacts}

    # ---- helpers ----

    def prior_version(self) -> str:
        """The store version of the configured prior (loaded and registered once)."""
        if self._prior_version is None:
            source = resolve(self.config.prior.policy, self.store, noise=self.config.prior.noise)
            policy = load(source, task=self.config.tasks[0], store=self.store, seed=self.config.seed)
            register(self.store, source, policy.version)
            self._prior_version = policy.version
        return self._prior_version

    def _spec_of(self, version: str) -> tuple[str, float]:
        """The spec (and scripted noise) a collection run records for a version: the prior's, else the version."""
        if version == self.prior_version():
            return self.config.prior.policy, self.config.prior.noise
        return version, 0.0

    def _scripted(self, version: str) -> bool:
        return version == self.prior_version() and self.config.prior.policy == "scripted"

    def _prior_spec(self, version: str, seed: int) -> PriorSpec:
        """What RLT acts around: the scripted prior rebuilt with chunks and embeddings, else a stored version."""
        noise = self.config.prior.noise if self._scripted(version) else None
        return PriorSpec(version, noise, seed)

    def _load(self, version: str, task: str, seed: int | None = None) -> Policy:
        """Load a registered version as it is served (``experiments.policy_loader.load``): a checkpoint carries
        its own inference conditions (RECAP's "Advantage: positive", CFG β); RLT is rebuilt around its prior."""
        seed = self.config.seed if seed is None else seed
        return load(version, task=task, store=self.store, seed=seed)

    def _kind(self, version: str) -> str | None:
        return (self.store.policy_version(version) or {}).get("kind")

    def _version_under(self, folder: Path) -> dict[str, Any] | None:
        rows = self.store.policy_versions(uri_prefix=str(folder.resolve()) + os.sep)
        return rows[-1] if rows else None


def _finite(data: Any) -> Any:
    """JSON data with NaN/inf replaced by None (PostgreSQL's JSON rejects them)."""
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_finite(value) for value in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _with_expert_phases(episode: EpisodeRecord) -> EpisodeRecord:
    """``episode`` labelled with the scripted expert's phases (in memory, for the relabel's P(positive) per
    phase) when it is a Meta-World episode with simulator state and no subtasks of its own."""
    if episode.subtasks is not None or episode.task not in TASK_PROMPTS:
        return episode
    return ExpertPhaseLabels(lambda record: record, episode.task)(episode)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
