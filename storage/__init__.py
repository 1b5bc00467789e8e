"""flywheel: storage — the experience store (the only code that touches SQL) and its record types."""

from storage.records import (
    EpisodeLabels,
    EpisodeRecord,
    EpisodeSummary,
    EpisodeValidationError,
    InterventionSegment,
    Outcome,
    RelabelRecord,
    StepSource,
)
from storage.sampling import EpisodeArrays, ReplayIndex, TransitionBatch
from storage.store import (
    EpisodeConflictError,
    EvaluationSummary,
    ExperienceStore,
    NotFoundError,
    SchemaNotReadyError,
    StoreError,
    UnknownPolicyVersionError,
)

__all__ = [
    "EpisodeArrays",
    "EpisodeConflictError",
    "EpisodeLabels",
    "EpisodeRecord",
    "EpisodeSummary",
    "EpisodeValidationError",
    "EvaluationSummary",
    "ExperienceStore",
    "InterventionSegment",
    "NotFoundError",
    "Outcome",
    "RelabelRecord",
    "ReplayIndex",
    "SchemaNotReadyError",
    "StepSource",
    "StoreError",
    "TransitionBatch",
    "UnknownPolicyVersionError",
]
