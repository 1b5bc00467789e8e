"""The RL token: a small encoder–decoder transformer that compresses frozen VLA embeddings into ``z_rl``.

The encoder reads the VLA's final token embeddings (``B×T×E``) with a learned ``<rl>`` token appended; the
``<rl>`` output, projected to ``z_dim``, is the bottleneck ``z_rl``. The decoder sees only ``z_rl`` (as its
memory) and learned position queries, and must reconstruct all ``T`` embeddings, so everything the RL learner
needs from the VLA has to pass through ``z_rl``. After fitting, the token is frozen and only ``encode`` is
used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlt.errors import EmbeddingDimError, RLTInputError


@dataclass(frozen=True)
class RLTokenConfig:
    """RL token shape: ``num_tokens`` T and ``embed_dim`` E of the VLA embeddings, bottleneck ``z_dim``.

    ``normalization``: the embeddings are standardized with statistics per ``channel`` (``E``) or per
    ``position`` and channel (``T×E``; see ``fit_rl_token``)."""

    num_tokens: int
    embed_dim: int
    z_dim: int = 64
    model_dim: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    normalization: Literal["channel", "position"] = "channel"


class RLToken(nn.Module):
    """Encoder–decoder over ``B×T×E`` embeddings; the ``<rl>`` output ``z_rl`` (B×z_dim) is a bottleneck."""

    def __init__(self, config: RLTokenConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.model_dim
        self.input_proj = nn.Linear(config.embed_dim, dim)
        self.positions = nn.Parameter(torch.randn(config.num_tokens, dim) * 0.02)
        self.rl_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.encoder = nn.TransformerEncoder(
            _layer(nn.TransformerEncoderLayer, config), config.encoder_layers, enable_nested_tensor=False
        )
        self.to_z = nn.Linear(dim, config.z_dim)
        self.from_z = nn.Linear(config.z_dim, dim)
        self.queries = nn.Parameter(torch.randn(config.num_tokens, dim) * 0.02)
        self.decoder = nn.TransformerDecoder(
            _layer(nn.TransformerDecoderLayer, config), config.decoder_layers
        )
        self.output_proj = nn.Linear(dim, config.embed_dim)
        shape = (
            (config.embed_dim,)
            if config.normalization == "channel"
            else (config.num_tokens, config.embed_dim)
        )
        self.register_buffer("embed_mean", torch.zeros(shape))
        self.register_buffer("embed_std", torch.ones(shape))

    def check_embeddings(self, embeddings: torch.Tensor | np.ndarray) -> None:
        """Raise ``EmbeddingDimError`` unless ``embeddings`` is ``B×T×E`` with this token's T and E."""
        shape = tuple(embeddings.shape)
        expected = (self.config.num_tokens, self.config.embed_dim)
        if len(shape) != 3 or shape[1:] != expected:
            raise EmbeddingDimError(
                f"embeddings: expected shape B×{expected[0]}×{expected[1]} (B×T×E), got {shape}"
            )

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``z_rl`` (``B×z_dim``) of ``B×T×E`` embeddings."""
        self.check_embeddings(embeddings)
        normalized = (embeddings - self.embed_mean) / self.embed_std
        tokens = self.input_proj(normalized) + self.positions
        tokens = torch.cat([tokens, self.rl_token.expand(tokens.shape[0], -1, -1)], dim=1)
        return self.to_z(self.encoder(tokens)[:, -1])

    def decode(self, z_rl: torch.Tensor) -> torch.Tensor:
        """Reconstruct normalized ``B×T×E`` embeddings from ``z_rl`` alone."""
        memory = self.from_z(z_rl).unsqueeze(1)
        queries = self.queries.expand(z_rl.shape[0], -1, -1)
        return self.output_proj(self.decoder(queries, memory))

    def reconstruction_loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the normalized embeddings and their reconstruction from ``z_rl``."""
        target = (embeddings - self.embed_mean) / self.embed_std
        return torch.mean((self.decode(self.encode(embeddings)) - target) ** 2)

    def freeze(self) -> RLToken:
        """Stop gradients and switch to eval mode: the token is a fixed feature map from now on."""
        self.eval()
        self.requires_grad_(False)
        return self

    @torch.no_grad()
    def encode_numpy(self, embeddings: np.ndarray) -> np.ndarray:
        """``z_rl`` as float32 numpy for ``B×T×E`` numpy embeddings."""
        self.check_embeddings(embeddings)
        device = self.embed_mean.device
        return self.encode(torch.as_tensor(embeddings, dtype=torch.float32, device=device)).cpu().numpy()

    def save(self, path: str | Path) -> None:
        """Write weights and config to a safetensors file (refuses non-finite weights)."""
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        bad = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
        if bad:
            raise RLTInputError(f"RL token weights {bad[:3]} are not finite; checkpoint not written")
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str | Path) -> RLToken:
        """Load a token written by ``save`` (frozen)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            config = RLTokenConfig(**json.loads(handle.metadata()["config"]))
        token = cls(config)
        token.load_state_dict(load_file(str(path)))
        return token.freeze()


def _layer(layer_class: type[nn.Module], config: RLTokenConfig) -> nn.Module:
    return layer_class(
        config.model_dim,
        config.num_heads,
        dim_feedforward=2 * config.model_dim,
        dropout=0.0,
        batch_first=True,
        norm_first=True,
    )


#: Floor of a position's standard deviation, relative to its channel's over all positions (``fit_rl_token``).
STD_FLOOR = 1e-3


def fit_rl_token(
    token: RLToken,
    embeddings: np.ndarray,
    steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``token`` to reconstruct ``embeddings`` (``N×T×E``) through ``z_rl``; return the loss per step.

    Normalization statistics (``token.config.normalization``) are taken from ``embeddings`` and travel with the
    weights. Per ``channel`` the loss is dominated by what differs between positions, not observations: a VLA's
    prefix embeddings differ far more between positions (patches, prompt tokens) than between observations
    (reach-v3's tiny image VLA: ~0.002 vs ~0.46 per channel), the decoder reproduces the positions from its
    queries and a low loss says nothing about ``z_rl``. Per ``position`` the loss is on what varies between
    observations (a standard deviation floored at ``STD_FLOOR`` times its channel's over all positions).
    The caller freezes the token afterwards (``token.freeze()``). Training runs where the token's weights are
    (``token.to(device)`` first; minibatch indices are drawn on the CPU, so the draws do not depend on it).
    """
    token.check_embeddings(embeddings)
    data = torch.as_tensor(embeddings, dtype=torch.float32, device=token.embed_mean.device)
    if not torch.isfinite(data).all():
        raise RLTInputError("embeddings: expected finite values, got NaN/inf")
    channel_mean, channel_std = (
        data.reshape(-1, data.shape[-1]).mean(0),
        data.reshape(-1, data.shape[-1]).std(0),
    )
    if token.config.normalization == "channel":
        token.embed_mean.copy_(channel_mean)
        token.embed_std.copy_(channel_std.clamp_min(1e-6))
    else:
        token.embed_mean.copy_(data.mean(0))
        token.embed_std.copy_(data.std(0, correction=0).clamp_min(1e-6).maximum(STD_FLOOR * channel_std))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(token.parameters(), lr=learning_rate)
    token.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=generator)
        index = index.to(data.device)
        loss = token.reconstruction_loss(data[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
