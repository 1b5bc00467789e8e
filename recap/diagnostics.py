"""Label-quality diagnostics of a relabel, and the sanity floor that warns when labels look like noise.

All figures use held-out values (each episode scored by a value model that did not train on it). "Autonomous"
steps are the policy's own steps (interventions are forced positive and would inflate the figures).
Figures that need both classes (e.g. AUC when a task has no failures) are ``None``; JSON-ready throughout.

Where the answer is known — episodes whose steps carry ``EpisodeRecord.injected`` (bad segments an env wrapper
injected, ``envs.injection``) — the labels are also judged against that ground truth: ``label_auc`` (does the
advantage rank clean autonomous steps above injected ones), P(positive) on injected vs clean steps and per kind.
Only episodes of runs with injections count (``run_id``: demonstrations and other collections stay out); an
episode of such a run without marks is all clean. Episodes labelled with the scripted expert's phases
(``metadata["subtask_source"] == "expert_phase"``) get P(positive) per phase.
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


EXPERT_PHASE_SOURCE = "expert_phase"


def value_figures(scores: Sequence[EpisodeScores]) -> dict[str, float | None]:
    """How much the held-out value knows about the return.

    ``value_episode_rank``: Spearman correlation of V_t with the return G_t inside each episode (≥ 3 steps),
    averaged over episodes — what N-step advantages use (a value constant within an episode counts 0).
    ``value_return_spearman``: the rank correlation across all steps. ``value_skill`` = 1 − MAE(V, G) / MAE(m, G),
    m the median return (0 for the best constant guess, < 0 worse, 1 perfect)."""
    ranks = [_episode_rank(item.values, item.returns) for item in scores if item.episode.length >= 3]
    values = np.concatenate([item.values for item in scores])
    returns = np.concatenate([item.returns for item in scores])
    baseline = float(np.abs(returns - np.median(returns)).mean())
    return {
        "value_episode_rank": float(np.mean(ranks)) if ranks else None,
        "value_return_spearman": _correlation(rankdata(values), rankdata(returns)),
        "value_skill": None if baseline == 0 else 1.0 - float(np.abs(values - returns).mean()) / baseline,
    }


def _episode_rank(values: np.ndarray, returns: np.ndarray) -> float:
    if np.ptp(values) == 0 or np.ptp(returns) == 0:
        return 0.0
    return float(np.corrcoef(rankdata(values), rankdata(returns))[0, 1])


def injected_steps(episode: EpisodeRecord) -> list[str | None]:
    """The episode's per-step injected kinds (all None for an episode without marks)."""
    return list(episode.injected) if episode.injected is not None else [None] * episode.length


def ground_truth_figures(
    advantages: np.ndarray, indicators: np.ndarray, autonomous: np.ndarray, injected: Sequence[str | None]
) -> dict[str, Any]:
    """Labels against the injected ground truth, over autonomous steps: ``label_auc`` (AUC of the advantage
    for *clean* steps; 0.5 = blind, 1 = every clean step ranks above every injected one),
    ``p_positive_injected`` / ``p_positive_clean``, their ``injected_gap`` (clean − injected) and
    ``p_positive_by_kind``. Empty when no step was injected."""
    kinds = np.array([kind or "" for kind in injected], dtype=object)
    bad = kinds != ""
    if not bad.any():
        return {}
    auto = np.asarray(autonomous, dtype=bool)
    p_bad, p_clean = _mean(indicators[auto & bad]), _mean(indicators[auto & ~bad])
    return {
        "injected_steps": int((auto & bad).sum()),
        "injected_fraction": _mean(bad[auto]),
        "label_auc": auc(advantages[auto], ~bad[auto]),
        "p_positive_injected": p_bad,
        "p_positive_clean": p_clean,
        "injected_gap": None if p_bad is None or p_clean is None else p_clean - p_bad,
        "p_positive_by_kind": {
            str(kind): _mean(indicators[auto & (kinds == kind)]) for kind in sorted(set(kinds[bad]))
        },
    }


def phase_figures(indicators: np.ndarray, autonomous: np.ndarray, phases: Sequence[str | None]) -> dict:
    """P(positive) and step count per phase over autonomous steps (steps without a phase left out)."""
    names = np.array([phase or "" for phase in phases], dtype=object)
    auto = np.asarray(autonomous, dtype=bool)
    return {
        str(phase): {
            "steps": int((auto & (names == phase)).sum()),
            "p_positive": _mean(indicators[auto & (names == phase)]),
        }
        for phase in sorted(set(names[auto]) - {""})
    }


def expert_phases_of(episode: EpisodeRecord) -> list[str | None] | None:
    """The episode's subtasks when they are the scripted expert's phases, else None."""
    if episode.subtasks is None or episode.metadata.get("subtask_source") != EXPERT_PHASE_SOURCE:
        return None
    return list(episode.subtasks)


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
    advantages = np.concatenate([item.advantages for item in scores])
    truth_runs = {item.episode.run_id for item in scores if item.episode.injected is not None}
    with_truth = np.concatenate(
        [np.full(item.episode.length, item.episode.run_id in truth_runs) for item in scores]
    )
    injected = [
        kind for item in scores if item.episode.run_id in truth_runs for kind in injected_steps(item.episode)
    ]
    phases = [expert_phases_of(item.episode) for item in scores]
    by_phase = (
        phase_figures(
            np.concatenate([item.indicators for item, p in zip(scores, phases, strict=True) if p]),
            np.concatenate([a for a, p in zip(autonomous, phases, strict=True) if p]),
            [name for p in phases if p for name in p],
        )
        if any(phases)
        else None
    )
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
        **value_figures(scores),
        **ground_truth_figures(advantages[with_truth], indicator[with_truth], auto[with_truth], injected),
        "p_positive_by_phase": by_phase,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def sanity_failures(name: str, figures: dict[str, Any], floor: SanityFloor) -> list[str]:
    """Which floors a group misses: the label-vs-outcome and value checks on groups with both successes and
    failures, the ground-truth check on groups with injected steps."""
    checks = []
    if figures["successes"] and figures["failures"]:
        checks += [
            ("positive_gap", floor.min_positive_gap),
            ("value_episode_rank", floor.min_value_episode_rank),
            ("first_step_value_auc", floor.min_first_step_auc),
            ("value_return_correlation", floor.min_value_correlation),
        ]
    if figures.get("injected_steps"):
        checks.append(("label_auc", floor.min_label_auc))
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
