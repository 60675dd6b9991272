"""Kaldi-compatible log-mel filterbank in torch, with a choice of frame-extraction graph.

Numbers follow Kaldi's ``compute-fbank-feats`` defaults (snip_edges, no dither, DC offset removed,
pre-emphasis 0.97, 25 ms / 10 ms frames, FFT size 512, mel filters from 20 Hz to Nyquist, power
spectrum, log floored at float32 epsilon). Everything between the frame extraction and the squared
magnitude is linear, so DC removal, pre-emphasis, window and the real DFT are folded into one
(frame_length, 2 * num_fft_bins) matrix computed once in float64.

``frame_extraction`` decides only the graph (the design note's bottleneck), not the numbers:

- ``per_frame``: one slice per frame (998 slices for a 10 s chunk: the ~1000-SliceByIndex baseline);
- ``batched``: one gather per block of ``frame_batch_size`` frames (ceil(998 / k) ops);
- ``strided``: a single strided convolution with an identity kernel (no slicing). Its frames are
  bit-identical copies, so every mode gives the same numbers.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diaropt.models.constants import num_fbank_frames  # noqa: F401  (torch-free; re-exported)

FrameExtraction = Literal["per_frame", "batched", "strided"]
FRAME_EXTRACTION_MODES: tuple[str, ...] = ("per_frame", "batched", "strided")
WindowType = Literal["povey", "hamming", "hanning"]


def _window(window_type: str, length: int) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    cosine = np.cos(2 * math.pi * n / (length - 1))
    if window_type == "povey":
        return (0.5 - 0.5 * cosine) ** 0.85
    if window_type == "hamming":
        return 0.54 - 0.46 * cosine
    if window_type == "hanning":
        return 0.5 - 0.5 * cosine
    raise ValueError(f"unknown window_type {window_type!r}; expected povey, hamming or hanning")


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_mel_matrix(num_mel_bins: int, fft_size: int, sample_rate_hz: int, low_freq_hz: float = 20.0,
                     high_freq_hz: float = 0.0) -> np.ndarray:
    """(fft_size // 2 + 1, num_mel_bins) triangular mel weights on Kaldi's mel scale.

    ``high_freq_hz <= 0`` is relative to Nyquist, as in Kaldi. The Nyquist bin gets no weight.
    """
    nyquist = sample_rate_hz / 2
    high = high_freq_hz if high_freq_hz > 0 else nyquist + high_freq_hz
    mel_low, mel_high = _mel(low_freq_hz), _mel(high)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
    bin_mels = _mel(np.arange(fft_size // 2) * sample_rate_hz / fft_size)  # (fft_size // 2,)
    left = mel_low + np.arange(num_mel_bins) * mel_delta
    centre, right = left + mel_delta, left + 2 * mel_delta
    rising = (bin_mels[:, None] - left) / (centre - left)
    falling = (right - bin_mels[:, None]) / (right - centre)
    weights = np.where(bin_mels[:, None] <= centre, rising, falling)
    weights = np.where((bin_mels[:, None] > left) & (bin_mels[:, None] < right), weights, 0.0)
    return np.concatenate([weights, np.zeros((1, num_mel_bins))], axis=0)


def folded_dft_matrix(frame_length: int, fft_size: int, window_type: str, preemphasis: float,
                      remove_dc_offset: bool) -> np.ndarray:
    """(frame_length, 2 * (fft_size // 2 + 1)) float64: frame -> [real DFT | imaginary DFT].

    Folds DC-offset removal, pre-emphasis (first sample against itself, as Kaldi) and the window
    into the DFT of the zero-padded frame.
    """
    transform = np.eye(frame_length)
    if remove_dc_offset:
        transform = transform - np.full((frame_length, frame_length), 1.0 / frame_length)
    emphasis = np.eye(frame_length)
    emphasis[np.arange(1, frame_length), np.arange(frame_length - 1)] = -preemphasis
    emphasis[0, 0] = 1.0 - preemphasis
    transform = np.diag(_window(window_type, frame_length)) @ emphasis @ transform  # column-vector form
    num_bins = fft_size // 2 + 1
    phase = 2 * math.pi * np.outer(np.arange(frame_length), np.arange(num_bins)) / fft_size
    dft = np.concatenate([np.cos(phase), -np.sin(phase)], axis=1)  # (frame_length, 2 * num_bins)
    return transform.T @ dft


class KaldiFbank(nn.Module):
    """(batch, num_samples) waveform in [-1, 1] -> (batch, num_frames, num_mel_bins) log-mel.

    ``input_scale`` multiplies the waveform first (WeSpeaker models expect int16 range: 32768).
    ``subtract_mean`` removes the per-chunk mean of each mel bin over time (CMN), as both CAM++
    and WeSpeaker were trained.
    """

    def __init__(self, num_mel_bins: int = 80, sample_rate_hz: int = 16000, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, window_type: WindowType = "povey", preemphasis: float = 0.97,
                 remove_dc_offset: bool = True, low_freq_hz: float = 20.0, high_freq_hz: float = 0.0,
                 input_scale: float = 1.0, subtract_mean: bool = True,
                 frame_extraction: FrameExtraction = "per_frame", frame_batch_size: int = 64) -> None:
        super().__init__()
        if frame_extraction not in FRAME_EXTRACTION_MODES:
            raise ValueError(f"unknown frame_extraction {frame_extraction!r}; expected one of {FRAME_EXTRACTION_MODES}")
        if frame_batch_size < 1:
            raise ValueError(f"frame_batch_size must be >= 1, got {frame_batch_size}")
        self.frame_length = int(round(sample_rate_hz * frame_length_ms / 1000))
        self.frame_shift = int(round(sample_rate_hz * frame_shift_ms / 1000))
        self.fft_size = 1 << (self.frame_length - 1).bit_length()
        self.num_fft_bins = self.fft_size // 2 + 1
        self.input_scale = float(input_scale)
        self.subtract_mean = subtract_mean
        self.frame_extraction = frame_extraction
        self.frame_batch_size = frame_batch_size
        dft = folded_dft_matrix(self.frame_length, self.fft_size, window_type, preemphasis, remove_dc_offset)
        mel = kaldi_mel_matrix(num_mel_bins, self.fft_size, sample_rate_hz, low_freq_hz, high_freq_hz)
        self.register_buffer("dft", torch.from_numpy(dft).float(), persistent=False)
        # [mel; mel]: squared [real | imag] spectra @ this = power spectrum @ mel, without a split
        self.register_buffer("mel", torch.from_numpy(np.concatenate([mel, mel])).float(), persistent=False)
        if frame_extraction == "strided":
            identity = torch.eye(self.frame_length).unsqueeze(1)  # (frame_length, 1, frame_length)
            self.register_buffer("identity_kernel", identity, persistent=False)
        self.log_floor = float(torch.finfo(torch.float32).eps)

    def num_frames(self, num_samples: int) -> int:
        return num_fbank_frames(num_samples, self.frame_length, self.frame_shift)

    def frames(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, num_samples) -> (batch, num_frames, frame_length), by slices, gathers or a conv."""
        num_frames = self.num_frames(int(waveforms.shape[-1]))  # static under tracing
        if num_frames == 0:
            raise ValueError(f"{waveforms.shape[-1]} samples is shorter than one {self.frame_length}-sample frame")
        length, shift = self.frame_length, self.frame_shift
        if self.frame_extraction == "strided":
            return F.conv1d(waveforms.unsqueeze(1), self.identity_kernel, stride=shift).transpose(1, 2)
        if self.frame_extraction == "per_frame":
            return torch.stack([waveforms[:, i * shift: i * shift + length] for i in range(num_frames)], dim=1)
        if self.frame_extraction == "batched":
            blocks = []
            for first in range(0, num_frames, self.frame_batch_size):
                count = min(self.frame_batch_size, num_frames - first)
                index = np.arange(count)[:, None] * shift + np.arange(length)[None, :] + first * shift
                blocks.append(waveforms[:, torch.from_numpy(index.reshape(-1))].reshape(-1, count, length))
            return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        raise AssertionError(self.frame_extraction)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if self.input_scale != 1.0:
            waveforms = waveforms * self.input_scale
        spectra = self.frames(waveforms) @ self.dft  # (batch, num_frames, 2 * num_fft_bins)
        mel_energies = (spectra * spectra) @ self.mel  # (batch, num_frames, num_mel_bins)
        features = torch.log(torch.clamp(mel_energies, min=self.log_floor))
        if self.subtract_mean:
            features = features - features.mean(dim=1, keepdim=True)
        return features
