"""The RL state ``x = (z_rl, proprio)`` and embedding sources for priors that do not expose embeddings.

The built-in VLA returns its final embeddings in ``ActionChunk.embeddings``; priors that do not (scripted
experts, state-based BC) are wrapped in ``EmbeddingPrior`` with a ``StateProjectionEmbedder`` — a fixed random
projection of the state into ``T×E`` pseudo-tokens — so the RL token and the learner run the same code path
for both.
"""

from __future__ import annotations

import numpy as np
import torch

from policies.base import ActionChunk, Observation, ObservationBatch, Policy, stack_observations
from rlt.errors import EmbeddingDimError, RLTInputError
from rlt.rl_token import RLToken, RLTokenConfig


class StateProjectionEmbedder:
    """``tanh(s W + b)`` reshaped to ``B×T×E`` for a fixed seeded ``W``; reads ``state`` or ``privileged``."""

    def __init__(
        self, input_dim: int, num_tokens: int, embed_dim: int, key: str = "state", seed: int = 0
    ) -> None:
        if key not in ("state", "privileged"):
            raise RLTInputError(f"StateProjectionEmbedder.key: expected 'state' or 'privileged', got {key!r}")
        rng = np.random.default_rng(seed)
        self.key, self.input_dim = key, input_dim
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.weight = (rng.normal(size=(input_dim, num_tokens * embed_dim)) / np.sqrt(input_dim)).astype(
            np.float32
        )
        self.bias = rng.normal(scale=0.1, size=num_tokens * embed_dim).astype(np.float32)

    def embed(self, batch: ObservationBatch) -> np.ndarray:
        """``B×T×E`` float32 embeddings of a batch."""
        if self.key not in batch:
            raise RLTInputError(f"observation.{self.key}: required by StateProjectionEmbedder, missing")
        states = np.asarray(batch[self.key], dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != self.input_dim:
            raise RLTInputError(f"observation.{self.key}: expected B×{self.input_dim}, got {states.shape}")
        return np.tanh(states @ self.weight + self.bias).reshape(-1, self.num_tokens, self.embed_dim)


class EmbeddingPrior:
    """A ``Policy`` delegating actions to ``policy`` and attaching ``embedder`` embeddings to each chunk."""

    def __init__(self, policy: Policy, embedder: StateProjectionEmbedder) -> None:
        self.policy, self.embedder = policy, embedder
        self.version = policy.version
        self.action_horizon = policy.action_horizon
        self.action_dim = policy.action_dim

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        chunk = self.policy.infer(batch)
        return ActionChunk(actions=chunk.actions, embeddings=self.embedder.embed(batch), timing=chunk.timing)

    def reset(self) -> None:
        self.policy.reset()


class RLStateEncoder:
    """Maps (VLA embeddings ``B×T×E``, proprio ``B×P``) to ``x = z_rl ‖ proprio`` with a frozen RL token
    (``token=None``: ``x = proprio``, no RL token)."""

    def __init__(self, token: RLToken | None, proprio_dim: int) -> None:
        self.token = token.freeze() if token is not None else None
        self.proprio_dim = proprio_dim

    @property
    def state_dim(self) -> int:
        """Width of ``x``."""
        return (self.token.config.z_dim if self.token is not None else 0) + self.proprio_dim

    @torch.no_grad()
    def encode(self, embeddings: np.ndarray, proprio: np.ndarray) -> np.ndarray:
        """``B×(z_dim + P)`` float32 RL states."""
        if embeddings is None:
            raise EmbeddingDimError("embeddings: the prior returned none; wrap it in EmbeddingPrior")
        proprio = np.asarray(proprio, dtype=np.float32)
        if proprio.ndim != 2 or proprio.shape[1] != self.proprio_dim:
            raise RLTInputError(f"proprio: expected B×{self.proprio_dim}, got {proprio.shape}")
        if self.token is None:
            return proprio
        return np.concatenate([self.token.encode_numpy(np.asarray(embeddings, np.float32)), proprio], axis=1)


def token_config_for(
    policy: Policy, observation: Observation, z_dim: int = 64, **shape: int | str
) -> RLTokenConfig:
    """The RL token shape matching ``policy``'s embeddings (``T×E``), probed with one ``infer`` call.

    Works for any prior that fills ``ActionChunk.embeddings``: the built-in VLA (``T`` = its prefix length,
    ``E`` = its width) or an ``EmbeddingPrior``. ``shape`` overrides other ``RLTokenConfig`` fields.
    """
    embeddings = policy.infer(stack_observations([observation])).embeddings
    if embeddings is None or np.ndim(embeddings) != 3:
        got = None if embeddings is None else np.shape(embeddings)
        raise EmbeddingDimError(f"embeddings: expected B×T×E from {type(policy).__name__}.infer, got {got}")
    return RLTokenConfig(num_tokens=embeddings.shape[1], embed_dim=embeddings.shape[2], z_dim=z_dim, **shape)
