"""MLflow tracking of a pipeline: one experiment per pipeline, one run per iteration, a nested run per stage,
and a registered model whose versions carry the store's policy-version ids (alias ``deployed``) and a loadable
``mlflow.pyfunc`` model wrapping the policy checkpoint (``experiments.policy_model``; its artifact layout and
the download of a ``models:/`` policy are ``experiments.mlflow_policy``'s). :func:`log_command_run` records one
run per CLI command that trains or evaluates.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), and every lookup is by
tag, so a resumed iteration finds and continues its runs instead of creating new ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from experiments.mlflow_policy import CHECKPOINT_ARTIFACT, IMAGE_INPUT, MODEL_ARTIFACT
from experiments.paths import default_mlflow_uri
from policies.manifest import HIERARCHICAL_KIND, VLA_KIND, checkpoint_kind
from storage.engine import hide_password

DEPLOYED_ALIAS = "deployed"
ITERATION_TAG = "flywheel.iteration"
STAGE_TAG = "flywheel.stage"
STORE_VERSION_TAG = "store_version"
PARENT_TAG = "mlflow.parentRunId"
COMMAND_TAG = "flywheel.command"
POLICY_VERSION_TAG = "policy_version"
#: MLflow 3 opens an experiment in the view its kind names; flywheel's runs are model training runs.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
#: Checkpoint kinds that load without the experience store (an RLT checkpoint names its prior's version).
STANDALONE_KINDS = (VLA_KIND, HIERARCHICAL_KIND)

logger = logging.getLogger(__name__)


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifact folder beside a SQLite/file tracking store (None: let a remote server decide)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name`` (created if missing), tagged to open on its training runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=artifact_root_for(uri), tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict → ``{"a.b": "value"}`` strings (MLflow params); a password in a URL shows as ``***``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = hide_password(str(value))[:6000]
    return flat


def log_command_run(
    command: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    artifacts: dict[str, Iterable[Path]] | None = None,
    tracking_uri: str | None = None,
) -> str | None:
    """Record a finished CLI command (or benchmark) that trained or evaluated as one run of experiment
    ``flywheel/<command>`` in ``tracking_uri`` (default: the configured store,
    ``experiments.paths.default_mlflow_uri``): ``params`` (its saved config, flattened), final ``metrics``,
    ``tags`` (e.g. ``policy_version``) and ``artifacts`` (artifact folder, ``""`` for the root → files).
    Returns the run id; the command's result never depends on tracking, so a store that cannot be written is a
    warning and None."""
    uri = tracking_uri or default_mlflow_uri()
    try:
        client = MlflowClient(uri, registry_uri=uri)
        experiment = experiment_id(client, f"flywheel/{command}", uri)
        run_tags = {COMMAND_TAG: command, **(tags or {})}
        name = f"{command} {run_tags.get(POLICY_VERSION_TAG, '')}".strip()
        run_id = client.create_run(experiment, run_name=name, tags=run_tags).info.run_id
        items = list(flatten(params).items())
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
        client.log_batch(run_id, metrics=_metric_rows(metrics, step=0))
        for folder, paths in (artifacts or {}).items():
            for path in paths:
                client.log_artifact(run_id, str(path), folder or None)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except Exception as error:  # best effort: the command's finished work never depends on its record
        logger.warning("MLflow: the %s run was not logged to %s: %s", command, uri, error)
        return None
    return run_id


def _metric_rows(metrics: dict[str, float], step: int) -> list[Metric]:
    """Finite numeric ``metrics`` as MLflow rows at ``step``."""
    return [
        Metric(key, float(value), 0, step)
        for key, value in metrics.items()
        if isinstance(value, int | float) and value == value
    ]


class PipelineTracker:
    """The MLflow view of one pipeline (experiment ``flywheel/<pipeline>``, model ``flywheel-<pipeline>``)."""

    def __init__(self, tracking_uri: str, pipeline: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.model_name = f"flywheel-{pipeline}"
        self.experiment_id = experiment_id(self.client, f"flywheel/{pipeline}", tracking_uri)

    # ---- runs ----

    def iteration_run(self, iteration: int, params: dict[str, Any]) -> str:
        """The run of ``iteration`` (found by tag, else created with the resolved config as params)."""
        existing = self._find(f"tags.`{ITERATION_TAG}` = '{iteration}' and tags.`{STAGE_TAG}` = 'iteration'")
        if existing is not None:
            self._reopen(existing)
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"iteration-{iteration}",
            tags={ITERATION_TAG: str(iteration), STAGE_TAG: "iteration"},
        )
        flat = flatten(params)
        items = list(flat.items())
        for start in range(0, len(items), 100):
            self.client.log_batch(
                run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]]
            )
        return run.info.run_id

    def stage_run(self, parent_run: str, iteration: int, stage: str) -> str:
        """The nested run of ``stage`` under the iteration run (found by tag, else created)."""
        existing = self._find(
            f"tags.`{ITERATION_TAG}` = '{iteration}' and tags.`{STAGE_TAG}` = '{stage}' "
            f"and tags.`{PARENT_TAG}` = '{parent_run}'"
        )
        if existing is not None:
            self._reopen(existing)
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags={ITERATION_TAG: str(iteration), STAGE_TAG: stage, PARENT_TAG: parent_run},
        )
        return run.info.run_id

    def end_committed_runs(
        self, iteration: int, stages: Iterable[str], iteration_done: bool = False
    ) -> list[str]:
        """End (FINISHED) the RUNNING runs of ``iteration``'s ``stages``, which the store recorded as committed,
        and its iteration run if ``iteration_done``; returns their ids.

        A process killed after a stage committed but before its run was ended leaves that run RUNNING, and a
        resumed iteration skips the stage, so nothing else would ever end it.
        """
        done = set(stages) | ({"iteration"} if iteration_done else set())
        running = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{ITERATION_TAG}` = '{iteration}' and attributes.status = 'RUNNING'",
        )
        ended = [run.info.run_id for run in running if run.data.tags.get(STAGE_TAG) in done]
        for run_id in ended:
            logger.info(
                "ending run %s of iteration %d: its stage committed before the process stopped",
                run_id,
                iteration,
            )
            self.finish(run_id)
        return ended

    def finish(self, run_id: str, failed: bool = False) -> None:
        """Mark a run finished (or failed)."""
        self.client.set_terminated(
            run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        )

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        rows = _metric_rows(metrics, step)
        for start in range(0, len(rows), 500):
            self.client.log_batch(run_id, metrics=rows[start : start + 500])

    def log_curve(self, run_id: str, key: str, values: list[float]) -> None:
        """A curve (e.g. training loss per logged step) as one metric with steps."""
        rows = [Metric(key, float(v), 0, step) for step, v in enumerate(values) if v == v]
        for start in range(0, len(rows), 500):
            self.client.log_batch(run_id, metrics=rows[start : start + 500])

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        """Upload a file to the run's artifacts."""
        self.client.log_artifact(run_id, str(path), folder)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Tag a run."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _reopen(self, run_id: str) -> None:
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    # ---- registry ----

    def register(self, store_version: str, checkpoint: str, run_id: str, description: str) -> str:
        """Register ``store_version`` as a model version (idempotent by its store id); returns its number.

        A checkpoint that loads on its own (VLA, hierarchical) is logged to ``run_id`` as a pyfunc model
        (``experiments.policy_model``), which the version then holds; an RLT checkpoint, whose prior lives in the store,
        is registered by its path."""
        existing = self.model_version_of(store_version)
        if existing is not None:
            self.client.update_model_version(self.model_name, existing, description=description)
            return existing
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(self.model_name, description="flywheel pipeline policies")
        loadable = checkpoint_kind(Path(checkpoint)) in STANDALONE_KINDS
        version = self.client.create_model_version(
            self.model_name,
            source=log_policy_model(self.client, run_id, Path(checkpoint)) if loadable else checkpoint,
            run_id=run_id,
            tags={STORE_VERSION_TAG: store_version},
            description=description,
        )
        return str(version.version)

    def model_version_of(self, store_version: str) -> str | None:
        """The registered model version carrying ``store_version`` (or None)."""
        try:
            versions = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException:
            return None
        for version in versions:
            if version.tags.get(STORE_VERSION_TAG) == store_version:
                return str(version.version)
        return None

    def tag_version(self, model_version: str, tags: dict[str, str]) -> None:
        """Tag a registered model version (gate verdict and reason)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, model_version, key, value)

    def set_deployed(self, model_version: str) -> None:
        """Point the ``deployed`` alias at ``model_version``."""
        self.client.set_registered_model_alias(self.model_name, DEPLOYED_ALIAS, model_version)


# ---- the policy as an MLflow model ----


def policy_signature(policy: Any) -> ModelSignature:
    """Inputs ``state``, ``prompt`` and ``images/<camera>`` as ``policy`` declares them; output its chunk."""
    from policies.serving.observations import ObservationSpec

    spec = ObservationSpec.of(policy)
    inputs = [
        TensorSpec(np.dtype(np.float32), (-1, spec.state_dim or -1), "state"),
        TensorSpec(np.dtype(object), (-1,), "prompt"),
        *(
            TensorSpec(np.dtype(np.uint8), (-1, height, width, 3), f"{IMAGE_INPUT}{camera}")
            for camera, (height, width) in spec.cameras.items()
        ),
    ]
    output = TensorSpec(np.dtype(np.float32), (-1, policy.action_horizon, policy.action_dim), "actions")
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([output]))


def log_policy_model(client: MlflowClient, run_id: str, checkpoint: Path) -> str:
    """Log ``checkpoint`` to ``run_id`` as a pyfunc model (``experiments.policy_model``, artifact folder
    :data:`MODEL_ARTIFACT`); returns the artifact URI a model version can hold."""
    from experiments.policy_loader import load

    signature = policy_signature(load(str(checkpoint)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            path,
            python_model=str(Path(__file__).with_name("policy_model.py")),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=signature,
            pip_requirements=[f"mlflow=={mlflow.__version__}", "numpy", "torch"],
        )
        client.log_artifacts(run_id, str(path), MODEL_ARTIFACT)
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
