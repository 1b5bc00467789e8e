"""Where the embedded defaults live: one folder (``$FLYWHEEL_HOME``, else ``./flywheel-data``) holding the SQLite
experience store, the local MLflow store and policy checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from experiments.validation import UserError


def flywheel_home() -> Path:
    """The data folder of the embedded defaults (created on first use)."""
    home = Path(os.environ.get("FLYWHEEL_HOME", "flywheel-data")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_store_url() -> str:
    """The embedded experience store: a SQLite file in the data folder."""
    return f"sqlite:///{flywheel_home() / 'experience.db'}"


def default_mlflow_uri() -> str:
    """The MLflow tracking store when none is configured: ``$MLFLOW_TRACKING_URI`` (MLflow's own variable),
    else the embedded one, a SQLite file beside the experience store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{flywheel_home() / 'mlflow.db'}"


def checkpoints_dir() -> Path:
    """Where trained policies are saved."""
    path = flywheel_home() / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable_folder(path: Path, name: str) -> None:
    """Raise ``UserError`` naming ``name`` unless ``path`` is a folder, or can be created as one, that this
    process can write in. Creates nothing (a probe folder is made and removed in the nearest existing one)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{name} {path}: {existing} is a file, expected a folder")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise UserError(f"{name} {path}: cannot write in {existing} ({error.strerror or error})") from None
