"""flywheel: storage — the experience store (the only code that touches SQL) and its record types.

Names are imported on first use (``from storage import ExperienceStore`` loads sqlalchemy then; ``from storage
import Outcome`` does not, it is ``core.types``'s), so importing a module that only names storage types stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name → the module that defines it.
_HOMES: dict[str, str] = {
    "EpisodeConflictError": "storage.errors",
    "NotFoundError": "storage.errors",
    "RunFullError": "storage.errors",
    "SchemaNotReadyError": "storage.errors",
    "StoreError": "storage.errors",
    "StoreUnavailableError": "storage.errors",
    "StoreURLError": "storage.errors",
    "UnknownPolicyVersionError": "storage.errors",
    "EvaluationSummary": "storage.evaluations",
    "EpisodeLabels": "storage.records",
    "EpisodeQuery": "storage.records",
    "EpisodeRecord": "storage.records",
    "EpisodeSummary": "storage.records",
    "EpisodeValidationError": "storage.records",
    "RelabelRecord": "storage.records",
    "InterventionSegment": "core.types",
    "Outcome": "core.types",
    "StepSource": "core.types",
    "StepArrays": "storage.sampling",
    "ReplayIndex": "storage.sampling",
    "TransitionBatch": "storage.sampling",
    "ExperienceStore": "storage.store",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its home module on first use (then it is a plain attribute)."""
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'storage' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value

