"""Evaluate a policy in its env: success rate with a 95% interval, episode length, and success throughput."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from actors.rollout import RolloutWorker
from envs import EnvConfig, GymEnvConfig, make_env
from policies.base import Policy
from storage import EpisodeRecord, Outcome


@dataclass(frozen=True)
class EvalResult:
    """Evaluation of one policy on one task over ``n`` fresh episodes."""

    task: str
    policy_version: str
    n: int
    successes: int
    ci_low: float
    ci_high: float
    mean_length: float
    mean_success_length: float
    successes_per_hour: float
    mean_return: float = 0.0

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes."""
        return self.successes / self.n if self.n else 0.0

    def as_metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for the store and MLflow)."""
        return {k: float(v) for k, v in asdict(self).items() if isinstance(v, int | float)} | {
            "success_rate": self.success_rate
        }

    def as_row(self) -> dict[str, object]:
        """The figures a results table reports (JSON-able; the interval as ``ci95``)."""
        return {
            "successes": self.successes,
            "n": self.n,
            "success_rate": self.success_rate,
            "ci95": [self.ci_low, self.ci_high],
            "mean_length": self.mean_length,
            "mean_success_length": self.mean_success_length,
            "successes_per_hour": self.successes_per_hour,
        }


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0 and n)."""
    if n == 0:
        return 0.0, 1.0
    z = scipy_stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(
    episodes: list[EpisodeRecord], task: str, policy_version: str, control_hz: float = 10.0
) -> EvalResult:
    """Success rate, Wilson 95% interval, lengths, successes per hour of robot time (at ``control_hz``) and the
    mean undiscounted return (the figure for an env whose success is rare or undeclared)."""
    successes = sum(e.outcome == Outcome.SUCCESS for e in episodes)
    lengths = np.array([e.length for e in episodes], dtype=float)
    success_lengths = np.array([e.length for e in episodes if e.outcome == Outcome.SUCCESS], dtype=float)
    robot_hours = lengths.sum() / control_hz / 3600.0
    low, high = wilson_interval(successes, len(episodes))
    return EvalResult(
        task=task,
        policy_version=policy_version,
        n=len(episodes),
        successes=int(successes),
        ci_low=low,
        ci_high=high,
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        mean_success_length=float(success_lengths.mean()) if len(success_lengths) else float("nan"),
        successes_per_hour=successes / robot_hours if robot_hours > 0 else 0.0,
        mean_return=float(np.mean([e.rewards.sum() for e in episodes])) if episodes else 0.0,
    )


def evaluate(
    policy: Policy,
    env_config: EnvConfig | GymEnvConfig,
    episodes: int,
    *,
    seed: int = 10_000,
    record_images: bool = False,
) -> tuple[EvalResult, list[EpisodeRecord]]:
    """Roll ``policy`` out for ``episodes`` fresh episodes (seeds disjoint from collection by default); the
    records keep their camera frames with ``record_images`` (for videos).

    One env, episodes run to completion one after another: stopping a multi-env worker at a count would drop
    the still-running (longer, more often failing) episodes and bias the success rate upwards.
    """
    records: list[EpisodeRecord] = []
    worker = RolloutWorker(
        [functools.partial(make_env, env_config)],
        policy,
        records.append,
        task=env_config.task,
        seed=seed,
        record_images=record_images,
    )
    worker.run(episodes=episodes)
    worker.close()
    return summarize(records, env_config.task, policy.version), records
