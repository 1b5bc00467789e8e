"""Real-Time Chunking (RTC): generate the next action chunk as inpainting toward the chunk still being executed.

With inference delay ``d`` steps and execution horizon ``s``, the first ``d`` actions of the next chunk are
already committed (the robot executes the previous chunk's continuation while inference runs), and the rest of
the overlap should stay close to it so the switch is smooth. During flow denoising the velocity is guided toward
the previous chunk ``Y`` with soft-mask weights ``W`` (ΠGDM guidance, Black et al. 2025)::

    W_i = 1                              for i < d
    W_i = c_i (e^{c_i} − 1) / (e − 1),   c_i = (H − s − i) / (H − s − d + 1),   for d ≤ i < H − s
    W_i = 0                              for i ≥ H − s

    v_guided = v + min(β, (1 − τ) / (τ r²)) · (Y − Â¹)ᵀ diag(W) ∂Â¹/∂A^τ,
    Â¹ = A^τ + (1 − τ) v,   r² = (1 − τ)² / (τ² + (1 − τ)²).

Time convention: τ = 0 is noise and τ = 1 is data, as in the built-in VLA (``policies/vla/model.py``:
``A^τ = τA + (1 − τ)ε``, Euler steps from τ = 0 to 1), which is the convention of the formula above, so it
applies unchanged. At τ = 0 the ratio is infinite and the clip ``β`` applies. Guidance works in the policy's
normalized action space: targets given in raw action units are normalized with ``policy.normalize_actions``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from policies.base import ActionChunk, ObservationBatch, Policy

#: ``guidance(x_tau, tau, velocity_fn) -> velocity`` (the built-in VLA's ``GuidanceFn``).
Guidance = Callable[[torch.Tensor, float, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


class RTCConfigError(ValueError):
    """Inconsistent RTC parameters (one line naming the field and the expected value)."""


def rtc_weights(horizon: int, delay: int, execute_horizon: int) -> np.ndarray:
    """The soft inpainting mask ``W`` (``H`` floats in [0, 1]) for delay ``d`` and execution horizon ``s``."""
    if horizon < 1:
        raise RTCConfigError(f"horizon: expected >= 1, got {horizon}")
    if delay < 0:
        raise RTCConfigError(f"delay: expected >= 0, got {delay}")
    if execute_horizon < 1 or execute_horizon + delay > horizon:
        raise RTCConfigError(
            f"execute_horizon: expected 1 <= s and s + d <= H = {horizon} (d = {delay}), got {execute_horizon}"
        )
    index = np.arange(horizon, dtype=np.float64)
    c = (horizon - execute_horizon - index) / (horizon - execute_horizon - delay + 1)
    decay = c * np.expm1(c) / math.expm1(1.0)
    weights = np.where(index < delay, 1.0, np.where(index < horizon - execute_horizon, decay, 0.0))
    return weights.astype(np.float32)


def guidance_scale(tau: float, beta: float) -> float:
    """ΠGDM's step size ``min(β, (1 − τ) / (τ r²))`` with ``r² = (1 − τ)² / (τ² + (1 − τ)²)``."""
    if tau <= 0.0:
        return beta
    if tau >= 1.0:
        return 0.0
    r2 = (1.0 - tau) ** 2 / (tau**2 + (1.0 - tau) ** 2)
    return min(beta, (1.0 - tau) / (tau * r2))


def inpainting_guidance(targets: torch.Tensor, weights: torch.Tensor, beta: float = 5.0) -> Guidance:
    """RTC guidance toward normalized ``targets`` (``B×H×D``) with per-item weights ``weights`` (``B×H``).

    Rows whose weights are all zero are sampled exactly as without guidance.
    """
    if targets.ndim != 3 or weights.shape != targets.shape[:2]:
        raise RTCConfigError(
            f"weights.shape: expected {tuple(targets.shape[:2])} (B×H of targets), got {tuple(weights.shape)}"
        )
    mask = weights[..., None].to(targets.dtype)

    def guidance(x_tau: torch.Tensor, tau: float, velocity_fn: Callable[[torch.Tensor], torch.Tensor]):
        x = x_tau.detach().requires_grad_(True)
        velocity = velocity_fn(x)
        denoised = x + (1.0 - tau) * velocity
        error = (targets - denoised) * mask
        (correction,) = torch.autograd.grad(denoised, x, grad_outputs=error.detach())
        return velocity.detach() + guidance_scale(tau, beta) * correction

    return guidance


