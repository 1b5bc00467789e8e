"""Pluggable observation encoders for the value model.

An encoder maps a batch of normalized per-step vectors (B×F) and, optionally, camera images (B×H×W×3 uint8)
to features (B×``out_dim``). ``state_mlp`` (default, fast) reads the vector only; ``image_conv`` adds a small
convolutional net over one camera; ``vla_image`` uses the built-in VLA's image-encoder design instead. Register another (e.g. one sharing the VLA's vision tower) with
``register_encoder`` and name it in ``ValueConfig.encoder``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from policies.vla.config import VLAConfig
from policies.vla.model import ImageEncoder


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder factory gets: input width, layer sizes, and the image side length."""

    vector_dim: int
    hidden_dim: int
    num_layers: int
    dropout: float
    image_size: int
    uses_images: bool


EncoderFactory = Callable[[EncoderSpec], "ObservationEncoder"]
ENCODERS: dict[str, EncoderFactory] = {}


class ObservationEncoder(nn.Module):
    """Base class: ``forward(vector, image)`` returns B×``out_dim`` features."""

    out_dim: int
    uses_images: bool = False

    def forward(self, vector: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: make ``factory`` available as ``ValueConfig.encoder = name``."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        ENCODERS[name] = factory
        return factory

    return decorate


def build_encoder(name: str, spec: EncoderSpec) -> ObservationEncoder:
    """Instantiate the registered encoder ``name``; unknown names are a clear error."""
    if name not in ENCODERS:
        raise ValueError(f"ValueConfig.encoder: unknown encoder {name!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[name](spec)


def mlp(in_dim: int, hidden_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """``num_layers`` × (Linear → LayerNorm → ReLU → Dropout)."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        layers += [
            nn.Linear(in_dim if index == 0 else hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
        ]
    return nn.Sequential(*layers)


class StateMLPEncoder(ObservationEncoder):
    """An MLP over the per-step vector."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.net = mlp(spec.vector_dim, spec.hidden_dim, spec.num_layers, spec.dropout)
        self.out_dim = spec.hidden_dim

    def forward(self, vector: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        return self.net(vector)


class ImageConvEncoder(ObservationEncoder):
    """A small conv net over one camera (resized to ``image_size``) concatenated with the state MLP."""

    uses_images = True

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.image_size = spec.image_size
        self.state = StateMLPEncoder(spec)
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, spec.hidden_dim),
            nn.ReLU(),
        )
        self.out_dim = 2 * spec.hidden_dim

    def forward(self, vector: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        if image is None:
            raise ValueError(
                "image_conv encoder needs images; the episode has none for the configured camera"
            )
        pixels = image.permute(0, 3, 1, 2).float() / 255.0
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = nn.functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="area")
        return torch.cat([self.state(vector, None), self.conv(pixels)], dim=-1)


class VLAImageEncoder(ObservationEncoder):
    """The built-in VLA's image encoder design (``policies.vla.model.ImageEncoder``, tiny preset, one camera),
    its tokens mean-pooled, concatenated with the state MLP."""

    uses_images = True

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        grid = max(1, min(6, spec.image_size // 8))
        vla = VLAConfig.preset("tiny", cameras=("value",), image_size=spec.image_size, image_grid=grid)
        self.image_size = spec.image_size
        self.state = StateMLPEncoder(spec)
        self.tokens = ImageEncoder(vla)
        self.pool = nn.Sequential(nn.Linear(vla.width, spec.hidden_dim), nn.ReLU())
        self.out_dim = 2 * spec.hidden_dim

    def forward(self, vector: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        if image is None:
            raise ValueError("vla_image encoder needs images; the episode has none for the configured camera")
        pixels = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the VLA reads images in [−1, 1]
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = nn.functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="area")
        pooled = self.tokens(pixels[:, None]).mean(dim=1)
        return torch.cat([self.state(vector, None), self.pool(pooled)], dim=-1)


register_encoder("state_mlp")(StateMLPEncoder)
register_encoder("image_conv")(ImageConvEncoder)
register_encoder("vla_image")(VLAImageEncoder)
