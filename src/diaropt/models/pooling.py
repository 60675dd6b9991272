"""Masked statistics pooling shared by the speaker-embedding networks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def resample_weights(weights: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(batch, num_mask_frames) -> (batch, num_frames), nearest neighbour (PyTorch's convention).

    Implemented as a gather with a constant index so it converts to every backend at fixed shapes.
    """
    num_mask_frames = int(weights.shape[-1])  # static under tracing
    if num_mask_frames == num_frames:
        return weights
    index = np.minimum(np.floor(np.arange(num_frames) * (num_mask_frames / num_frames)), num_mask_frames - 1)
    return weights[:, torch.from_numpy(index.astype(np.int64))]


class MaskedStatsPool(nn.Module):
    """(batch, channels, frames) and optional weights (batch, any_frames) -> (batch, 2 * channels).

    Weighted mean and unbiased weighted standard deviation over frames. With all-one weights this
    equals mean + ``std(unbiased=True)``. Weights are resampled to the sequence's frame count; a row
    whose weights sum to zero pools to NaN (nothing to embed), never to a silent zero vector.
    """

    def forward(self, sequences: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            mean = sequences.mean(dim=-1)
            std = sequences.std(dim=-1, unbiased=True)
            return torch.cat([mean, std], dim=-1)
        weights = resample_weights(weights, int(sequences.shape[-1])).unsqueeze(1)  # (batch, 1, frames)
        total = weights.sum(dim=-1)  # (batch, 1)
        mean = (sequences * weights).sum(dim=-1) / total
        squared_deviation = (sequences - mean.unsqueeze(-1)) ** 2
        correction = total - (weights * weights).sum(dim=-1) / total
        std = torch.sqrt((squared_deviation * weights).sum(dim=-1) / correction)
        return torch.cat([mean, std], dim=-1)
