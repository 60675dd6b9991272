"""Audio stage: decode any soundfile format, downmix, resample to 16 kHz, cut into chunks.

Contract: ``load_audio(path) -> (num_samples,) float32`` at 16 kHz mono;
``chunk_starts(num_samples, ...) -> (num_chunks,) int64`` sample offsets (the last chunk aligned to
the end of the file); ``make_chunks(audio, starts[batch]) -> (batch, chunk_samples) float32`` for one
batch at a time (all chunks of an hour at a 1 s step would be 2.3 GB), zero-padded when the file is
shorter than one chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE_HZ = 16000


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the problem."""


def load_audio(path: str | Path, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """(num_samples,) float32 mono at ``sample_rate_hz``: channels averaged, resampled with soxr (HQ)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, file_rate_hz = sf.read(path, dtype="float32", always_2d=True)  # (num_samples, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{path}: not a readable audio file ({error})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: contains NaN or Inf samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate_hz != sample_rate_hz:
        import soxr

        mono = soxr.resample(mono, file_rate_hz, sample_rate_hz, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def chunk_starts(num_samples: int, chunk_samples: int, step_samples: int) -> np.ndarray:
    """(num_chunks,) start samples: every ``step_samples``, plus one chunk aligned to the end.

    A file shorter than one chunk gets a single chunk at 0 (padded by ``make_chunks``).
    """
    if step_samples <= 0 or step_samples > chunk_samples:
        raise ValueError(f"step ({step_samples} samples) must be in (0, chunk = {chunk_samples} samples]")
    if num_samples <= chunk_samples:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, num_samples - chunk_samples + 1, step_samples, dtype=np.int64)
    if starts[-1] + chunk_samples < num_samples:
        starts = np.append(starts, num_samples - chunk_samples)
    return starts


def make_chunks(audio: np.ndarray, starts: np.ndarray, chunk_samples: int) -> np.ndarray:
    """(len(starts), chunk_samples) float32 windows of ``audio (num_samples,)``: call per batch."""
    if audio.shape[0] < chunk_samples:
        audio = np.pad(audio, (0, chunk_samples - audio.shape[0]))
    index = starts[:, None] + np.arange(chunk_samples)[None, :]
    return audio[index]
