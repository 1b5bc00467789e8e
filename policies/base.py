"""The policy contract every flywheel policy implements: batched observations in, action chunks out.

Kept tiny on purpose (as in openpi): a policy is anything with ``infer``, ``reset``, a ``version`` and an
``action_horizon``. Recording, serving and chunk brokering are wrappers around this contract, not model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NotRequired, Protocol, TypedDict, runtime_checkable

import numpy as np


class Observation(TypedDict):
    """One time step as a policy sees it.

    ``images`` maps a camera name to an ``H×W×3`` ``uint8`` array (correct orientation), ``state`` is the
    proprioceptive vector (``float32``), ``prompt`` the natural-language instruction. ``privileged`` is the
    simulator's full state (Meta-World's 39-D vector): only scripted experts and simulated humans read it, it is
    never sent over the wire and learned policies never see it.
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: str
    privileged: NotRequired[np.ndarray]


class ObservationBatch(TypedDict):
    """A batch of observations: ``images[camera]`` is ``B×H×W×3``, ``state`` is ``B×S``, ``prompt`` a list of B."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: list[str]
    privileged: NotRequired[np.ndarray]


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


@dataclass
class ActionChunk:
    """What a policy returns for a batch: ``actions`` is ``B×H×D`` ``float32``.

    ``embeddings`` optionally carries the backbone's final token embeddings (``B×T×E``, used by RLT) and
    ``timing`` carries named durations in milliseconds (e.g. ``infer_ms``).
    """

    actions: np.ndarray
    embeddings: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.actions.ndim != 3:
            raise ValueError(f"ActionChunk.actions must be B×H×D, got shape {self.actions.shape}")


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
