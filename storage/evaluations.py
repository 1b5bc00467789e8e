"""Evaluation results: successes out of n episodes of a policy version on a task.

Metrics are stored as JSON. JSON has no NaN or infinity (PostgreSQL rejects them), yet callers legitimately
produce them (e.g. the mean length of successful episodes when there were none), so every non-finite float in
the metrics, at any depth, is stored as null and reads back as ``None`` on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from storage.database import Database
from storage.records import EpisodeValidationError
from storage.registry import PolicyRegistry, RunRegistry
from storage.schema import Evaluation, PolicyVersion


@dataclass(frozen=True)
class EvaluationSummary:
    """One stored evaluation."""

    id: int
    policy_version: str
    task: str
    n: int
    successes: int
    metrics: dict[str, Any]
    run_id: str | None

    @property
    def success_rate(self) -> float:
        """``successes / n`` (0 when n is 0)."""
        return self.successes / self.n if self.n else 0.0


def json_metrics(data: Any) -> Any:
    """``data`` as plain JSON values: numpy scalars and arrays become Python ones, and every non-finite float
    (NaN, ±inf) becomes ``None``."""
    if isinstance(data, np.ndarray | np.generic):
        data = data.tolist()
    if isinstance(data, dict):
        return {key: json_metrics(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_metrics(value) for value in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


class EvaluationRepository:
    """Writes and lists the ``evaluations`` table."""

    def __init__(self, db: Database, policies: PolicyRegistry, runs: RunRegistry) -> None:
        self._db = db
        self._policies = policies
        self._runs = runs

    def write(
        self,
        policy_version: str,
        task: str,
        n: int,
        successes: int,
        metrics: dict[str, Any] | None,
        run_id: str | None,
    ) -> int:
        """Record an evaluation (the policy version must be registered); returns its row id."""
        if not 0 <= successes <= n:
            raise EpisodeValidationError("successes", f"0 <= successes <= n={n}", repr(successes))
        version_id = self._policies.id_of(policy_version, "policy_version")
        row = {
            "policy_version_id": version_id,
            "task": task,
            "n": n,
            "successes": successes,
            "metrics": json_metrics(metrics or {}),
            "run_id": run_id,
        }
        table = Evaluation.__table__
        with self._db.write_engine.begin() as connection:
            self._runs.ensure(connection, run_id)
            evaluation_id = connection.execute(table.insert().returning(table.c.id), row).scalar_one()
        assert evaluation_id is not None
        return evaluation_id

    def list(self, policy_version: str | None, task: str | None) -> list[EvaluationSummary]:
        """Stored evaluations, oldest first, optionally filtered."""
        query = (
            sa.select(Evaluation, PolicyVersion.version)
            .join(PolicyVersion, Evaluation.policy_version_id == PolicyVersion.id)
            .order_by(Evaluation.id)
        )
        if policy_version is not None:
            query = query.where(PolicyVersion.version == policy_version)
        if task is not None:
            query = query.where(Evaluation.task == task)
        with self._db.read_session() as session:
            return [
                EvaluationSummary(e.id, version, e.task, e.n, e.successes, e.metrics, e.run_id)
                for e, version in session.execute(query)
            ]
