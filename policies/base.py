"""The policy contract every flywheel policy implements: batched observations in, action chunks out.

Kept tiny on purpose (as in openpi): a policy is anything with ``infer``, ``reset``, a ``version`` and an
``action_horizon``. Recording, serving and chunk brokering are wrappers around this contract, not model code.
The observation and action-chunk types are ``core.types``'s (re-exported here).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from core.types import ActionChunk, Observation, ObservationBatch

__all__ = [
    "ActionChunk",
    "Observation",
    "ObservationBatch",
    "PerEnvPolicy",
    "Policy",
    "batch_size",
    "stack_observations",
]


def stack_observations(observations: list[Observation]) -> ObservationBatch:
    """Stack single observations (same cameras, same shapes) into one batch."""
    if not observations:
        raise ValueError("stack_observations needs at least one observation")
    cameras = sorted(observations[0]["images"])
    for index, obs in enumerate(observations):
        if sorted(obs["images"]) != cameras:
            raise ValueError(f"observation {index} has cameras {sorted(obs['images'])}, expected {cameras}")
    batch = ObservationBatch(
        images={cam: np.stack([obs["images"][cam] for obs in observations]) for cam in cameras},
        state=np.stack([np.asarray(obs["state"], dtype=np.float32) for obs in observations]),
        prompt=[obs["prompt"] for obs in observations],
    )
    if all("privileged" in obs for obs in observations):
        batch["privileged"] = np.stack([obs["privileged"] for obs in observations])
    return batch


def batch_size(batch: ObservationBatch) -> int:
    """Number of observations in a batch."""
    return len(batch["prompt"])


@runtime_checkable
class Policy(Protocol):
    """A batched chunking policy.

    ``version`` identifies the weights (recorded on every step), ``action_horizon`` is H, ``action_dim`` is D.
    ``infer`` maps a batch to an ``ActionChunk``; ``reset`` clears per-episode state.
    """

    version: str
    action_horizon: int
    action_dim: int

    def infer(self, batch: ObservationBatch) -> ActionChunk: ...

    def reset(self) -> None: ...


@runtime_checkable
class PerEnvPolicy(Policy, Protocol):
    """A policy with state per env (RLT's hand-off): the rollout worker names each row's env and resets one env
    at a time instead of calling ``infer`` and ``reset``; a new version published mid-episode takes over the
    state of the one it replaces. A policy with ``info_keys`` (a tuple of names) also gets, per row, those
    entries of the env info that came with the row's observation (``infos``; else None)."""

    def infer_envs(
        self, batch: ObservationBatch, envs: list[int], infos: list[dict[str, Any]] | None = None
    ) -> ActionChunk: ...

    def reset_env(self, env: int) -> None: ...

    def take_over(self, previous: Policy) -> None: ...
