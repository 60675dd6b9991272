"""PyanNet, the architecture of pyannote segmentation-3.0, in plain torch.

SincNet (parametric sinc filterbank, stride 10, + 2 conv layers) -> 4-layer BiLSTM (128 per
direction) -> 2 linear layers (128) -> 7-class log-softmax over the powerset of at most 2 of 3 local
speakers. Input (batch, 1, 160000) at 16 kHz -> output (batch, 589, 7) log-probabilities.

The state-dict keys follow pyannote.audio, so the real checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# torch-free (the ONNX Runtime run path imports them without torch); re-exported here
from diaropt.models.constants import (CHUNK_DURATION_S, NUM_LOCAL_SPEAKERS, NUM_POWERSET_CLASSES,  # noqa: F401
                                      SAMPLE_RATE_HZ, SEGMENTATION_FRAMES, FrameTiming, segmentation_num_frames)


class SincFilterbank(nn.Module):
    """Band-pass sinc filters (cos and sin halves) parametrised by low cut-off and bandwidth (Hz).

    Parameter and buffer names (``low_hz_``, ``band_hz_``, ``window_``, ``n_``) match the checkpoint.
    """

    def __init__(self, num_filters: int = 80, kernel_size: int = 251, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 min_low_hz: float = 50.0, min_band_hz: float = 50.0) -> None:
        super().__init__()
        self.num_filters = num_filters
        self.kernel_size = kernel_size
        self.sample_rate_hz = sample_rate_hz
        self.min_low_hz = min_low_hz
        self.min_band_hz = min_band_hz
        half = num_filters // 2
        # mel-spaced initial cut-offs; the trained values come from the checkpoint
        mel = torch.linspace(_hz_to_mel(30.0), _hz_to_mel(sample_rate_hz / 2 - (min_low_hz + min_band_hz)), half + 1)
        hz = _mel_to_hz(mel)
        self.low_hz_ = nn.Parameter(hz[:-1].view(-1, 1))
        self.band_hz_ = nn.Parameter((hz[1:] - hz[:-1]).view(-1, 1))
        half_kernel = kernel_size // 2
        n_lin = torch.arange(half_kernel, dtype=torch.float32)
        self.register_buffer("window_", 0.54 - 0.46 * torch.cos(2 * math.pi * n_lin / (kernel_size - 1)))
        n = 2 * math.pi * torch.arange(-half_kernel, 0, dtype=torch.float32) / sample_rate_hz
        self.register_buffer("n_", n.view(1, -1))

    def filters(self) -> torch.Tensor:
        """(num_filters, 1, kernel_size): cos filters then sin filters."""
        low = self.min_low_hz + torch.abs(self.low_hz_)
        high = torch.clamp(low + self.min_band_hz + torch.abs(self.band_hz_), self.min_low_hz, self.sample_rate_hz / 2)
        band = (high - low)[:, 0]
        phase_low = low @ self.n_
        phase_high = high @ self.n_
        half_n = self.n_ / 2
        cos_left = (torch.sin(phase_high) - torch.sin(phase_low)) / half_n * self.window_
        sin_left = (torch.cos(phase_low) - torch.cos(phase_high)) / half_n * self.window_
        centre = 2 * band.view(-1, 1)
        cos_filters = torch.cat([cos_left, centre, torch.flip(cos_left, dims=[1])], dim=1)
        sin_filters = torch.cat([sin_left, torch.zeros_like(centre), -torch.flip(sin_left, dims=[1])], dim=1)
        scale = 2 * band.view(-1, 1)
        return torch.cat([cos_filters / scale, sin_filters / scale], dim=0).view(self.num_filters, 1, self.kernel_size)


def _hz_to_mel(hz: float) -> float:
    return 2595 * math.log10(1 + hz / 700)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700 * (10 ** (mel / 2595) - 1)


class SincEncoder(nn.Module):
    """Strided convolution with the sinc filterbank (key ``filterbank``)."""

    def __init__(self, stride: int = 10) -> None:
        super().__init__()
        self.filterbank = SincFilterbank()
        self.stride = stride

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return F.conv1d(waveforms, self.filterbank.filters(), stride=self.stride)


class SincNet(nn.Module):
    """(batch, 1, samples) -> (batch, 60, frames)."""

    def __init__(self, stride: int = 10) -> None:
        super().__init__()
        self.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
        self.conv1d = nn.ModuleList([SincEncoder(stride), nn.Conv1d(80, 60, 5), nn.Conv1d(60, 60, 5)])
        self.pool1d = nn.ModuleList([nn.MaxPool1d(3, stride=3) for _ in range(3)])
        self.norm1d = nn.ModuleList([nn.InstanceNorm1d(80, affine=True), nn.InstanceNorm1d(60, affine=True),
                                     nn.InstanceNorm1d(60, affine=True)])

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        responses = self.conv1d[0](self.wav_norm1d(waveforms))
        return self.after_pool(self.pool1d[0](torch.abs(responses)))  # abs: rectify the sinc responses

    def after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """The layers after the first max-pool: (batch, 80, 5325) max-pooled absolute sinc responses
        -> (batch, 60, 589). Order as pyannote.audio's SincNet: sinc conv, abs, max-pool, instance
        norm, leaky ReLU, then twice conv, max-pool, instance norm, leaky ReLU."""
        features = F.leaky_relu(self.norm1d[0](pooled))
        for conv, pool, norm in zip(self.conv1d[1:], self.pool1d[1:], self.norm1d[1:]):
            features = F.leaky_relu(norm(pool(conv(features))))
        return features


class PyanNet(nn.Module):
    """pyannote segmentation-3.0: (batch, 1, 160000) -> (batch, 589, 7) powerset log-probabilities."""

    frames = SEGMENTATION_FRAMES

    def __init__(self, lstm_hidden_size: int = 128, lstm_num_layers: int = 4, linear_hidden_size: int = 128,
                 linear_num_layers: int = 2, num_classes: int = NUM_POWERSET_CLASSES) -> None:
        super().__init__()
        self.sincnet = SincNet()
        self.lstm = nn.LSTM(60, lstm_hidden_size, num_layers=lstm_num_layers, bidirectional=True,
                            batch_first=True)
        sizes = [2 * lstm_hidden_size] + [linear_hidden_size] * linear_num_layers
        self.linear = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.head(self.sincnet(waveforms))

    def head(self, sincnet_features: torch.Tensor) -> torch.Tensor:
        """(batch, 60, frames) SincNet output -> (batch, frames, 7) log-probabilities."""
        features, _ = self.lstm(sincnet_features.transpose(1, 2))  # (batch, frames, 60) in
        for linear in self.linear:
            features = F.leaky_relu(linear(features))
        return F.log_softmax(self.classifier(features), dim=-1)

    @staticmethod
    def num_output_frames(num_samples: int) -> int:
        """Frames produced for a chunk of ``num_samples`` (589 for 160000)."""
        return segmentation_num_frames(num_samples)


# ----------------------------------------------------------------------------------------------
# ``segmentation.sinc_shared``: PyanNet split after its sinc convolution (pipeline.segmentation)


class SincFront(nn.Module):
    """The sinc convolution of the raw (not normalized) waveform, max-pooled as PyanNet's first pool,
    and the same pool of its negation: (batch, 1, samples) float32 at 16 kHz -> ``sinc_max``,
    ``sinc_max_neg`` (batch, 80, frames // 3) float32, ``frames = (samples - 251) // 10 + 1``.

    Why this is enough to finish PyanNet per chunk (``SincRest``): ``wav_norm1d``
    (``InstanceNorm1d(1, affine=True)``: per chunk ``gamma * (x - mean) / sqrt(var + eps) + beta``) is
    an affine map of the chunk by two scalars and the convolution is linear without a bias, so
    ``conv(norm(x)) = a * conv(x) + c * S`` with ``a = gamma / sqrt(var + eps)``, ``c = beta - a *
    mean`` and ``S`` each filter's sum of taps. The next layers are ``abs`` and a max-pool of 3; over
    a window, ``max |a y + c S|`` is ``max(u, -v)`` with ``u``, ``v`` the affine map at the window's
    largest and smallest ``y`` (``a > 0``; float rounding is monotone, so this holds exactly). The raw
    responses can thus be computed and pooled once over a stretch of overlapping chunks whose starts
    differ by multiples of 30 samples, and sliced per chunk.
    """

    def __init__(self, model: PyanNet) -> None:
        super().__init__()
        sincnet = model.sincnet
        self.encoder, self.pool = sincnet.conv1d[0], sincnet.pool1d[0]

    def forward(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        responses = self.encoder(waveforms)
        return self.pool(responses), self.pool(-responses)


class SincRest(nn.Module):
    """PyanNet after its first max-pool, from ``SincFront``'s pooled raw responses of one chunk:
    ``sinc_max``, ``sinc_max_neg`` (batch, 80, 5325), ``waveform_mean`` and ``waveform_variance``
    (batch, 1) (the chunk's mean and biased variance, what ``InstanceNorm1d`` normalizes by) ->
    ``logprobs (batch, 589, 7)``. Equals ``PyanNet`` on the chunk up to float32 rounding
    (``SincFront``: why).

    Raises:
        ValueError: the checkpoint's ``wav_norm1d`` scale is not positive (segmentation-3.0's is 0.0099).
    """

    def __init__(self, model: PyanNet) -> None:
        super().__init__()
        if not bool(torch.all(model.sincnet.wav_norm1d.weight > 0)):
            raise ValueError("segmentation.sinc_shared needs a positive sincnet.wav_norm1d.weight in the checkpoint")
        self.model = model

    def forward(self, sinc_max: torch.Tensor, sinc_max_neg: torch.Tensor, waveform_mean: torch.Tensor,
                waveform_variance: torch.Tensor) -> torch.Tensor:
        sincnet = self.model.sincnet
        norm = sincnet.wav_norm1d
        scale = norm.weight * torch.rsqrt(waveform_variance + norm.eps)  # (batch, 1)
        taps_sum = sincnet.conv1d[0].filterbank.filters().sum(dim=-1)  # (80, 1): each filter's response to 1
        offset = (norm.bias - scale * waveform_mean)[:, :, None] * taps_sum[None]  # (batch, 80, 1)
        scale = scale[:, :, None]
        # max-pool of |a y + c S| = max(a max(y) + c S, a max(-y) - c S) (a > 0)
        pooled = torch.maximum(scale * sinc_max + offset, scale * sinc_max_neg - offset)
        return self.model.head(sincnet.after_pool(pooled))
