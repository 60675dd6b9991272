"""Audio stage: decode any soundfile format, downmix, resample to 16 kHz, cut into chunks.

Contract: ``load_audio(path) -> (num_samples,) float32`` at 16 kHz mono;
``chunk_starts(num_samples, ...) -> (num_chunks,) int64`` sample offsets (the last chunk aligned to
the end of the file); ``make_chunks(audio, starts[batch]) -> (batch, chunk_samples) float32`` for one
batch at a time (all chunks of an hour at a 1 s step would be 2.3 GB), zero-padded when the file is
shorter than one chunk.

Files are decoded block by block (downmixed and resampled per block with a streaming soxr
resampler), so loading needs the 16 kHz mono result (230 MB for an hour) plus one block, whatever
the file's rate, channel count or sample format. Refused with an :class:`AudioError` naming the file:
a missing, empty (0 bytes) or undecodable file (text named ``.wav``, corrupt or truncated header),
a file without samples, shorter than :data:`MIN_DURATION_S`, or with NaN/Inf samples. Clipped audio
is used as is, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
#: Shorter files are refused: not enough context for one speaker turn (and for the embedding's
#: minimum of clean frames); the segmentation model itself sees 10 s windows.
MIN_DURATION_S = 0.5
#: Frames decoded per block (about 5 s at 48 kHz).
BLOCK_FRAMES = 1 << 18
#: A sample at or above this magnitude (full scale = 1) counts as clipped.
_CLIP_LEVEL = 0.999
#: Warn when more than this fraction of the samples is clipped.
_CLIP_WARN_FRACTION = 1e-3


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the problem."""


def load_audio(path: str | Path, sample_rate_hz: int = SAMPLE_RATE_HZ, *,
               min_duration_s: float = MIN_DURATION_S, block_frames: int = BLOCK_FRAMES) -> np.ndarray:
    """(num_samples,) float32 mono at ``sample_rate_hz``: channels averaged, resampled with soxr (HQ).

    Raises:
        AudioError: missing, empty, undecodable, sample-less, too short, or non-finite audio.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            return _decode(f, path, sample_rate_hz, min_duration_s, block_frames)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as error:
        raise AudioError(f"{path}: not a readable audio file ({error})") from error


def _decode(f: sf.SoundFile, path: Path, sample_rate_hz: int, min_duration_s: float,
            block_frames: int) -> np.ndarray:
    file_rate_hz = int(f.samplerate)
    if file_rate_hz <= 0:
        raise AudioError(f"{path}: invalid sample rate {file_rate_hz} Hz in the header")
    resampler = None
    if file_rate_hz != sample_rate_hz:
        import soxr

        resampler = soxr.ResampleStream(file_rate_hz, sample_rate_hz, 1, dtype="float32", quality="HQ")
    expected = int(np.ceil(max(f.frames, 0) * sample_rate_hz / file_rate_hz)) + 64
    out = np.empty(expected, dtype=np.float32)
    filled = frames_read = num_clipped = 0

    def append(block: np.ndarray) -> None:
        nonlocal out, filled
        if filled + block.shape[0] > out.shape[0]:  # header under-reported the length
            out = np.concatenate([out[:filled], np.empty(max(block.shape[0], out.shape[0] // 2), np.float32)])
        out[filled : filled + block.shape[0]] = block
        filled += block.shape[0]

    while True:
        block = f.read(block_frames, dtype="float32", always_2d=True)  # (frames, channels)
        num = block.shape[0]
        if num and not np.isfinite(block).all():
            bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0]) + frames_read
            raise AudioError(f"{path}: contains NaN or Inf samples (first at sample {bad}, "
                             f"{bad / file_rate_hz:.3f} s)")
        num_clipped += int(np.count_nonzero(np.abs(block) >= _CLIP_LEVEL)) if num else 0
        frames_read += num
        last = num < block_frames
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        if resampler is not None:
            mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
        append(mono)
        if last:
            break
    if frames_read == 0:
        raise AudioError(f"{path}: contains no samples")
    duration_s = frames_read / file_rate_hz
    if duration_s < min_duration_s:
        raise AudioError(f"{path}: too short ({duration_s:.3f} s; at least {min_duration_s} s is needed)")
    if num_clipped > _CLIP_WARN_FRACTION * frames_read * f.channels:
        log.warning("%s: %.2f %% of the samples are clipped (|x| >= %.3f); diarizing it as is", path,
                    100 * num_clipped / (frames_read * f.channels), _CLIP_LEVEL)
    return out[:filled]


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
    """(len(starts), chunk_samples) windows of ``audio (num_samples,)`` (its dtype), zeros past its end
    (a file shorter than one chunk; a window that runs past the last sample): call per batch."""
    end = int(starts.max(initial=0)) + chunk_samples  # initial: an empty batch still has a shape
    if audio.shape[0] < end:
        audio = np.pad(audio, (0, end - audio.shape[0]))
    index = starts[:, None] + np.arange(chunk_samples)[None, :]
    return audio[index]
