"""What a checkpoint directory holds: ``policy.json`` = ``{"kind": "vla" | "hierarchical" | "rlt"}``.

Every checkpoint writer (``policies.checkpoint``, ``policies.hierarchical``, ``rlt.checkpoint``) writes it with
:func:`write_kind`; :func:`checkpoint_kind` is the one reader, and the policy loader
(``experiments.policy_loader``) dispatches on what it returns. Directories written before the manifest existed
are recognised by the files their format always had (:data:`LEGACY_MARKERS`).
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "policy.json"
VLA_KIND, HIERARCHICAL_KIND, RLT_KIND = "vla", "hierarchical", "rlt"
CHECKPOINT_KINDS = (VLA_KIND, HIERARCHICAL_KIND, RLT_KIND)
#: A file each kind's directories had before ``policy.json``, most specific first (those formats are frozen).
LEGACY_MARKERS = (
    (RLT_KIND, "rlt.json"),
    (HIERARCHICAL_KIND, "subtask_model.json"),
    (VLA_KIND, "config.json"),
)


class ManifestError(ValueError):
    """A ``policy.json`` that is unreadable or names no known kind (one line naming the file)."""


def write_kind(directory: str | Path, kind: str) -> None:
    """Record that ``directory`` holds a checkpoint of ``kind``."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    (Path(directory) / MANIFEST).write_text(json.dumps({"kind": kind}) + "\n")


def checkpoint_kind(directory: str | Path) -> str | None:
    """The kind of checkpoint in ``directory``: its manifest's, else what its files show; None if neither."""
    path = Path(directory)
    file = path / MANIFEST
    if not file.is_file():
        return next((kind for kind, marker in LEGACY_MARKERS if (path / marker).is_file()), None)
    try:
        kind = json.loads(file.read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as error:
        raise ManifestError(f"{file}: not a JSON object with a 'kind' ({error})") from None
    if kind not in CHECKPOINT_KINDS:
        raise ManifestError(f"{file}: kind {kind!r} is not one of {', '.join(CHECKPOINT_KINDS)}")
    return kind
