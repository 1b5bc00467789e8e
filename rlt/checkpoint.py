"""An RLT checkpoint directory: the chunked actor-critic, the frozen RL token and one typed manifest.

Layout: ``actor_critic.safetensors`` (``ChunkedTD3.save_checkpoint``), ``rl_token.safetensors``
(``RLToken.save``) and ``rlt.json``, an ``RLTManifest``: what rebuilding the deployed policy needs (the
``deployment`` block: task, prior, hand-off) and what the run was (settings, env, token shape, env steps, RL
curve, per-episode statistics, final evaluation, critic calibration); ``policy.json`` names the kind
(``policies.manifest``). ``flywheel rlt`` and the pipeline's RLT stage write it through the same stage
(``experiments.pipeline_rlt.run_rlt``), and every reader (the policy loader, a resumed pipeline) reads it with
``read_rlt_manifest``.
Everything is written to a sibling temporary directory and renamed into place only after every part was
written, so a diverged learner (``CriticDivergedError``) or non-finite token leaves no checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from envs.metaworld_env import EnvConfig
from policies.manifest import RLT_KIND, write_kind
from rlt.config import RLTConfig
from rlt.deployment import RLTDeployment
from rlt.diagnostics import CriticCalibration
from rlt.errors import RLTCheckpointError
from rlt.online import EpisodeStats, EvalPoint
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.td3 import ChunkedTD3

LEARNER_FILE, TOKEN_FILE, MANIFEST_FILE = "actor_critic.safetensors", "rl_token.safetensors", "rlt.json"
#: The manifest layout ``read_rlt_manifest`` reads; manifests without it predate the one writer.
MANIFEST_FORMAT = 2


class FinalEvaluation(BaseModel):
    """The prior and the RLT policy on the same ``episodes`` evaluation seeds at the end of the run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    episodes: int
    prior_success: float
    rlt_success: float


class RLTManifest(BaseModel):
    """``rlt.json``: one layout for every RLT checkpoint, whichever command trained it.

    ``env_steps`` counts warm-up and online steps (evaluation excluded); ``stored_episodes`` the stored episodes
    that joined the warm-up; ``updates`` the learner's gradient steps and ``replay_chunks`` its replay's size; ``resumed_from_env_step`` the step an interrupted run continued from (None: it ran
    through). ``curve`` is the RL curve (``online.eval_every_steps``), ``episodes`` every episode's statistics.
    Non-finite numbers (a Spearman correlation of constant values) are written as ``NaN``, as Python's json does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    format: Literal[2] = MANIFEST_FORMAT
    rl_version: str
    deployment: RLTDeployment
    config: RLTConfig
    env: EnvConfig
    token: RLTokenConfig
    env_steps: int
    online_episodes: int
    stored_episodes: int
    updates: int
    replay_chunks: int
    workers: int = 0
    resumed_from_env_step: int | None = None
    curve: list[EvalPoint] = []
    episodes: list[EpisodeStats] = []
    evaluation: FinalEvaluation | None = None
    critic_calibration: CriticCalibration | None = None


@dataclass
class RLTCheckpoint:
    """A loaded RLT checkpoint: learner (empty replay), frozen token and the manifest."""

    learner: ChunkedTD3
    token: RLToken
    manifest: RLTManifest

    @property
    def deployment(self) -> RLTDeployment:
        """The task, prior and hand-off the policy deploys with."""
        return self.manifest.deployment


def save_rlt_checkpoint(
    directory: str | Path, learner: ChunkedTD3, token: RLToken, manifest: RLTManifest
) -> Path:
    """Write the checkpoint atomically to ``directory`` (which must not exist yet); return its path."""
    target = Path(directory)
    if target.exists():
        raise RLTCheckpointError(f"checkpoint directory {target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        learner.save_checkpoint(staging / LEARNER_FILE)
        token.save(staging / TOKEN_FILE)
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=1))
        write_kind(staging, RLT_KIND)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_rlt_manifest(directory: str | Path) -> RLTManifest:
    """The manifest of an RLT checkpoint directory; a missing, older or malformed one is a one-line
    ``RLTCheckpointError`` (an older one says how to rewrite it)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        document: Any = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RLTCheckpointError(f"RLT checkpoint {path.parent}: no readable {MANIFEST_FILE} ({error})") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise RLTCheckpointError(
            f"RLT checkpoint {path.parent}: {MANIFEST_FILE} was written by an older flywheel (expected format "
            f"{MANIFEST_FORMAT}); retrain it with the same `flywheel rlt` command or pipeline iteration"
        )
    try:
        return RLTManifest.model_validate(document)
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise RLTCheckpointError(
            f"RLT checkpoint {path.parent}: {MANIFEST_FILE} {field}: {problem['msg']}"
        ) from None


def load_rlt_checkpoint(directory: str | Path) -> RLTCheckpoint:
    """Load a directory written by ``save_rlt_checkpoint``."""
    path = Path(directory)
    missing = [name for name in (LEARNER_FILE, TOKEN_FILE, MANIFEST_FILE) if not (path / name).is_file()]
    if missing:
        raise RLTCheckpointError(f"RLT checkpoint {path}: missing {', '.join(missing)}")
    manifest = read_rlt_manifest(path)
    return RLTCheckpoint(
        ChunkedTD3.load_checkpoint(path / LEARNER_FILE), RLToken.load(path / TOKEN_FILE), manifest
    )
