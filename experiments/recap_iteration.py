"""``flywheel recap iterate``: one RECAP iteration through the pipeline's stages (``experiments.stages``):
collect with the current policy and a simulated human → cross-fitted relabel → advantage-conditioned retraining
→ evaluate the retrained policy against the current one → gate.

Each stage reads from and writes to the experience store, so the iteration is reproducible from the store and
its saved config: the relabel version, the policy version (with its parent) and the evaluations all land there.
Unlike ``flywheel iterate`` it keeps no stage records (a rerun is a new iteration), registers nothing in MLflow's
model registry and deploys nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from envs import EnvConfig, GymEnvConfig, SimulatedHumanConfig
from experiments import stages
from experiments.collection import CollectConfig, CollectReport
from experiments.evaluation import EvalResult
from experiments.pipeline_config import EvaluationSettings, GateSettings
from experiments.policy_loader import load, register, resolve
from experiments.stages import GateOutput
from experiments.training import BCConfig, TrainedPolicy
from recap import RelabelConfig
from recap.config import Conditioning
from storage import ExperienceStore, RelabelRecord


class RecapIterationConfig(BaseModel):
    """Settings of one RECAP iteration (validated; saved with the run)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="a Meta-World task or a gymnasium env name (the env's task)")
    policy: str = Field(description="the current policy: a registered version or checkpoint directory")
    store_url: str
    collect_episodes: int = Field(default=50, ge=1)
    human: SimulatedHumanConfig | None = SimulatedHumanConfig()
    relabel: RelabelConfig = RelabelConfig()
    bc: BCConfig = BCConfig(condition_dropout=0.3)
    data_runs: list[str] | None = Field(
        default=None, description="runs to aggregate (default: every stored run)"
    )
    cfg_beta: float = Field(default=1.0, ge=0.0)
    conditioning: Conditioning = Field(
        default="explicit",
        description="explicit: positive/negative text on every step; positive_only: negative steps unconditioned",
    )
    retrain_from: Path | None = Field(
        default=None,
        description="pretrained checkpoint the policy is retrained from each iteration (default: a fresh model)",
    )
    eval_episodes: int = Field(default=50, ge=0, description="per policy (0: no evaluation and no gate)")
    evaluation_seed: int = Field(
        default=EvaluationSettings.model_fields["seed"].default,
        ge=0,
        description="first evaluation episode's seed",
    )
    gate: GateSettings = GateSettings()
    seed: int = 0

    @model_validator(mode="after")
    def _settings_fit_the_task(self) -> RecapIterationConfig:
        self.task_env  # noqa: B018 — raises (a ValidationError naming the field) when bc.env does not fit the task
        return self

    @property
    def task_env(self) -> EnvConfig | GymEnvConfig:
        """The task's env, from the one env settings model the retraining also reads (``bc.env``)."""
        return self.bc.env.env(self.task, self.seed)


@dataclass
class RecapIterationResult:
    """What one iteration produced (``before``/``after``/``gate``: None without evaluation episodes)."""

    collection: CollectReport
    relabel: RelabelRecord
    trained: TrainedPolicy
    before: EvalResult | None
    after: EvalResult | None
    gate: GateOutput | None = None


def run_recap_iteration(
    config: RecapIterationConfig, output_dir: Path, progress: bool = True
) -> RecapIterationResult:
    """Collect → relabel → retrain → evaluate → gate, recording each product in the store."""
    store = ExperienceStore(config.store_url)
    store.upgrade()
    source = resolve(config.policy, store)
    current = load(source, task=config.task, store=store, seed=config.seed).version
    register(store, source, current)
    job = CollectConfig(
        env=config.task_env,
        policy=config.policy,
        episodes=config.collect_episodes,
        human=config.human,
        store_url=config.store_url,
        seed=config.seed,
        metadata={"stage": "recap-collect"},
    )
    collected = stages.collect(store, stages.CollectInput(current, {config.task: job}), progress)
    selection = stages.training_selection([config.task], config.data_runs)
    episodes = stages.iteration_episodes(store, selection, config.relabel, config.bc)
    horizons = {config.task: config.task_env.episode_steps}
    relabelled = stages.relabel(store, stages.RelabelInput(episodes, config.relabel, horizons))
    assert relabelled.record is not None  # set by the stage that ran
    trained = stages.train(
        store,
        stages.TrainInput(
            episodes=episodes,
            selection=selection,
            record=relabelled.record,
            config=config.bc,
            output_dir=output_dir,
            parent_version=current,
            cfg_beta=config.cfg_beta,
            conditioning=config.conditioning,
            init_from=config.retrain_from,
        ),
        progress,
    )
    assert trained.trained is not None
    result = RecapIterationResult(
        collected.reports[config.task], relabelled.record, trained.trained, None, None
    )
    if config.eval_episodes == 0:
        return result
    run = f"recap-iterate/{collected.runs[config.task]}"
    evaluation = stages.evaluate(
        store,
        stages.EvaluateInput(
            protocol=stages.EvaluationProtocol(
                envs={config.task: config.task_env.model_copy(update={"render": True})},
                episodes=config.eval_episodes,
                seed=config.evaluation_seed,
                policy_seed=config.seed,
            ),
            versions={"candidate": trained.version, "deployed": current},
            runs={"candidate": f"{run}/candidate", "deployed": f"{run}/deployed"},
        ),
    )
    result.before = evaluation.results["deployed"][config.task]
    result.after = evaluation.results["candidate"][config.task]
    result.gate = stages.gate(evaluation, config.gate)
    return result