@dataclass
class InpaintingTargets:
    """Per-item RTC targets in raw action units: ``actions`` ``B×H×D`` (Y), ``weights`` ``B×H`` (W), clip β."""

    actions: np.ndarray
    weights: np.ndarray
    beta: float = 5.0

    def __post_init__(self) -> None:
        if self.actions.ndim != 3 or self.weights.shape != self.actions.shape[:2]:
            raise RTCConfigError(
                f"weights.shape: expected {self.actions.shape[:2]} (B×H of actions), got {self.weights.shape}"
            )

    @staticmethod
    def concat(parts: list[InpaintingTargets]) -> InpaintingTargets:
        """Concatenate along the batch axis (β of the first part)."""
        return InpaintingTargets(
            np.concatenate([p.actions for p in parts]),
            np.concatenate([p.weights for p in parts]),
            parts[0].beta,
        )

    def rows(self, start: int, stop: int) -> InpaintingTargets:
        """Items ``start:stop``."""
        return InpaintingTargets(self.actions[start:stop], self.weights[start:stop], self.beta)


def accepts_keyword(policy: Policy, name: str) -> bool:
    """Whether ``policy.infer`` takes the keyword argument ``name``."""
    return name in inspect.signature(policy.infer).parameters


def supports_inpainting(policy: Policy) -> bool:
    """Whether RTC can run on ``policy``: a served policy that forwards targets, or a guidable flow policy."""
    if accepts_keyword(policy, "inpainting"):
        return bool(getattr(policy, "supports_inpainting", True))
    return accepts_keyword(policy, "guidance") and hasattr(policy, "normalize_actions")


def merge_targets(
    parts: list[InpaintingTargets | None], rows: list[int], horizon: int, action_dim: int
) -> InpaintingTargets | None:
    """Targets of requests merged into one batch: each part's rows, all-zero weights (plain sampling) for the
    ``rows[i]`` items of a part without targets; None if no part has some. β of the first part that has some."""
    given = [part for part in parts if part is not None]
    if not given:
        return None

    def plain(count: int) -> InpaintingTargets:
        actions = np.zeros((count, horizon, action_dim), np.float32)
        return InpaintingTargets(actions, np.zeros((count, horizon), np.float32), given[0].beta)

    return InpaintingTargets.concat(
        [plain(count) if part is None else part for part, count in zip(parts, rows, strict=True)]
    )


def infer_with_targets(
    policy: Policy, batch: ObservationBatch, targets: InpaintingTargets | None
) -> ActionChunk:
    """``policy.infer``, or RTC inpainting toward ``targets`` when there are some."""
    return policy.infer(batch) if targets is None else infer_inpainted(policy, batch, targets)


def infer_inpainted(policy: Policy, batch: ObservationBatch, targets: InpaintingTargets) -> ActionChunk:
    """Sample a chunk for ``batch`` with RTC inpainting toward ``targets`` (one row per observation)."""
    if accepts_keyword(policy, "inpainting"):
        return policy.infer(batch, inpainting=targets)
    device = getattr(policy, "device", torch.device("cpu"))
    normalized = torch.as_tensor(
        policy.normalize_actions(targets.actions), dtype=torch.float32, device=device
    )
    weights = torch.from_numpy(targets.weights).to(device)
    guidance = inpainting_guidance(normalized, weights, targets.beta)
    return policy.infer(batch, guidance=guidance)
