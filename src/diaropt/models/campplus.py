"""CAM++ speaker-embedding network (3D-Speaker, 192-d) with masked statistics pooling.

Input: (batch, frames, 80) mean-normalised log-mel from ``KaldiFbank`` (povey window, waveform in
[-1, 1]) and optional pooling weights (batch, any_frames). Output: (batch, 192). The time axis is
halved once (the first TDNN has stride 2): 998 fbank frames -> 499 pooled frames.

Module and parameter names match the released checkpoint so it loads with ``strict=True``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diaropt.models.pooling import MaskedStatsPool


class BatchNormReLU(nn.Module):
    """``batchnorm`` then ReLU, under the checkpoint's key names."""

    def __init__(self, channels: int, relu: bool = True, affine: bool = True) -> None:
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=affine)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.relu else x


class ResidualBlock2d(nn.Module):
    """3x3 residual block that strides the frequency axis only."""

    def __init__(self, in_channels: int, channels: int, frequency_stride: int) -> None:
        super().__init__()
        stride = (frequency_stride, 1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if frequency_stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FrontEndConvModule(nn.Module):
    """(batch, frames, mel) -> (batch, 32 * mel / 8, frames): 2-D conv front end ("FCM")."""

    def __init__(self, num_mel_bins: int = 80, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResidualBlock2d(channels, channels, 2), ResidualBlock2d(channels, channels, 1))
        self.layer2 = nn.Sequential(ResidualBlock2d(channels, channels, 2), ResidualBlock2d(channels, channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (num_mel_bins // 8)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(1, 2).unsqueeze(1)  # (batch, 1, mel, frames)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        return x.flatten(1, 2)  # (batch, channels * mel, frames)


class TDNNLayer(nn.Module):
    """Conv1d then batchnorm-ReLU (keys ``linear``, ``nonlinear``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.nonlinear = BatchNormReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class ContextAwareMasking(nn.Module):
    """Local TDNN output gated by a sigmoid of global + 100-frame segment context ("CAM")."""

    segment_frames = 100

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 reduction: int = 2) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(in_channels, in_channels // reduction, 1)
        self.linear2 = nn.Conv1d(in_channels // reduction, out_channels, 1)

    def segment_means(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, frames): each frame gets the mean of its 100-frame segment (last one partial).

        Two small constant matmuls (frames -> segments -> frames) instead of pooling, repeat and a
        crop: the same numbers, and no slice ops in the converted graph.
        """
        num_frames = int(x.shape[-1])  # static: the converted graph has fixed shapes
        segment_of_frame = np.arange(num_frames) // self.segment_frames
        one_hot = (segment_of_frame[:, None] == np.arange(segment_of_frame[-1] + 1)[None, :]).astype(np.float32)
        averaging = one_hot / one_hot.sum(axis=0, keepdims=True)  # (frames, segments)
        # numpy-built constants: traced as constants, not as ops
        return (x @ torch.from_numpy(averaging).to(x.dtype)) @ torch.from_numpy(one_hot.T.copy()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear_local(x)
        context = x.mean(dim=-1, keepdim=True) + self.segment_means(x)
        return local * torch.sigmoid(self.linear2(F.relu(self.linear1(context))))


class DenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bottleneck: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = BatchNormReLU(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.nonlinear2 = BatchNormReLU(bottleneck)
        self.cam_layer = ContextAwareMasking(bottleneck, growth, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class DenseTDNNBlock(nn.ModuleDict):
    """Densely connected layers ``tdnnd1..N``: each appends ``growth`` channels."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bottleneck: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__({f"tdnnd{i + 1}": DenseTDNNLayer(in_channels + i * growth, growth, bottleneck, kernel_size,
                                                          dilation) for i in range(num_layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """batchnorm-ReLU then 1x1 conv halving the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = BatchNormReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """1x1 conv to the embedding then a non-affine batchnorm (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = BatchNormReLU(out_channels, relu=False, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1))).squeeze(-1)


class CAMPPlus(nn.Module):
    """(batch, frames, 80) log-mel [+ weights (batch, any_frames)] -> (batch, embedding_dim)."""

    time_stride = 2  # fbank frames per pooled frame (the first TDNN's stride)

    def __init__(self, num_mel_bins: int = 80, embedding_dim: int = 192, growth: int = 32, bottleneck_scale: int = 4,
                 init_channels: int = 128) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.head = FrontEndConvModule(num_mel_bins)
        self.xvector = nn.Module()
        self.xvector.tdnn = TDNNLayer(self.head.out_channels, init_channels, 5, stride=2)
        channels = init_channels
        for index, (num_layers, kernel_size, dilation) in enumerate([(12, 3, 1), (24, 3, 2), (16, 3, 2)], start=1):
            block = DenseTDNNBlock(num_layers, channels, growth, bottleneck_scale * growth, kernel_size, dilation)
            setattr(self.xvector, f"block{index}", block)
            channels += num_layers * growth
            setattr(self.xvector, f"transit{index}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.xvector.out_nonlinear = BatchNormReLU(channels)
        self.xvector.dense = DenseLayer(2 * channels, embedding_dim)
        self.pool = MaskedStatsPool()

    def frame_features(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mel) -> (batch, 512, ceil(frames / 2)): everything before pooling."""
        x = self.xvector.tdnn(self.head(features))
        for index in (1, 2, 3):
            x = getattr(self.xvector, f"transit{index}")(getattr(self.xvector, f"block{index}")(x))
        return self.xvector.out_nonlinear(x)

    def pool_and_embed(self, frame_features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 512, frames) [+ weights] -> (batch, embedding_dim)."""
        return self.xvector.dense(self.pool(frame_features, weights))

    def forward(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool_and_embed(self.frame_features(features), weights)
