"""Frozen, validated configuration of the built-in VLA (architecture and sampling only; no optimizer fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    # width: backbone width; expert_width: action-expert width; heads × head_dim is shared by both (as in π0).
    "tiny": {
        "width": 128,
        "depth": 3,
        "heads": 4,
        "head_dim": 32,
        "expert_width": 96,
        "mlp_ratio": 2,
        "conv_channels": 32,
        "image_grid": 6,
    },
    "small": {
        "width": 256,
        "depth": 6,
        "heads": 8,
        "head_dim": 32,
        "expert_width": 128,
        "mlp_ratio": 4,
        "conv_channels": 48,
        "image_grid": 8,
    },
}


class ConfigError(ValueError):
    """An invalid VLA configuration (one line naming the field and what was expected)."""


@dataclass(frozen=True)
class VLAConfig:
    """Everything that determines the VLA's parameter shapes and its sampling.

        Build with :meth:`preset` (``"tiny"`` or ``"small"``) plus overrides. ``cameras`` are the camera names the
        model reads (in this order; empty = the state tier: no image encoder, the prefix is the prompt alone and the
        state enters through the action expert's state token); ``image_size`` is the square side in pixels; ``state_dim`` and ``action_dim`` are
        the proprio and action sizes; ``action_horizon`` is H; ``num_steps`` the Euler steps at inference.
        ``knowledge_insulation`` adds the FAST next-token head on the backbone and stops the action expert's gradient
        into it; ``fast_vocab_size`` / ``max_fast_tokens`` size that head (``create_policy`` fills ``fast_vocab_size``
    from the fitted FAST tokenizer). ``vocab_size`` is the prompt tokenizer's.
    """

    size: str = "tiny"
    cameras: tuple[str, ...] = ("corner",)
    image_size: int = 96
    state_dim: int = 4
    action_dim: int = 4
    action_horizon: int = 10
    num_steps: int = 10
    vocab_size: int = 512
    max_prompt_tokens: int = 32
    width: int = 128
    depth: int = 3
    heads: int = 4
    head_dim: int = 32
    expert_width: int = 96
    mlp_ratio: int = 4
    conv_channels: int = 32
    image_grid: int = 6
    dropout: float = 0.0
    knowledge_insulation: bool = False
    fast_vocab_size: int = 0
    max_fast_tokens: int = 48
    normalization: str = "quantile"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(self.cameras))
        self._validate()

    @classmethod
    def preset(cls, size: str = "tiny", **overrides: Any) -> VLAConfig:
        """A named size (``tiny``/``small``) with field overrides."""
        if size not in SIZES:
            raise ConfigError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
        return cls(size=size, **{**SIZES[size], **overrides})

    @property
    def image_tokens(self) -> int:
        """Image tokens per camera."""
        return self.image_grid * self.image_grid

    @property
    def prefix_len(self) -> int:
        """Prefix length: image tokens of every camera, then prompt tokens."""
        return len(self.cameras) * self.image_tokens + self.max_prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["cameras"] = list(self.cameras)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        """Inverse of :meth:`to_dict`: unknown or wrongly typed fields are rejected by name."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown VLA config field (expected one of {sorted(fields)})")
        values = dict(data)
        if "cameras" in values:
            values["cameras"] = tuple(values["cameras"])
        for name, value in values.items():
            expected = type(getattr(cls(), name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                values[name] = value
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"{name}: expected {expected.__name__}, got {value!r}")
        return cls(**values)

    def _validate(self) -> None:
        positive = (
            "image_size",
            "state_dim",
            "action_dim",
            "action_horizon",
            "num_steps",
            "vocab_size",
            "max_prompt_tokens",
            "width",
            "depth",
            "heads",
            "head_dim",
            "expert_width",
            "mlp_ratio",
            "conv_channels",
            "image_grid",
            "max_fast_tokens",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if len(self.cameras) > 3 or len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"cameras: expected 0–3 distinct camera names, got {self.cameras!r}")
        if self.cameras and self.image_size < 8 * self.image_grid:
            raise ConfigError(
                f"image_size: expected >= 8 × image_grid = {8 * self.image_grid}, got {self.image_size}"
            )
        if self.normalization not in ("quantile", "zscore"):
            raise ConfigError(f"normalization: expected 'quantile' or 'zscore', got {self.normalization!r}")
        if self.fast_vocab_size < 0:
            raise ConfigError(f"fast_vocab_size: expected >= 0, got {self.fast_vocab_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected in [0, 1), got {self.dropout!r}")
