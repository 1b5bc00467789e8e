"""Real-Time Chunking over the wire: flywheel's optional ``rtc`` request field.

A client that executes chunks asynchronously adds to its observation message::

    "rtc": {"prev_chunk": K×D float32 (the unexecuted rest of the chunk it is executing, index 0 = the action
            for the step the observation was taken at), "delay": d (steps until the reply will be used),
            "execute_horizon": s (optional; default H − K)}

or, instead of ``delay``/``execute_horizon``, explicit soft-mask ``"weights"`` (K floats in [0, 1], as
``policies.rtc.InpaintingTargets`` carries them; a rollout's RTC schedule sends these).

A flywheel server whose policy supports inpainting (:func:`policies.rtc.supports_inpainting`) samples the
chunk by RTC inpainting toward ``prev_chunk`` (padded with its last action to ``H``; weights as given, padded
with zeros, or :func:`policies.rtc.rtc_weights` with ``d`` clamped to ``H − s``) and answers ``"rtc": true``;
otherwise it
answers ``"rtc": false`` and samples as usual. openpi servers ignore unknown keys, so the field is safe to
send to any openpi-compatible server. ``policies.rtc`` (torch) is imported on use, so clients stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.base import Policy
from policies.serving.observations import ObservationError

if TYPE_CHECKING:
    from policies.rtc import InpaintingTargets

RTC_FIELD = "rtc"


@dataclass(frozen=True)
class RTCRequest:
    """What a client sends in the ``rtc`` field: the unexecuted actions and either the expected delay in
    steps (with an optional execution horizon) or explicit soft-mask ``weights`` (one per action)."""

    prev_chunk: np.ndarray
    delay: int | None = None
    execute_horizon: int | None = None
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.delay is None) == (self.weights is None):
            raise ValueError("RTCRequest: give either delay or weights")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able ``rtc`` field."""
        wire: dict[str, Any] = {"prev_chunk": np.ascontiguousarray(self.prev_chunk, dtype=np.float32)}
        if self.weights is not None:
            wire["weights"] = np.ascontiguousarray(self.weights, dtype=np.float32)
        if self.delay is not None:
            wire["delay"] = int(self.delay)
        if self.execute_horizon is not None:
            wire["execute_horizon"] = int(self.execute_horizon)
        return wire


def can_inpaint(policy: Policy) -> bool:
    """Whether ``policy`` can sample chunks by RTC inpainting."""
    from policies.rtc import supports_inpainting

    return supports_inpainting(policy)


def targets_from_wire(value: Any, horizon: int, action_dim: int) -> InpaintingTargets:
    """Validate an ``rtc`` field and turn it into one row of inpainting targets for an ``H×D`` policy."""
    from policies.rtc import InpaintingTargets, rtc_weights

    if not isinstance(value, dict):
        raise ObservationError(f"rtc: expected a map with prev_chunk and delay, got {type(value).__name__}")
    prev = value.get("prev_chunk")
    if not isinstance(prev, np.ndarray) or prev.ndim != 2 or prev.dtype.kind != "f":
        got = f"{prev.dtype} {prev.shape}" if isinstance(prev, np.ndarray) else type(prev).__name__
        raise ObservationError(f"rtc.prev_chunk: expected a K×{action_dim} float array, got {got}")
    if not 1 <= prev.shape[0] <= horizon or prev.shape[1] != action_dim or not np.isfinite(prev).all():
        raise ObservationError(
            f"rtc.prev_chunk: shape {prev.shape}, expected (K, {action_dim}) with 1 ≤ K ≤ {horizon}, finite"
        )
    padded = prev[np.minimum(np.arange(horizon), prev.shape[0] - 1)].astype(np.float32)
    if "weights" in value:
        weights = np.zeros(horizon, np.float32)
        weights[: prev.shape[0]] = _given_weights(value["weights"], prev.shape[0])
        return InpaintingTargets(padded[None], weights[None])
    default_steps = max(1, horizon - prev.shape[0])
    delay = _non_negative_int(value, "delay", None)
    steps = _non_negative_int(value, "execute_horizon", default_steps)
    if not 1 <= steps <= horizon:
        raise ObservationError(f"rtc.execute_horizon: expected 1 ≤ s ≤ {horizon}, got {steps}")
    weights = rtc_weights(horizon, min(delay, horizon - steps), steps)
    return InpaintingTargets(padded[None], weights[None])


def _given_weights(weights: Any, length: int) -> np.ndarray:
    is_floats = isinstance(weights, np.ndarray) and weights.dtype.kind == "f"
    if not is_floats or weights.shape != (length,) or not ((weights >= 0) & (weights <= 1)).all():
        got = (
            f"{weights.dtype} {weights.shape}" if isinstance(weights, np.ndarray) else type(weights).__name__
        )
        raise ObservationError(f"rtc.weights: expected {length} floats in [0, 1] (one per action), got {got}")
    return weights


def _non_negative_int(value: dict, name: str, default: int | None) -> int:
    number = value.get(name, default)
    if isinstance(number, bool) or not isinstance(number, int | np.integer) or number < 0:
        raise ObservationError(f"rtc.{name}: expected an int ≥ 0, got {number!r:.40}")
    return int(number)
