"""WeSpeaker ResNet34 (256-d), under pyannote.audio's key layout (``resnet.*``).

For users who bring the weights of ``pyannote/wespeaker-voxceleb-resnet34-LM``. Input:
(batch, frames, 80) mean-normalised log-mel from ``KaldiFbank`` with a hamming window and the
waveform scaled to int16 range; output (batch, 256). Time and frequency are strided by 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diaropt.models.pooling import MaskedStatsPool


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, ...] = (3, 4, 6, 3), channels: int = 32, num_mel_bins: int = 80,
                 embedding_dim: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        in_channels = channels
        for index, count in enumerate(num_blocks):
            out_channels = channels * 2**index
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                      for i in range(count)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = out_channels
        self.stats_channels = in_channels * (num_mel_bins // 8)
        self.pool = MaskedStatsPool()
        self.seg_1 = nn.Linear(2 * self.stats_channels, embedding_dim)

    def frame_features(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mel) -> (batch, 256 * mel / 8, frames / 8)."""
        x = F.relu(self.bn1(self.conv1(features.transpose(1, 2).unsqueeze(1))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(1, 2)  # (batch, channels * mel, frames)


class WeSpeakerResNet34(nn.Module):
    """(batch, frames, 80) log-mel [+ weights (batch, any_frames)] -> (batch, 256)."""

    time_stride = 8  # fbank frames per pooled frame (three stride-2 stages)

    def __init__(self, embedding_dim: int = 256) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.resnet = ResNet(embedding_dim=embedding_dim)

    def frame_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.resnet.frame_features(features)

    def pool_and_embed(self, frame_features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.resnet.seg_1(self.resnet.pool(frame_features, weights))

    def forward(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool_and_embed(self.frame_features(features), weights)
