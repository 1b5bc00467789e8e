"""flywheel: storage — the experience store (the only code that touches SQL) and its record types."""

from storage.errors import (
    EpisodeConflictError,
    NotFoundError,
    RunFullError,
    SchemaNotReadyError,
    StoreError,
    StoreUnavailableError,
    StoreURLError,
    UnknownPolicyVersionError,
)
from storage.evaluations import EvaluationSummary
from storage.records import (
    EpisodeLabels,
    EpisodeQuery,
    EpisodeRecord,
    EpisodeSummary,
    EpisodeValidationError,
    InterventionSegment,
    Outcome,
    RelabelRecord,
    StepSource,
)
from storage.sampling import EpisodeArrays, ReplayIndex, TransitionBatch
from storage.store import ExperienceStore

__all__ = [
    "EpisodeArrays",
    "EpisodeConflictError",
    "EpisodeLabels",
    "EpisodeQuery",
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
    "RunFullError",
    "SchemaNotReadyError",
    "StepSource",
    "StoreError",
    "StoreURLError",
    "StoreUnavailableError",
    "TransitionBatch",
    "UnknownPolicyVersionError",
]
