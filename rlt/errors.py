"""Typed errors of the RLT learner: each names the offending field and what was expected."""

from __future__ import annotations


class RLTInputError(ValueError):
    """Malformed input to the RLT learner (shapes, dimensions, non-finite values)."""


class RLTCheckpointError(RLTInputError):
    """An RLT checkpoint directory that cannot be read: missing files, an older or malformed manifest."""


class EmbeddingDimError(RLTInputError):
    """VLA embeddings do not have the width the RL token was built for."""


class NonChunkActionError(RLTInputError):
    """An action is not a ``C×D`` chunk of the configured chunk size and action dimension."""


class CriticDivergedError(RuntimeError):
    """A loss or a parameter of the actor-critic became non-finite; training stops, nothing is saved."""
