"""The improvement pipeline: collect → relabel (train value) → train policy → evaluate → gate → register →
deploy, one iteration at a time, every stage recorded in the experience store and tracked in MLflow.
``method: rlt`` replaces collect/relabel/train with an online RLT stage around the deployed policy; ``both``
runs RLT around the RECAP candidate after RECAP's train stage (``stages_for``).

What each stage does is in :mod:`experiments.stages` (functions with typed inputs and outputs); ``Pipeline`` is
the stage machine around them: it builds each stage's input from the config and the iteration so far, reads the
iteration's episodes once for relabel and train, records each output, and owns MLflow runs, the deploy file and
SIGHUP.

Resumability: a finished stage writes a stage record (a row of the store's ``runs`` table with id
``pipeline:<name>/iter-NNNN/<stage>`` and the JSON of the stage's output as its config). A rerun skips finished
stages and redoes the interrupted one, which is itself idempotent: collection tops its run up to the target; a
relabel, a trained checkpoint or an evaluation that was written just before a kill is found again (by the stage
id in the relabel's config, the iteration's checkpoint folder, the evaluation's run id) instead of being redone;
an interrupted RLT stage continues from its last online episode (learner, replay and optimizers restored), its
episodes landing on the same derived ids (no duplicates).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import stages
from experiments.collection import CollectConfig
from experiments.evaluation import wilson_interval
from experiments.paths import check_writable_folder
from experiments.pipeline_artifacts import write_iteration_artifacts
from experiments.pipeline_config import PipelineConfig, PipelineConfigError
from experiments.pipeline_rlt import RLTResult, RLTStage, load_rlt_result, run_rlt
from experiments.policy_loader import load, register, resolve
from experiments.stages import (
    OUTPUT_TYPES,
    CollectOutput,
    DeployOutput,
    EvaluateOutput,
    GateOutput,
    RegisterOutput,
    RelabelOutput,
    ReportOutput,
    RLTOutput,
    StageOutput,
    TrainOutput,
)
from experiments.tracking import PipelineTracker
from policies.base import Policy
from policies.manifest import RLT_KIND, checkpoint_kind
from recap.value import ValueTrainer, train_value
from rlt.deployment import PriorSpec
from storage import EpisodeQuery, EpisodeRecord, ExperienceStore, Outcome

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
    """What the stages of one iteration produced so far (each entry is that stage's typed output)."""

    iteration: int
    outputs: dict[str, StageOutput] = field(default_factory=dict)

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
        on_stage: Callable[[int, str, StageOutput], None] | None = None,
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
        self._episodes: tuple[int, list[EpisodeRecord]] | None = None  # the iteration's, read once

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
            iteration, stage = int(run["config"]["iteration"]), run["config"]["stage"]
            output = OUTPUT_TYPES[stage].model_validate(run["config"]["output"])
            states.setdefault(iteration, IterationState(iteration)).outputs[stage] = output
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
                return state.outputs["deploy"].deployed
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

    def _record(self, state: IterationState, stage: str, output: StageOutput) -> None:
        record = _finite(output.model_dump(mode="json"))
        self.store.register_run(
            self.stage_id(state.iteration, stage),
            name=STAGE_RECORD,
            config={"iteration": state.iteration, "stage": stage, "output": record},
        )
        state.outputs[stage] = output
        logger.info("iteration %d: %s done %s", state.iteration, stage, record)
        self.on_stage(state.iteration, stage, output)

    # ---- stages (their logic is in experiments.stages; here: what the config and the store's state say) ----

    def _collect(self, state: IterationState, run_id: str) -> CollectOutput:
        deployed = self.deployed_version()
        spec, noise = self._spec_of(deployed)
        if self.config.collection.workers and self._kind(deployed) == RLT_KIND:
            raise PipelineConfigError(
                f"collection.workers: the deployed RLT policy {deployed!r} is collected in-process only; set 0"
            )
        settings = self.config.collection
        jobs = {}
        for index, task in enumerate(self.config.tasks):
            seed = self.config.seed + 1000 * state.iteration + index
            jobs[task] = CollectConfig(
                env=self.config.env.env(task, seed),
                policy=spec,
                noise=noise,
                episodes=settings.episodes_per_task,
                human=self.config.interventions,
                inject=self.config.injection,
                workers=settings.workers,
                envs_per_worker=settings.envs_per_worker,
                inference=settings.inference,
                ray_address=self.config.ray_address,
                store_url=self.config.store_url,
                run_id=f"{self.stage_id(state.iteration, 'collect')}/{task}",
                seed=seed,
                record_images=settings.record_images,
                metadata={"pipeline": self.config.name, "iteration": state.iteration},
                device=settings.device,
            )
        output = stages.collect(self.store, stages.CollectInput(deployed, jobs), self.progress)
        self.tracker.log_metrics(run_id, output.metrics, state.iteration)
        return output

    def _data_runs(self, iteration: int) -> list[str]:
        runs = list(self.config.data_runs)
        for state in self.iterations():
            if state.iteration <= iteration and "collect" in state.outputs:
                runs += list(state.outputs["collect"].runs.values())
        return runs

    def _selection(self, iteration: int) -> EpisodeQuery:
        return stages.training_selection(self.config.tasks, self._data_runs(iteration))

    def iteration_episodes(self, iteration: int) -> list[EpisodeRecord]:
        """The episodes ``iteration`` relabels and trains on, read from the store once (again after a restart)."""
        if self._episodes is None or self._episodes[0] != iteration:
            selection = self._selection(iteration)
            loaded = stages.iteration_episodes(
                self.store, selection, self.config.relabel, self.config.training
            )
            self._episodes = (iteration, loaded)
        return self._episodes[1]

    def _value_trainer(self, state_dir: Path) -> ValueTrainer:
        """How the relabel stage fits its value models: here (resumable from ``state_dir`` after a kill), or on
        Ray Train with ``value.train_workers``."""
        if self.config.relabel.value.train_workers == 1:
            return functools.partial(train_value, state_dir=state_dir)
        from experiments.distributed import train_value_data_parallel

        return functools.partial(train_value_data_parallel, self.config.store_url)

    def _relabel(self, state: IterationState, run_id: str) -> RelabelOutput:
        stage_id = self.stage_id(state.iteration, "relabel")
        existing = [
            r for r in self.store.list_relabels(method="recap") if r.config.get("pipeline_stage") == stage_id
        ]
        if existing:  # written just before a kill
            output = stages.relabel_output(existing[-1], [])
        else:
            state_dir = self.home / f"iter-{state.iteration:04d}" / "value-state"
            job = stages.RelabelInput(
                episodes=self.iteration_episodes(state.iteration),
                config=self.config.relabel,
                horizons={task: self.config.env.env(task).episode_steps for task in self.config.tasks},
                trainer=self._value_trainer(state_dir),
                extra={"pipeline_stage": stage_id},
            )
            output = stages.relabel(self.store, job)
        self.tracker.log_metrics(run_id, output.metrics, state.iteration)
        self.tracker.set_tags(run_id, {"relabel_id": output.relabel_id})
        return output

    def _train(self, state: IterationState, run_id: str) -> TrainOutput:
        output_dir = self.home / f"iter-{state.iteration:04d}"
        found = self._version_under(output_dir)
        if found is not None:  # trained and registered just before a kill
            return TrainOutput(version=found["version"], checkpoint=found["uri"])
        relabelled = state.outputs["relabel"]
        job = stages.TrainInput(
            episodes=self.iteration_episodes(state.iteration),
            selection=self._selection(state.iteration),
            record=relabelled.record or self.store.load_relabel(relabelled.relabel_id),
            config=self.config.training.model_copy(update={"seed": self.config.seed + state.iteration}),
            output_dir=output_dir,
            parent_version=state.outputs["collect"].policy,
            cfg_beta=self.config.cfg_beta,
        )
        output = stages.train(self.store, job, self.progress)
        self._episodes = None  # the last stage that reads them
        self.tracker.log_curve(run_id, "train_loss", output.loss_curve)
        self.tracker.log_metrics(run_id, output.metrics, state.iteration)
        self.tracker.set_tags(run_id, output.tags)
        return output

    def _rlt(self, state: IterationState, run_id: str) -> RLTOutput:
        """Online RLT around the deployed policy (``rlt``) or the RECAP candidate (``both``)."""
        deployed = state.outputs["collect"].policy if "collect" in state.outputs else self.deployed_version()
        prior = state.outputs["train"].version if "train" in state.outputs else deployed
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
            for run in (state.outputs["collect"].runs.values() if "collect" in state.outputs else ())
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
        return RLTOutput(**output, metrics=metrics, curve=curve)

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
            state.outputs["collect"].policy if "collect" in state.outputs else state.outputs["rlt"].deployed
        )

    def evaluation_protocol(self) -> stages.EvaluationProtocol:
        """The config's evaluation protocol: ``evaluation.episodes`` from ``evaluation.seed`` on every task."""
        protocol = self.config.evaluation
        return stages.EvaluationProtocol(
            envs={task: self.config.env.env(task, protocol.seed) for task in self.config.tasks},
            episodes=protocol.episodes,
            seed=protocol.seed,
            policy_seed=self.config.seed,
        )

    def _evaluate(self, state: IterationState, run_id: str) -> EvaluateOutput:
        deployed = self._deployed_at(state)
        job = stages.EvaluateInput(
            protocol=self.evaluation_protocol(),
            versions={"candidate": state.outputs[self._candidate_stage()].version, "deployed": deployed},
            runs={
                "candidate": f"{self.stage_id(state.iteration, 'evaluate')}/candidate",
                "deployed": f"{self.prefix}baseline/{deployed}",
            },
        )
        output = stages.evaluate(self.store, job)
        metrics = {
            f"{role}/{task}/{key}": value
            for role in ("candidate", "deployed")
            for task, figures in getattr(output, role).items()
            for key, value in figures.items()
        }
        self.tracker.log_metrics(run_id, metrics, state.iteration)
        return output

    def _gate(self, state: IterationState, run_id: str) -> GateOutput:
        output = stages.gate(state.outputs["evaluate"], self.config.gate)
        figures = {
            "promoted": float(output.promote),
            "candidate_success_rate": output.candidate_rate,
            "deployed_success_rate": output.deployed_rate,
        }
        self.tracker.log_metrics(run_id, figures, state.iteration)
        self.tracker.set_tags(run_id, {"gate_reason": output.reason})
        return output

    def _register(self, state: IterationState, run_id: str) -> RegisterOutput:
        """The candidate as a version of the pipeline's MLflow model, tagged with the gate's verdict."""
        candidate, gate = state.outputs[self._candidate_stage()], state.outputs["gate"]
        model_version = self.tracker.register(
            candidate.version, candidate.checkpoint, run_id, description=gate.reason
        )
        self.tracker.tag_version(
            model_version,
            {
                "gate": "promoted" if gate.promote else "rejected",
                "gate_reason": gate.reason,
                "policy_kind": RLT_KIND if self._candidate_stage() == "rlt" else "vla",
            },
        )
        return RegisterOutput(
            model=self.tracker.model_name, model_version=model_version, store_version=candidate.version
        )

    def _deploy(self, state: IterationState, run_id: str) -> DeployOutput:
        """Write the deploy file (the candidate if promoted, else the version deployed before) and SIGHUP the
        servers that serve it."""
        promoted = state.outputs["gate"].promote
        deployed = state.outputs[self._candidate_stage()].version if promoted else self._deployed_at(state)
        if promoted:
            self.tracker.set_deployed(state.outputs["register"].model_version)
        _write_atomically(self.deploy_file(), deployed + "\n")
        notified = self._notify_servers()
        self.tracker.set_tags(run_id, {"deployed": deployed})
        return DeployOutput(
            deployed=deployed, promoted=promoted, deploy_file=str(self.deploy_file()), notified=notified
        )

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

    def _report(self, state: IterationState, parent_run: str) -> ReportOutput:
        """Iteration-level metrics, tags and artifacts on the iteration run."""
        evaluation = state.outputs["evaluate"]
        metrics: dict[str, float | None] = {"promoted": float(state.outputs["gate"].promote)}
        for role in ("candidate", "deployed"):
            figures = list(getattr(evaluation, role).values())
            successes, n = evaluation.pooled(role)
            low, high = wilson_interval(successes, n)
            metrics |= {
                f"{role}_success_rate": successes / max(n, 1),
                f"{role}_ci_low": low,
                f"{role}_ci_high": high,
                f"{role}_successes_per_hour": sum(f["successes_per_hour"] for f in figures) / len(figures),
                f"{role}_episode_length": sum(f["mean_length"] for f in figures) / len(figures),
            }
        for stage in ("collect", "relabel", "train", "rlt"):
            if stage in state.outputs:
                metrics |= {k: v for k, v in state.outputs[stage].metrics.items() if v is not None}
        self.tracker.log_metrics(parent_run, metrics, state.iteration)
        tags = {
            "candidate": state.outputs[self._candidate_stage()].version,
            "deployed": state.outputs["deploy"].deployed,
            "gate_reason": state.outputs["gate"].reason,
        }
        if "relabel" in state.outputs:
            tags["relabel_id"] = state.outputs["relabel"].relabel_id
        self.tracker.set_tags(parent_run, tags)
        folder = self.home / f"iter-{state.iteration:04d}" / "artifacts"
        artifacts = []
        for path, artifact_folder in write_iteration_artifacts(self, state, folder):
            self.tracker.log_artifact(parent_run, path, artifact_folder)
            artifacts.append(f"{artifact_folder}/{path.name}" if artifact_folder else path.name)
        return ReportOutput(metrics=metrics, artifacts=artifacts)

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


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
