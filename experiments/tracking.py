"""MLflow tracking of a pipeline: one experiment per pipeline, one run per iteration, a nested run per stage,
and a registered model whose versions carry the store's policy-version ids (alias ``deployed``).

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), and every lookup is by
tag, so a resumed iteration finds and continues its runs instead of creating new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

DEPLOYED_ALIAS = "deployed"
ITERATION_TAG = "flywheel.iteration"
STAGE_TAG = "flywheel.stage"
STORE_VERSION_TAG = "store_version"
PARENT_TAG = "mlflow.parentRunId"

logger = logging.getLogger(__name__)


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifact folder beside a SQLite/file tracking store (None: let a remote server decide)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict → ``{"a.b": "value"}`` strings (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)[:6000]
    return flat


class PipelineTracker:
    """The MLflow view of one pipeline (experiment ``flywheel/<pipeline>``, model ``flywheel-<pipeline>``)."""

    def __init__(self, tracking_uri: str, pipeline: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.model_name = f"flywheel-{pipeline}"
        name = f"flywheel/{pipeline}"
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))
        )

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
        rows = [
            Metric(key, float(value), 0, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and value == value
        ]
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

    def register(self, store_version: str, source: str, run_id: str, description: str) -> str:
        """Register ``store_version`` as a model version (idempotent by its store id); returns its number."""
        existing = self.model_version_of(store_version)
        if existing is not None:
            self.client.update_model_version(self.model_name, existing, description=description)
            return existing
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(self.model_name, description="flywheel pipeline policies")
        version = self.client.create_model_version(
            self.model_name,
            source=source,
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
