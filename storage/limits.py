"""The store's column limits, in one place: ``storage.schema`` declares its columns with them and
``storage.records`` validates against them. This module imports nothing, so validating a record (as the robot's
spool does before it encodes) loads no sqlalchemy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ColumnLimit:
    """What one column holds: ``length`` characters at most (a string column) or a signed ``bits``-bit integer."""

    column: str
    length: int | None = None
    bits: int | None = None


RUN_ID = ColumnLimit("runs.id", length=128)
POLICY_VERSION = ColumnLimit("policy_versions.version", length=256)
TASK = ColumnLimit("episodes.task", length=256)
ENV_ID = ColumnLimit("episodes.env_id", length=256)
SEED = ColumnLimit("episodes.seed", bits=64)
SUBTASK = ColumnLimit("steps.subtask", length=256)
INJECTED = ColumnLimit("steps.injected", length=64)
CAMERA = ColumnLimit("step_images.camera", length=64)
TRIGGER = ColumnLimit("interventions.trigger", length=128)
RELABEL_ID = ColumnLimit("relabels.id", length=64)
RELABEL_METHOD = ColumnLimit("relabels.method", length=64)
VALUE_MODEL_VERSION = ColumnLimit("relabels.value_model_version", length=256)

#: Every limit above (the storage tests match each against its migrated column).
LIMITS = tuple(value for value in dict(globals()).values() if isinstance(value, ColumnLimit))
