"""The π0-shaped network: image + prompt prefix through a backbone, a flow-matching action expert on the suffix.

Structure (π0, openpi): every layer has two weight sets that share one attention — backbone weights for prefix
tokens (image patches, prompt tokens) and action-expert weights for suffix tokens (one state token, H action
tokens). The attention mask (:func:`make_attention_mask`) makes the prefix bidirectional and blind to the suffix;
the state token sees the prefix; action tokens see the prefix, the state and each other. Because the prefix never
attends to the suffix, the prefix is encoded once (its per-layer keys/values cached) and each Euler step runs the
suffix only; training uses the same two passes, which is exactly the joint masked pass.

Knowledge Insulation (π0.5 KI): the backbone additionally predicts the FAST tokens of the chunk (a causal stream
through the backbone weights, attending to the prefix), and the action expert reads *detached* prefix keys/values,
so the flow-matching loss does not reach the backbone.

Flow matching (π0 convention, τ = 1 is data): A^τ = τ·A + (1−τ)·ε, target velocity u = A − ε, τ drawn from a Beta
distribution shifted toward noise; sampling integrates ``num_steps`` Euler steps from τ = 0 to τ = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from policies.vla.config import ConfigError, VLAConfig

#: ``guidance(x_tau, tau, velocity_fn) -> velocity``; ``velocity_fn`` maps ``x_tau`` to the model's velocity and
#: is differentiable, so inpainting guidance (RTC, ΠGDM) can take vector-Jacobian products through it.
GuidanceFn = Callable[[torch.Tensor, float, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]

# Block ids for make_attention_mask: a token attends to every valid token whose block id is <= its own, and a
# causal block additionally only to earlier positions in it. Prefix = 0, state = 1, actions = 2.
PREFIX_BLOCK, STATE_BLOCK, ACTION_BLOCK = 0, 1, 2


def make_attention_mask(
    key_valid: torch.Tensor, blocks: torch.Tensor, causal: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean ``B×T×T`` mask, True where query ``i`` may attend to key ``j``.

    ``key_valid`` (``B×T``) marks real tokens (padding is never attended to); ``blocks`` (``T``) gives each
    token's block: ``i`` sees ``j`` iff ``blocks[j] <= blocks[i]``, and, for tokens in ``causal`` blocks (``T``
    bool), ``j <= i`` within the same block. Tokens in the same non-causal block see each other (bidirectional).
    """
    same = blocks[None, :] == blocks[:, None]
    allowed = blocks[None, :] <= blocks[:, None]
    if causal is not None:
        index = torch.arange(blocks.shape[0], device=blocks.device)
        future = (index[None, :] > index[:, None]) & same & causal[:, None]
        allowed = allowed & ~future
    return allowed[None, :, :] & key_valid[:, None, :]


def suffix_blocks(action_horizon: int, device: torch.device | None = None) -> torch.Tensor:
    """Block ids of the suffix: one state token, then ``action_horizon`` action tokens."""
    return torch.tensor([STATE_BLOCK] + [ACTION_BLOCK] * action_horizon, device=device)


@dataclass
class PrefixOutput:
    """The encoded prefix: final embeddings (``B×P×E``, the RLT hook), validity (``B×P``) and per-layer K/V."""

    embeddings: torch.Tensor
    valid: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def detached(self) -> PrefixOutput:
        """The same prefix with gradients stopped (what the action expert sees under Knowledge Insulation)."""
        return PrefixOutput(
            self.embeddings.detach(),
            self.valid,
            [k.detach() for k in self.keys],
            [v.detach() for v in self.values],
        )


