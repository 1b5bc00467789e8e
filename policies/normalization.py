"""Per-dimension normalization statistics for states and actions, saved with a checkpoint.

As in LeRobot and openpi, statistics travel with the checkpoint (``norm_stats.json``), never with the config.
Two modes: ``zscore`` ((x − mean) / std) and ``quantile`` (the 1st/99th percentiles map to −1/+1, as in π0-FAST
and π0.5). Inverses are exact for values inside the fitted range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

NormMode = Literal["zscore", "quantile"]
NORM_MODES: tuple[str, ...] = ("zscore", "quantile")
_EPS = 1e-6


class NormalizationError(ValueError):
    """Statistics that cannot be computed, loaded or applied (one line naming the field)."""


@dataclass(frozen=True)
class DimStats:
    """Statistics of one array's last dimension: mean, std and the 1st/99th percentiles (each shape ``(D,)``)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @property
    def dim(self) -> int:
        """Number of dimensions D."""
        return int(self.mean.shape[0])

    @classmethod
    def compute(cls, values: np.ndarray, name: str = "values") -> DimStats:
        """Compute statistics over every axis but the last of ``values`` (``...×D``), ignoring non-finite rows."""
        array = np.asarray(values, dtype=np.float64)
        if array.ndim < 1 or array.shape[-1] == 0:
            raise NormalizationError(
                f"{name}: expected an array of shape (..., D) with D > 0, got {array.shape}"
            )
        flat = array.reshape(-1, array.shape[-1])
        flat = flat[np.isfinite(flat).all(axis=1)]
        if flat.shape[0] == 0:
            raise NormalizationError(f"{name}: expected at least one finite row, got none")
        return cls(
            mean=flat.mean(axis=0).astype(np.float32),
            std=flat.std(axis=0).astype(np.float32),
            q01=np.quantile(flat, 0.01, axis=0).astype(np.float32),
            q99=np.quantile(flat, 0.99, axis=0).astype(np.float32),
        )

    def normalize(self, values: np.ndarray, mode: NormMode) -> np.ndarray:
        """Map raw values to the normalized space (``quantile``: 1st/99th percentile → −1/+1, not clipped)."""
        values = np.asarray(values, dtype=np.float32)
        self._check_dim(values)
        if mode == "zscore":
            return (values - self.mean) / (self.std + _EPS)
        low, high = self.q01, self.q99
        return 2.0 * (values - low) / np.maximum(high - low, _EPS) - 1.0

    def unnormalize(self, values: np.ndarray, mode: NormMode) -> np.ndarray:
        """Inverse of :meth:`normalize`."""
        values = np.asarray(values, dtype=np.float32)
        self._check_dim(values)
        if mode == "zscore":
            return values * (self.std + _EPS) + self.mean
        low, high = self.q01, self.q99
        return (values + 1.0) / 2.0 * np.maximum(high - low, _EPS) + low

    def _check_dim(self, values: np.ndarray) -> None:
        if values.shape[-1] != self.dim:
            raise NormalizationError(f"values: expected last dimension {self.dim}, got shape {values.shape}")

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready lists."""
        return {key: getattr(self, key).astype(float).tolist() for key in ("mean", "std", "q01", "q99")}

    @classmethod
    def from_dict(cls, data: dict, name: str) -> DimStats:
        """Inverse of :meth:`to_dict`; every field must be present, finite and of the same length."""
        fields = {}
        for key in ("mean", "std", "q01", "q99"):
            if key not in data:
                raise NormalizationError(f"{name}.{key}: missing")
            array = np.asarray(data[key], dtype=np.float32)
            if array.ndim != 1 or not np.isfinite(array).all():
                raise NormalizationError(f"{name}.{key}: expected a finite 1-D list, got {data[key]!r:.80}")
            fields[key] = array
        dims = {key: array.shape[0] for key, array in fields.items()}
        if len(set(dims.values())) != 1:
            raise NormalizationError(f"{name}: expected equal lengths for mean/std/q01/q99, got {dims}")
        return cls(**fields)


@dataclass(frozen=True)
class NormalizationStats:
    """Statistics for the proprioceptive state and the actions, plus the normalization mode applied to both."""

    state: DimStats
    actions: DimStats
    mode: NormMode = "quantile"

    @classmethod
    def compute(
        cls, states: np.ndarray, actions: np.ndarray, mode: NormMode = "quantile"
    ) -> NormalizationStats:
        """Compute from raw arrays: ``states`` is ``...×S``, ``actions`` is ``...×D`` (steps or chunks)."""
        if mode not in NORM_MODES:
            raise NormalizationError(f"mode: expected one of {NORM_MODES}, got {mode!r}")
        return cls(DimStats.compute(states, "state"), DimStats.compute(actions, "actions"), mode)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"mode": self.mode, "state": self.state.to_dict(), "actions": self.actions.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> NormalizationStats:
        """Inverse of :meth:`to_dict` with validation."""
        mode = data.get("mode")
        if mode not in NORM_MODES:
            raise NormalizationError(f"mode: expected one of {NORM_MODES}, got {mode!r}")
        for key in ("state", "actions"):
            if not isinstance(data.get(key), dict):
                raise NormalizationError(f"{key}: missing or not an object")
        return cls(
            DimStats.from_dict(data["state"], "state"), DimStats.from_dict(data["actions"], "actions"), mode
        )

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NormalizationStats:
        """Read JSON written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise NormalizationError(f"{path}: cannot read normalization statistics ({error})") from error
        if not isinstance(data, dict):
            raise NormalizationError(f"{path}: expected a JSON object")
        return cls.from_dict(data)
