"""The typed pipeline config: one YAML file says what to improve, how, and where everything lives.

Validation is pydantic's; ``load_pipeline_config`` turns the first problem into a one-line
``PipelineConfigError`` naming the field (``gate.confidence: Input should be less than 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from envs import EnvSettings, InjectionConfig, SimulatedHumanConfig, is_metaworld_task
from envs.settings import resolve_env_name
from experiments.paths import checkpoints_dir, default_mlflow_uri, default_store_url
from experiments.training import BCConfig
from experiments.validation import first_error
from policies.device import DeviceName
from recap import RelabelConfig
from rlt.config import RLTConfig


class PipelineConfigError(ValueError):
    """A pipeline config file is missing, unreadable or invalid (the message names the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriorConfig(_Strict):
    """The policy deployed before the first iteration: a policy spec (``scripted``, a checkpoint directory, a
    registered version) and, for ``scripted``, its action noise (a noisy expert is a mediocre prior)."""

    policy: str = "scripted"
    noise: float = Field(default=0.0, ge=0.0)


class CollectionSettings(_Strict):
    """Per-iteration collection budget and where it runs (``workers: 0`` = in this process)."""

    episodes_per_task: int = Field(default=50, ge=1)
    workers: int = Field(default=0, ge=0)
    envs_per_worker: int = Field(default=1, ge=1)
    inference: Literal["local", "batched"] = "local"
    record_images: bool = True
    device: DeviceName = "auto"  # where the policy infers (``CollectConfig.device``)


class EvaluationSettings(_Strict):
    """Evaluation protocol: fresh episodes per task, with seeds disjoint from collection."""

    episodes: int = Field(default=50, ge=1)
    seed: int = Field(default=10_000, ge=0)


class GateSettings(_Strict):
    """When a candidate replaces the deployed policy.

    ``ci`` (default): promote unless the candidate's Wilson upper bound lies below the deployed policy's
    point success rate minus ``margin`` (i.e. it is confidently worse). ``point``: promote if its success rate
    is at least the deployed one's minus ``margin``. ``always``: promote every candidate.
    """

    rule: Literal["ci", "point", "always"] = "ci"
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    margin: float = Field(default=0.0, ge=0.0, le=1.0)


class PipelineConfig(_Strict):
    """A whole improvement pipeline: tasks, prior, method, budgets, gate, and the store/Ray/MLflow endpoints."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tasks: list[str] = Field(min_length=1)
    prior: PriorConfig = PriorConfig()
    method: Literal["recap", "rlt", "both"] = "recap"
    env: EnvSettings = EnvSettings()
    collection: CollectionSettings = CollectionSettings()
    interventions: SimulatedHumanConfig | None = SimulatedHumanConfig()
    injection: InjectionConfig | None = Field(
        default=None, description="bad segments injected into every collection (ground truth: steps.injected)"
    )
    relabel: RelabelConfig = RelabelConfig()
    training: BCConfig = BCConfig(condition_dropout=0.3)
    rlt: RLTConfig = Field(default=RLTConfig(), description="the RLT stage (method rlt / both): rlt.config")
    cfg_beta: float = Field(default=1.0, ge=0.0)
    evaluation: EvaluationSettings = EvaluationSettings()
    gate: GateSettings = GateSettings()
    store_url: str | None = None
    ray_address: str | None = None
    mlflow_uri: str | None = None
    checkpoints: str | None = Field(default=None, description="checkpoint folder (default: the data folder)")
    data_runs: list[str] = Field(
        default_factory=list, description="stored runs (e.g. demos) always trained on"
    )
    serve_pid_files: list[str] = Field(
        default_factory=list, description="pid files of `flywheel serve` processes to SIGHUP after a deploy"
    )
    seed: int = Field(default=0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        """Meta-World tasks or gymnasium envs (registered ids, ``module:EnvId``, ``module:Class``)."""
        resolved = [resolve_env_name(task) for task in tasks]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"expected distinct tasks, got {tasks}")
        return resolved

    @model_validator(mode="after")
    def _gym_envs(self) -> PipelineConfig:
        """A gymnasium env has no simulated human (Meta-World's scripted expert; the default is dropped for it, an
        explicit one is an error) and no RLT stage (its hand-off reads Meta-World's state); ``env`` must fit
        every task."""
        foreign = [task for task in self.tasks if not is_metaworld_task(task)]
        for task in self.tasks:
            try:
                self.env.env(task, self.seed)
            except ValueError as error:
                raise ValueError(f"env.{error}") from None
        if not foreign:
            return self
        if self.interventions is not None and "interventions" in self.model_fields_set:
            raise ValueError(
                f"interventions: the simulated human is Meta-World's scripted expert; not for {foreign[0]}"
            )
        self.interventions = None
        if self.method != "recap":
            raise ValueError(
                f"method {self.method!r}: RLT runs on Meta-World tasks; {foreign[0]} takes method recap"
            )
        return self

    @model_validator(mode="after")
    def _one_env(self) -> PipelineConfig:
        """``env`` is the pipeline's one env setting: the trained model reads its cameras at its image size."""
        if "env" in self.training.model_fields_set and self.training.env != self.env:
            raise ValueError("training.env: set by the pipeline's env block (cameras, image size, episode limit)")
        self.training = self.training.model_copy(update={"env": self.env})
        return self

    @model_validator(mode="after")
    def _rlt_on_one_task(self) -> PipelineConfig:
        if self.method != "recap" and len(self.tasks) != 1:
            raise ValueError(
                f"method {self.method!r} trains one RLT learner per pipeline: expected 1 task, got {self.tasks}"
            )
        return self

    def resolved(self) -> PipelineConfig:
        """This config with the embedded defaults filled in (store, MLflow, checkpoints)."""
        return self.model_copy(
            update={
                "store_url": self.store_url or default_store_url(),
                "mlflow_uri": self.mlflow_uri or default_mlflow_uri(),
                "checkpoints": self.checkpoints or str(checkpoints_dir()),
            }
        )


def parse_pipeline_config(data: object, source: str = "config") -> PipelineConfig:
    """Validate a mapping as a ``PipelineConfig``; raise ``PipelineConfigError`` with one line."""
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise PipelineConfigError(f"{source}: {first_error(error)}") from error


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML pipeline config."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(f"--config: {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PipelineConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    return parse_pipeline_config(data, str(path))
