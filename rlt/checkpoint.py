"""An RLT checkpoint directory: the chunked actor-critic, the frozen RL token and a JSON manifest.

Layout: ``actor_critic.safetensors`` (``ChunkedTD3.save_checkpoint``), ``rl_token.safetensors``
(``RLToken.save``) and ``rlt.json`` (task, prior version, hand-off, evaluation, anything the caller adds).
``deployment_of`` reads, from either writer's manifest (``flywheel rlt`` or the pipeline's RLT stage), what is
needed to rebuild the deployed policy: the task, the prior (a version, or a scripted expert with its noise and
seed) and the hand-off.
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

from rlt.errors import RLTInputError
from rlt.phase import PhaseSwitch, metaworld_switch
from rlt.rl_token import RLToken
from rlt.td3 import ChunkedTD3

LEARNER_FILE, TOKEN_FILE, MANIFEST_FILE = "actor_critic.safetensors", "rl_token.safetensors", "rlt.json"


@dataclass
class RLTCheckpoint:
    """A loaded RLT checkpoint: learner (empty replay), frozen token and the manifest."""

    learner: ChunkedTD3
    token: RLToken
    manifest: dict[str, Any]


@dataclass(frozen=True)
class RLTDeployment:
    """How to rebuild a saved RLT policy: its task, its prior and the hand-off to the actor.

    ``prior_version`` is a store version, or the scripted expert's version when ``scripted_noise`` is set (the
    scripted prior's embeddings are a projection of the privileged state seeded with ``seed``). ``handoff`` is a
    ``rlt.phase.METAWORLD_PAIRS`` pair; ``handoff_distance <= 0`` means the actor acts from the first chunk.
    """

    task: str
    prior_version: str
    scripted_noise: float | None
    seed: int
    handoff: str
    handoff_distance: float

    def switch(self) -> PhaseSwitch:
        """The phase switch that hands off to the actor."""
        return metaworld_switch(self.handoff, self.handoff_distance)


def deployment_of(manifest: dict[str, Any]) -> RLTDeployment:
    """The deployment a manifest describes, from the pipeline's layout (``prior`` {version, scripted_noise,
    seed} + ``settings``) or ``flywheel rlt``'s (``prior``, ``prior_spec``, ``prior_noise``, ``seed``,
    ``handoff`` {pair, distance})."""
    try:
        if isinstance(manifest["prior"], dict):
            prior, settings = manifest["prior"], manifest["settings"]
            always = settings["handoff"] == "always"
            return RLTDeployment(
                manifest["task"],
                prior["version"],
                prior["scripted_noise"],
                prior["seed"],
                "hand-object" if always else settings["handoff"],
                0.0 if always else settings["handoff_distance"],
            )
        scripted = manifest["prior_spec"] == "scripted"
        return RLTDeployment(
            manifest["task"],
            manifest["prior"],
            manifest["prior_noise"] if scripted else None,
            manifest["seed"],
            manifest["handoff"]["pair"],
            manifest["handoff"]["distance"],
        )
    except KeyError as error:
        raise RLTInputError(
            f"RLT manifest: missing {error.args[0]!r} (written by an older flywheel?)"
        ) from None


def save_rlt_checkpoint(
    directory: str | Path, learner: ChunkedTD3, token: RLToken, manifest: dict[str, Any]
) -> Path:
    """Write the checkpoint atomically to ``directory`` (which must not exist yet); return its path."""
    target = Path(directory)
    if target.exists():
        raise RLTInputError(f"checkpoint directory {target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        learner.save_checkpoint(staging / LEARNER_FILE)
        token.save(staging / TOKEN_FILE)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
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
