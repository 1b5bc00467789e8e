"""An RLT checkpoint directory: the chunked actor-critic, the frozen RL token and a JSON manifest.

Layout: ``actor_critic.safetensors`` (``ChunkedTD3.save_checkpoint``), ``rl_token.safetensors``
(``RLToken.save``) and ``rlt.json``: the ``deployment`` block (``rlt.deployment.RLTDeployment``: task, prior,
hand-off — what rebuilding the deployed policy needs) plus anything the caller adds (evaluation, history);
``policy.json`` names the kind (``policies.manifest``).
Everything is written to a sibling temporary directory and renamed into place only after every part was
written, so a diverged learner (``CriticDivergedError``) or non-finite token leaves no checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.manifest import RLT_KIND, write_kind
from rlt.deployment import RLTDeployment
from rlt.errors import RLTInputError
from rlt.rl_token import RLToken
from rlt.td3 import ChunkedTD3

LEARNER_FILE, TOKEN_FILE, MANIFEST_FILE = "actor_critic.safetensors", "rl_token.safetensors", "rlt.json"


@dataclass
class RLTCheckpoint:
    """A loaded RLT checkpoint: learner (empty replay), frozen token and the manifest."""

    learner: ChunkedTD3
    token: RLToken
    manifest: dict[str, Any]

    @property
    def deployment(self) -> RLTDeployment:
        """The task, prior and hand-off the policy deploys with."""
        return RLTDeployment.from_manifest(self.manifest)


def save_rlt_checkpoint(
    directory: str | Path,
    learner: ChunkedTD3,
    token: RLToken,
    deployment: RLTDeployment,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically to ``directory`` (which must not exist yet); return its path.

    The manifest is ``manifest`` (extra, caller-defined fields) plus ``deployment``'s block.
    """
    target = Path(directory)
    if target.exists():
        raise RLTInputError(f"checkpoint directory {target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        learner.save_checkpoint(staging / LEARNER_FILE)
        token.save(staging / TOKEN_FILE)
        document = (manifest or {}) | deployment.to_manifest()
        (staging / MANIFEST_FILE).write_text(json.dumps(document, indent=1, sort_keys=True))
        write_kind(staging, RLT_KIND)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_rlt_checkpoint(directory: str | Path) -> RLTCheckpoint:
    """Load a directory written by ``save_rlt_checkpoint``."""
    path = Path(directory)
    missing = [name for name in (LEARNER_FILE, TOKEN_FILE, MANIFEST_FILE) if not (path / name).is_file()]
    if missing:
        raise RLTInputError(f"RLT checkpoint {path}: missing {', '.join(missing)}")
    return RLTCheckpoint(
        ChunkedTD3.load_checkpoint(path / LEARNER_FILE),
        RLToken.load(path / TOKEN_FILE),
        json.loads((path / MANIFEST_FILE).read_text()),
    )
