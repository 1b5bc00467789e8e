"""Label-quality diagnostics of a relabel, and the sanity floor that warns when labels look like noise.

All figures use held-out values (each episode scored by a value model that did not train on it). "Autonomous"
steps are the policy's own steps (interventions are forced positive and would inflate the figures).
Figures that need both classes (e.g. AUC when a task has no failures) are ``None``; JSON-ready throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from recap.config import SanityFloor
from storage.records import EpisodeRecord, Outcome, StepSource

logger = logging.getLogger(__name__)


@dataclass
class EpisodeScores:
    """Held-out per-step figures of one episode: value, Monte-Carlo return, advantage, indicator, and whether
    the step's advantage bootstraps from V (its N-step window ends before the episode does)."""

    episode: EpisodeRecord
    values: np.ndarray
    returns: np.ndarray
    advantages: np.ndarray
    indicators: np.ndarray
    bootstrapped: np.ndarray


def auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for binary ``positives`` (ties count half); None if only one class is present."""
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def group_diagnostics(scores: Sequence[EpisodeScores], threshold: float | None) -> dict[str, Any]:
    """The label-quality figures of one group of episodes (a task, or all of them)."""
    success = np.array([item.episode.outcome == Outcome.SUCCESS for item in scores])
    autonomous = [np.asarray(item.episode.sources) != StepSource.HUMAN for item in scores]
    step_success = np.concatenate(
        [np.full(item.episode.length, ok) for item, ok in zip(scores, success, strict=True)]
    )
    auto = np.concatenate(autonomous)
    indicator = np.concatenate([item.indicators for item in scores])
    values = np.concatenate([item.values for item in scores])
    returns = np.concatenate([item.returns for item in scores])
    p_success = _mean(indicator[auto & step_success])
    p_failure = _mean(indicator[auto & ~step_success])
    inner = auto & np.concatenate([item.bootstrapped for item in scores])
    inner_success, inner_failure = (
        _mean(indicator[inner & step_success]),
        _mean(indicator[inner & ~step_success]),
    )
    return {
        "episodes": len(scores),
        "successes": int(success.sum()),
        "failures": int((~success).sum()),
        "steps": int(indicator.size),
        "intervention_steps": int((~auto).sum()),
        "threshold": None if threshold is None or not np.isfinite(threshold) else float(threshold),
        "positive_fraction_autonomous": _mean(indicator[auto]),
        "positive_fraction_all": _mean(indicator),
        "p_positive_given_success": p_success,
        "p_positive_given_failure": p_failure,
        "positive_gap": None if p_success is None or p_failure is None else p_success - p_failure,
        "positive_gap_bootstrapped": None
        if inner_success is None or inner_failure is None
        else inner_success - inner_failure,
        "value_return_correlation": _correlation(values, returns),
        "value_return_mae": float(np.abs(values - returns).mean()),
        "first_step_value_auc": auc(np.array([item.values[0] for item in scores]), success),
        "mean_advantage_auc": auc(np.array([item.advantages.mean() for item in scores]), success),
        "mean_first_step_value_success": _mean(
            np.array([s.values[0] for s, ok in zip(scores, success, strict=True) if ok])
        ),
        "mean_first_step_value_failure": _mean(
            np.array([s.values[0] for s, ok in zip(scores, success, strict=True) if not ok])
        ),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def sanity_failures(name: str, figures: dict[str, Any], floor: SanityFloor) -> list[str]:
    """Which floors a group misses (only groups with both successes and failures are judged)."""
    if figures["successes"] == 0 or figures["failures"] == 0:
        return []
    checks = [
        ("positive_gap", floor.min_positive_gap),
        ("first_step_value_auc", floor.min_first_step_auc),
        ("value_return_correlation", floor.min_value_correlation),
    ]
    checks = [(key, minimum) for key, minimum in checks if minimum is not None]
    return [
        f"{name}: {key} = {_rounded(figures[key])} < floor {minimum}"
        for key, minimum in checks
        if figures[key] is None or figures[key] < minimum
    ]


def label_diagnostics(
    scores: Sequence[EpisodeScores], thresholds: dict[str, float], floor: SanityFloor
) -> dict[str, Any]:
    """Pooled and per-task figures, plus ``sanity_ok`` / ``sanity_failures``; warns loudly below the floor."""
    by_task: dict[str, list[EpisodeScores]] = {}
    for item in scores:
        by_task.setdefault(item.episode.task, []).append(item)
    pooled = group_diagnostics(scores, None)
    tasks = {task: group_diagnostics(group, thresholds.get(task)) for task, group in sorted(by_task.items())}
    failures = sanity_failures("all", pooled, floor)
    for task, figures in tasks.items():
        failures += sanity_failures(task, figures, floor)
    one_class = [
        task for task, figures in tasks.items() if figures["successes"] == 0 or figures["failures"] == 0
    ]
    if failures:
        logger.warning(
            "RECAP LABELS FAIL THE SANITY FLOOR — do not train on them blindly: %s", "; ".join(failures)
        )
    return {
        "all": pooled,
        "tasks": tasks,
        "single_outcome_tasks": one_class,
        "sanity_ok": not failures,
        "sanity_failures": failures,
    }