class StreamBlock(nn.Module):
    """One layer's weights for one token stream; attention heads are shared with the other stream's block."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each ``B×heads×L×head_dim``."""
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        shape = (x.shape[0], x.shape[1], self.heads, self.head_dim)
        return tuple(t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output and MLP."""
        x = x + self.out(attended.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x + self.mlp(self.norm2(x))


def attend_stream(
    block: StreamBlock,
    x: torch.Tensor,
    context_k: torch.Tensor | None,
    context_v: torch.Tensor | None,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer for a stream: its queries attend to ``[context keys, own keys]`` under ``mask`` (``B×L×(C+L)``)."""
    q, k, v = block.project(x)
    keys = k if context_k is None else torch.cat([context_k, k], dim=2)
    values = v if context_v is None else torch.cat([context_v, v], dim=2)
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
    return block.finish(x, attended), k, v


class ImageEncoder(nn.Module):
    """Small conv stem (three stride-2 convs) pooled to a ``grid×grid`` patch map, projected to tokens."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        c = config.conv_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(config.image_grid),
        )
        self.proj = nn.Linear(4 * c, config.width)
        self.position = nn.Parameter(
            torch.randn(len(config.cameras), config.image_tokens, config.width) * 0.02
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B×C×3×S×S`` images in [−1, 1] → ``B×(C·grid²)×width`` tokens."""
        b, cams = images.shape[:2]
        features = self.stem(images.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B·C)×grid²×4c
        tokens = self.proj(features).reshape(b, cams, -1, self.position.shape[-1]) + self.position
        return tokens.flatten(1, 2)


def timestep_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of τ ∈ [0, 1] (``B`` → ``B×dim``), periods from 4e-3 to 4 as in openpi."""
    half = dim // 2
    fraction = torch.linspace(0.0, 1.0, half, device=tau.device)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = tau[:, None] * (2 * math.pi / period[None, :])
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class VLAModel(nn.Module):
    """The network. Inputs are already normalized: images in [−1, 1], token ids + mask, normalized state."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.config = config
        w, e = config.width, config.expert_width
        block_args = (config.heads, config.head_dim, config.mlp_ratio, config.dropout)
        # Backbone (the "VLM"): image encoder (none in the state tier), prompt embedding, prefix blocks, final norm.
        self.image_encoder = ImageEncoder(config) if config.cameras else None
        self.token_embedding = nn.Embedding(config.vocab_size, w)
        self.token_position = nn.Parameter(torch.randn(config.max_prompt_tokens, w) * 0.02)
        self.backbone = nn.ModuleList(StreamBlock(w, *block_args) for _ in range(config.depth))
        self.backbone_norm = nn.LayerNorm(w)
        # Action expert: state token, action tokens with time, suffix blocks, velocity head.
        self.state_proj = nn.Linear(config.state_dim, e)
        self.action_in = nn.Linear(config.action_dim, e)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * e, e), nn.SiLU(), nn.Linear(e, e))
        self.suffix_position = nn.Parameter(torch.randn(config.action_horizon + 1, e) * 0.02)
        self.expert = nn.ModuleList(StreamBlock(e, *block_args) for _ in range(config.depth))
        self.expert_norm = nn.LayerNorm(e)
        self.action_out = nn.Linear(e, config.action_dim)
        if config.knowledge_insulation:
            if config.fast_vocab_size <= 0:
                raise ConfigError(
                    "fast_vocab_size: expected > 0 with knowledge_insulation (fit a FASTTokenizer)"
                )
            # FAST ids, then BOS, EOS, PAD.
            self.fast_embedding = nn.Embedding(config.fast_vocab_size + 3, w)
            self.fast_position = nn.Parameter(torch.randn(config.max_fast_tokens + 1, w) * 0.02)
            self.fast_head = nn.Linear(w, config.fast_vocab_size + 3)

    # ----- prefix -------------------------------------------------------------------------------------------
    def prefix_mask(self, token_valid: torch.Tensor) -> torch.Tensor:
        """Key validity of the prefix: every image token, then the real (non-padding) prompt tokens."""
        image_tokens = len(self.config.cameras) * self.config.image_tokens
        images = torch.ones(token_valid.shape[0], image_tokens, dtype=torch.bool, device=token_valid.device)
        return torch.cat([images, token_valid], dim=1)

    def encode_prefix(
        self, images: torch.Tensor, tokens: torch.Tensor, token_valid: torch.Tensor
    ) -> PrefixOutput:
        """Run the backbone over the prefix (bidirectional); returns final embeddings and per-layer K/V."""
        x = self.token_embedding(tokens) + self.token_position[: tokens.shape[1]]
        if self.image_encoder is not None:
            x = torch.cat([self.image_encoder(images), x], dim=1)
        valid = self.prefix_mask(token_valid)
        mask = make_attention_mask(valid, torch.full((x.shape[1],), PREFIX_BLOCK, device=x.device))
        keys, values = [], []
        for block in self.backbone:
            x, k, v = attend_stream(block, x, None, None, mask)
            keys.append(k)
            values.append(v)
        return PrefixOutput(self.backbone_norm(x), valid, keys, values)

    # ----- suffix (action expert) ---------------------------------------------------------------------------
    def suffix_mask(self, prefix_valid: torch.Tensor) -> torch.Tensor:
        """Suffix rows of the full mask: ``B×(1+H)×(P+1+H)`` (columns: prefix, then suffix)."""
        horizon, device = self.config.action_horizon, prefix_valid.device
        blocks = torch.cat(
            [
                torch.full((prefix_valid.shape[1],), PREFIX_BLOCK, device=device),
                suffix_blocks(horizon, device),
            ]
        )
        suffix = torch.ones(prefix_valid.shape[0], 1 + horizon, dtype=torch.bool, device=device)
        valid = torch.cat([prefix_valid, suffix], dim=1)
        return make_attention_mask(valid, blocks)[:, prefix_valid.shape[1] :]

    def velocity(self, prefix: PrefixOutput, state: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor):
        """Predicted velocity ``B×H×D`` for noisy normalized actions ``x_tau`` at times ``tau`` (``B``)."""
        time = timestep_embedding(tau, self.config.expert_width).unsqueeze(1).expand(-1, x_tau.shape[1], -1)
        action_tokens = self.action_time_mlp(torch.cat([self.action_in(x_tau), time], dim=-1))
        x = torch.cat([self.state_proj(state).unsqueeze(1), action_tokens], dim=1) + self.suffix_position
        mask = self.suffix_mask(prefix.valid)
        for block, k, v in zip(self.expert, prefix.keys, prefix.values, strict=True):
            x, _, _ = attend_stream(block, x, k, v, mask)
        return self.action_out(self.expert_norm(x[:, 1:]))

    def expert_prefix(self, prefix: PrefixOutput) -> PrefixOutput:
        """The prefix as the action expert sees it: detached under Knowledge Insulation."""
        return prefix.detached() if self.config.knowledge_insulation else prefix

    def flow_loss(
        self,
        prefix: PrefixOutput,
        state: torch.Tensor,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        noise: torch.Tensor,
        tau: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked MSE between predicted and target velocity ``A − ε`` at ``A^τ = τA + (1−τ)ε``.

        ``sample_weights`` (``B``, ≥ 0) weigh each sample's chunk (AWR, filtered BC); the loss is their weighted
        mean over unmasked entries, so all-equal weights give the unweighted loss.
        """
        t = tau[:, None, None]
        x_tau = t * actions + (1 - t) * noise
        predicted = self.velocity(self.expert_prefix(prefix), state, x_tau, tau)
        error = ((predicted - (actions - noise)) ** 2).mean(dim=-1)
        weights = action_mask.float()
        if sample_weights is not None:
            weights = weights * sample_weights[:, None]
            return (error * weights).sum() / weights.sum().clamp(min=1e-12)
        return (error * weights).sum() / weights.sum().clamp(min=1.0)

    # ----- FAST stream (Knowledge Insulation) ---------------------------------------------------------------
    @property
    def fast_special(self) -> tuple[int, int, int]:
        """BOS, EOS and PAD ids of the FAST stream."""
        v = self.config.fast_vocab_size
        return v, v + 1, v + 2

    def fast_loss(self, prefix: PrefixOutput, fast_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of FAST tokens (``B×L`` incl. EOS, PAD-padded) through the backbone weights."""
        bos, _, pad = self.fast_special
        inputs = torch.cat([torch.full_like(fast_tokens[:, :1], bos), fast_tokens[:, :-1]], dim=1)
        length, device, prefix_length = inputs.shape[1], inputs.device, prefix.valid.shape[1]
        x = self.fast_embedding(inputs) + self.fast_position[:length]
        blocks = torch.cat(
            [
                torch.full((prefix_length,), PREFIX_BLOCK, device=device),
                torch.full((length,), 1, device=device),
            ]
        )
        causal = torch.cat(
            [
                torch.zeros(prefix_length, dtype=torch.bool, device=device),
                torch.ones(length, dtype=torch.bool, device=device),
            ]
        )
        valid = torch.cat([prefix.valid, inputs != pad], dim=1)
        valid[:, prefix.valid.shape[1]] = True  # BOS
        mask = make_attention_mask(valid, blocks, causal)[:, prefix.valid.shape[1] :]
        for block, k, v in zip(self.backbone, prefix.keys, prefix.values, strict=True):
            x, _, _ = attend_stream(block, x, k, v, mask)
        logits = self.fast_head(self.backbone_norm(x))
        return F.cross_entropy(logits.flatten(0, 1), fast_tokens.flatten(), ignore_index=pad)

    # ----- sampling -----------------------------------------------------------------------------------------
    def sample_actions(
        self,
        prefix: PrefixOutput,
        state: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int,
        unconditional_prefix: PrefixOutput | None = None,
        cfg_beta: float = 1.0,
        guidance: GuidanceFn | None = None,
    ) -> torch.Tensor:
        """Integrate ``num_steps`` Euler steps from ``noise`` (τ=0) to normalized actions (τ=1).

        With ``unconditional_prefix`` and ``cfg_beta`` ≠ 1, classifier-free guidance uses
        ``v_c + (β − 1)(v_c − v_u)`` (β = 1 is plain conditioning, bit for bit). ``guidance`` replaces the velocity
        at each step by ``guidance(x_tau, tau, velocity_fn)``.
        """
        x = noise
        dt = 1.0 / num_steps
        for step in range(num_steps):
            tau = step * dt
            velocity_fn = self._velocity_fn(prefix, state, tau, unconditional_prefix, cfg_beta)
            v = guidance(x, tau, velocity_fn) if guidance is not None else velocity_fn(x)
            x = x + dt * v
        return x

    def _velocity_fn(
        self,
        prefix: PrefixOutput,
        state: torch.Tensor,
        tau: float,
        unconditional_prefix: PrefixOutput | None,
        cfg_beta: float,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def velocity_fn(x_tau: torch.Tensor) -> torch.Tensor:
            taus = torch.full((x_tau.shape[0],), tau, device=x_tau.device)
            conditional = self.velocity(prefix, state, x_tau, taus)
            if unconditional_prefix is None or cfg_beta == 1.0:
                return conditional
            unconditional = self.velocity(unconditional_prefix, state, x_tau, taus)
            return conditional + (cfg_beta - 1.0) * (conditional - unconditional)

        return velocity_fn


def sample_tau(batch: int, generator: torch.Generator, alpha: float = 1.5, s: float = 0.999) -> torch.Tensor:
    """π0's flow time ``τ = s·(1 − b)`` with ``b ~ Beta(alpha, 1)``: more weight on noisy (small) τ."""
    # Beta(alpha, 1) has CDF b^alpha, so inverse-CDF sampling is exact.
    b = torch.rand(batch, generator=generator) ** (1.0 / alpha)
    return s * (1.0 - b)
