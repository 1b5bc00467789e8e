"""Discretization of normalized returns in [−1, 0] into evenly spaced bins (bin centres include both ends)."""

from __future__ import annotations

import torch


class ReturnBins:
    """``num_bins`` centres spaced evenly over [low, high]; encodes two-hot or nearest-bin targets."""

    def __init__(self, num_bins: int = 201, low: float = -1.0, high: float = 0.0) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be ≥ 2, got {num_bins}")
        if not low < high:
            raise ValueError(f"bins need low < high, got low={low}, high={high}")
        self.num_bins = num_bins
        self.low = low
        self.high = high
        self.width = (high - low) / (num_bins - 1)
        self.centers = torch.linspace(low, high, num_bins)

    def _position(self, values: torch.Tensor) -> torch.Tensor:
        clipped = values.clamp(self.low, self.high)
        return (clipped - self.low) / self.width

    def nearest_index(self, values: torch.Tensor) -> torch.Tensor:
        """Index of the closest bin centre (values outside the range clip to the end bins)."""
        return self._position(values).round().long().clamp(0, self.num_bins - 1)

    def encode_nearest(self, values: torch.Tensor) -> torch.Tensor:
        """One-hot targets (…×num_bins) on the nearest bin."""
        return torch.nn.functional.one_hot(self.nearest_index(values), self.num_bins).to(values.dtype)

    def encode_two_hot(self, values: torch.Tensor) -> torch.Tensor:
        """Two-hot targets (…×num_bins): mass split between the two neighbouring centres.

        The expectation over the centres equals the (clipped) value exactly.
        """
        position = self._position(values)
        lower = position.floor().long().clamp(0, self.num_bins - 2)
        upper_weight = (position - lower.to(position.dtype)).clamp(0.0, 1.0)
        target = torch.zeros(*values.shape, self.num_bins, dtype=values.dtype)
        target.scatter_(-1, lower.unsqueeze(-1), (1.0 - upper_weight).unsqueeze(-1))
        target.scatter_add_(-1, (lower + 1).unsqueeze(-1), upper_weight.unsqueeze(-1))
        return target

    def encode(self, values: torch.Tensor, method: str) -> torch.Tensor:
        """Targets by ``method`` (``two_hot`` or ``nearest``)."""
        if method == "two_hot":
            return self.encode_two_hot(values)
        if method == "nearest":
            return self.encode_nearest(values)
        raise ValueError(f"bin encoding must be 'two_hot' or 'nearest', got {method!r}")

    def decode(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Expected value Σ_i p_i · centre_i of distributions over the bins (last axis)."""
        if probabilities.shape[-1] != self.num_bins:
            raise ValueError(f"distribution has {probabilities.shape[-1]} bins, expected {self.num_bins}")
        return probabilities @ self.centers.to(probabilities.dtype)
