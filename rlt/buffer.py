"""Chunk-level replay for RLT, on SB3's ``ReplayBuffer`` storage and sample types.

One entry is one executed action chunk: ``(x, ã, a, R, x', ã', done, γ^k)`` where ``x`` is the RL state
(``z_rl`` ‖ proprio), ``ã`` the VLA's reference chunk, ``a`` the executed chunk, ``R = Σ_{j<k} γ^j r_j`` the
discounted reward of the ``k`` steps up to the bootstrap (``k ≤ C``; up to ``n·C`` with n-step returns), and
``γ^k`` the bootstrap discount. Observations are stored as ``x ‖ flatten(ã)`` (the actor's input); the critic
reads only the ``x`` part. A human intervention replaces ``ã`` with the executed (human) actions: the whole
chunk (``human_mask="chunk"``) or only the rows of the human steps (``"step"``, from ``ChunkTransition.human``).
Samples come back as SB3 ``ReplayBufferSamples`` with ``discounts`` filled, so
``target = R + (1 − terminated) · γ^k · Q'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from rlt.errors import NonChunkActionError, RLTInputError


def chunk_backup(step_rewards: np.ndarray, gamma: float) -> tuple[float, float]:
    """Discounted reward of the executed steps of a chunk and the bootstrap discount: ``(Σ γ^j r_j, γ^k)``."""
    rewards = np.asarray(step_rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0:
        raise RLTInputError(f"step_rewards: expected a non-empty 1-D array, got shape {rewards.shape}")
    discounts = gamma ** np.arange(rewards.size)
    return float(np.sum(discounts * rewards)), float(gamma**rewards.size)


@dataclass(frozen=True)
class ChunkTransition:
    """One chunk-level transition (see the module docstring); arrays are float32, chunks ``C×D``."""

    state: np.ndarray
    reference: np.ndarray
    action: np.ndarray
    reward: float
    next_state: np.ndarray
    next_reference: np.ndarray
    terminated: bool
    discount: float
    intervened: bool = False
    human: np.ndarray | None = None
    """Per-step ``C`` bool mask of the human steps (None: every step if ``intervened``, else none)."""


class ChunkReplayBuffer(ReplayBuffer):
    """SB3 replay buffer whose entries are chunk transitions; add with ``add_chunk``."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        device: Any = "cpu",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        *,
        state_dim: int,
        chunk_size: int,
        action_dim: int,
    ) -> None:
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=False,
        )
        if observation_space.shape != (state_dim + chunk_size * action_dim,):
            raise RLTInputError(
                f"observation_space: expected shape ({state_dim + chunk_size * action_dim},) "
                f"(state_dim + C·D), got {observation_space.shape}"
            )
        self.state_dim = state_dim
        self.chunk_shape = (chunk_size, action_dim)
        self.discounts = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.interventions = np.zeros((self.buffer_size, self.n_envs), dtype=bool)

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Step-level adds are not meaningful here: use ``add_chunk``."""
        raise TypeError("ChunkReplayBuffer stores chunk transitions: call add_chunk(ChunkTransition)")

    def add_chunk(self, transition: ChunkTransition, human_mask: str = "chunk") -> None:
        """Validate and store one chunk transition; an intervention stores the human's actions as ``ã`` too
        (the whole chunk, or with ``human_mask="step"`` only the rows ``transition.human`` marks)."""
        reference = action = self._check_chunk("action", transition.action)
        if not transition.intervened:
            reference = self._check_chunk("reference", transition.reference)
        elif human_mask == "step" and transition.human is not None:
            mask = np.asarray(transition.human, bool).reshape(-1, 1)
            reference = np.where(mask, action, self._check_chunk("reference", transition.reference))
        next_reference = self._check_chunk("next_reference", transition.next_reference)
        state = self._check_state("state", transition.state)
        next_state = self._check_state("next_state", transition.next_state)
        for name in ("reward", "discount"):
            if not np.isfinite(getattr(transition, name)):
                raise RLTInputError(f"{name}: expected a finite float, got {getattr(transition, name)}")
        self.observations[self.pos, 0] = np.concatenate([state, reference.ravel()])
        self.next_observations[self.pos, 0] = np.concatenate([next_state, next_reference.ravel()])
        self.actions[self.pos, 0] = action.ravel()
        self.rewards[self.pos, 0] = transition.reward
        self.dones[self.pos, 0] = float(transition.terminated)
        self.discounts[self.pos, 0] = transition.discount
        self.interventions[self.pos, 0] = transition.intervened
        self.pos = (self.pos + 1) % self.buffer_size
        self.full = self.full or self.pos == 0

    def split(self, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split stored observations ``N×(S + C·D)`` into states ``N×S`` and reference chunks ``N×C×D``."""
        return observations[..., : self.state_dim], observations[..., self.state_dim :].reshape(
            *observations.shape[:-1], *self.chunk_shape
        )

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> ReplayBufferSamples:
        data = (
            self.observations[batch_inds, 0],
            self.actions[batch_inds, 0],
            self.next_observations[batch_inds, 0],
            self.dones[batch_inds, 0].reshape(-1, 1),
            self.rewards[batch_inds, 0].reshape(-1, 1),
            self.discounts[batch_inds, 0].reshape(-1, 1),
        )
        return ReplayBufferSamples(*tuple(map(self.to_torch, data)))

    def _check_chunk(self, name: str, chunk: np.ndarray) -> np.ndarray:
        array = np.asarray(chunk, dtype=np.float32)
        if array.shape != self.chunk_shape:
            raise NonChunkActionError(
                f"{name}: expected a chunk of shape {self.chunk_shape} (C×D), got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise RLTInputError(f"{name}: expected finite values, got NaN/inf")
        return array

    def _check_state(self, name: str, state: np.ndarray) -> np.ndarray:
        array = np.asarray(state, dtype=np.float32)
        if array.shape != (self.state_dim,):
            raise RLTInputError(f"{name}: expected shape ({self.state_dim},), got {array.shape}")
        if not np.isfinite(array).all():
            raise RLTInputError(f"{name}: expected finite values, got NaN/inf")
        return array
