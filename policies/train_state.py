"""Resumable training state: one file format for every learner, single-process or one Ray Train worker.

A state file (``torch.save`` of a dict) holds the model, optimizer and scheduler state dicts, the step reached,
every random generator the loop draws from (numpy ``Generator``, torch ``Generator``, torch's global CPU and CUDA
RNG), and learner-specific extras (loss history, replay buffer, ...). Under data parallelism each rank's random
state is kept under its rank, so a resumed worker continues its own streams.

Writes are atomic: the file is written next to its final name and renamed over it, so a process killed mid-write
leaves the previous state intact. Loading maps every tensor to the CPU (:func:`policies.device.load_map`); the
caller moves the model to its device before loading the optimizer, so a state written on a GPU resumes on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.device import load_map

#: The state file's name inside a learner's state directory.
STATE_FILE = "train_state.pt"
#: Bumped when the layout changes; an unknown version is refused rather than half-loaded.
FORMAT_VERSION = 1


class TrainStateError(ValueError):
    """A training state file that cannot be resumed from (one line naming the file and the problem)."""


def capture_rng(rng: np.random.Generator | None, generator: torch.Generator | None) -> dict[str, Any]:
    """Every random state a training loop depends on (this process's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if rng is not None:
        state["numpy"] = rng.bit_generator.state
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(
    state: dict[str, Any], rng: np.random.Generator | None, generator: torch.Generator | None
) -> None:
    """Put back what :func:`capture_rng` recorded."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rng is not None and "numpy" in state:
        rng.bit_generator.state = state["numpy"]
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus the format version) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The state at ``path`` (tensors on the CPU), or None when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=load_map(), weights_only=False)
    except Exception as error:  # a torn or foreign file: say which, do not guess
        raise TrainStateError(f"{path}: unreadable training state ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainStateError(f"{path}: training state format {found!r}, expected {FORMAT_VERSION}")
    return state
