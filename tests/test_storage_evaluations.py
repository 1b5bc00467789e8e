"""Evaluation metrics with NaN/inf are stored as null on SQLite and PostgreSQL (JSON has no NaN)."""

from __future__ import annotations

import math

import numpy as np

from storage import ExperienceStore
from tests.storage_fixtures import POLICY_VERSION, pg_database, pg_migrated, store  # noqa: F401


def test_non_finite_metrics_are_stored_as_null(store: ExperienceStore) -> None:  # noqa: F811
    metrics = {
        "success_rate": 0.0,
        "mean_success_length": math.nan,
        "mean_return": -math.inf,
        "per_seed": [1.5, np.float64("nan"), np.float32("inf")],
        "nested": {"best": math.inf, "name": "eval", "count": 3},
        "numpy": {"rate": np.float32(0.5), "count": np.int64(4), "curve": np.array([0.25, np.nan])},
    }
    store.write_evaluation(POLICY_VERSION, "reach-v3", 10, 0, metrics=metrics, run_id="eval-1")
    (stored,) = store.list_evaluations(POLICY_VERSION)
    assert stored.metrics == {
        "success_rate": 0.0,
        "mean_success_length": None,
        "mean_return": None,
        "per_seed": [1.5, None, None],
        "nested": {"best": None, "name": "eval", "count": 3},
        "numpy": {"rate": 0.5, "count": 4, "curve": [0.25, None]},
    }
    assert (stored.n, stored.successes, stored.run_id) == (10, 0, "eval-1")
    assert math.isnan(metrics["mean_success_length"]), "the caller's dict is not modified"
