"""The evaluation gate: a candidate policy replaces the deployed one only if it is not worse."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from experiments.evaluation import wilson_interval
from experiments.pipeline_config import GateSettings


class GateDecision(BaseModel):
    """Whether to promote, and why (pooled over tasks); the gate stage's output
    (``experiments.stages.GateOutput``)."""

    model_config = ConfigDict(frozen=True)

    promote: bool
    reason: str
    candidate_rate: float
    candidate_ci: tuple[float, float]
    deployed_rate: float
    deployed_ci: tuple[float, float]


def decide(candidate: tuple[int, int], deployed: tuple[int, int], settings: GateSettings) -> GateDecision:
    """Compare ``(successes, n)`` of the candidate with the deployed policy's under ``settings.rule``."""
    (cand_s, cand_n), (dep_s, dep_n) = candidate, deployed
    cand_rate, dep_rate = cand_s / max(cand_n, 1), dep_s / max(dep_n, 1)
    cand_ci = wilson_interval(cand_s, cand_n, settings.confidence)
    dep_ci = wilson_interval(dep_s, dep_n, settings.confidence)
    floor = dep_rate - settings.margin
    figures = f"candidate {cand_s}/{cand_n} [{cand_ci[0]:.2f}, {cand_ci[1]:.2f}] vs deployed {dep_s}/{dep_n}"
    if settings.rule == "always":
        promote, why = True, "gate rule 'always'"
    elif settings.rule == "point":
        promote = cand_rate >= floor
        why = f"success {cand_rate:.3f} {'≥' if promote else '<'} deployed {dep_rate:.3f} − margin {settings.margin}"
    else:
        promote = cand_ci[1] >= floor
        why = (
            f"upper {settings.confidence:.0%} bound {cand_ci[1]:.3f} {'≥' if promote else '<'} "
            f"deployed {dep_rate:.3f} − margin {settings.margin}"
        )
    verdict = "promoted" if promote else "rejected: worse than deployed"
    return GateDecision(
        promote=promote,
        reason=f"{verdict} ({why}; {figures})",
        candidate_rate=cand_rate,
        candidate_ci=cand_ci,
        deployed_rate=dep_rate,
        deployed_ci=dep_ci,
    )
