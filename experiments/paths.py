"""Where the embedded defaults live: one folder (``$FLYWHEEL_HOME``, else ``./flywheel-data``) holding the SQLite
experience store, the local MLflow store and policy checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def flywheel_home() -> Path:
    """The data folder of the embedded defaults (created on first use)."""
    home = Path(os.environ.get("FLYWHEEL_HOME", "flywheel-data")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_store_url() -> str:
    """The embedded experience store: a SQLite file in the data folder."""
    return f"sqlite:///{flywheel_home() / 'experience.db'}"


def default_mlflow_uri() -> str:
    """The embedded MLflow tracking store: a SQLite file beside the experience store."""
    return f"sqlite:///{flywheel_home() / 'mlflow.db'}"


def checkpoints_dir() -> Path:
    """Where trained policies are saved."""
    path = flywheel_home() / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path
