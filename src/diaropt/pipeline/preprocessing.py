"""Embedding-preprocessor stage: powerset decoding, embedding masks, speaker count.

Array conventions (pyannote segmentation-3.0):

* ``logprobs``: ``(num_chunks, num_frames, 7)`` float32 powerset log-probabilities over the
  classes ``[none, {0}, {1}, {2}, {0,1}, {0,2}, {1,2}]`` of 3 local speakers.
* ``segmentations``: ``(num_chunks, num_frames, 3)`` float32 hard ``{0, 1}`` multilabel
  activations of the local speakers (one column per local speaker slot).
* ``chunk_starts_s``: ``(num_chunks,)`` chunk start times in seconds, always passed explicitly
  (the last chunk may be aligned to the end of the file, so starts are never re-derived).
* ``frames``: a ``SlidingWindow``-like object (``start``, ``duration``, ``step`` in seconds)
  describing the frames *inside a chunk*, relative to the chunk start.

Output frame grid (shared with :mod:`diaropt.pipeline.reconstruction`): output frame ``t``
covers ``[frames.start + t * frames.step, ... + frames.duration]`` on the file timeline,
i.e. the chunk-relative frame window is reused as-is on the file timeline. Local frame ``j``
of chunk ``c`` lands on output frame ``chunk_frame_offsets(...)[c] + j`` with offset
``rint(chunk_starts_s[c] / frames.step)`` (the same rounding as pyannote's
``Inference.aggregate``; the misalignment is at most ``frames.step / 2``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from pyannote.core import SlidingWindow

from diaropt.models.constants import SEGMENTATION_FRAMES as _MODEL_FRAMES

__all__ = [
    "POWERSET_MAPPING",
    "SEGMENTATION_FRAMES",
    "FrameWindow",
    "powerset_to_multilabel",
    "clean_frame_masks",
    "embedding_masks",
    "active_local_speakers",
    "chunk_frame_offsets",
    "num_output_frames",
    "output_frames",
    "overlap_add",
    "speaker_count",
]

#: Powerset class -> local speaker membership, shape (7, 3):
#: rows are [none, {0}, {1}, {2}, {0,1}, {0,2}, {1,2}].
POWERSET_MAPPING: np.ndarray = np.array(
    [
        [0, 0, 0],
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 1],
        [1, 1, 0],
        [1, 0, 1],
        [0, 1, 1],
    ],
    dtype=np.float32,
)
POWERSET_MAPPING.setflags(write=False)

#: Frame timing of segmentation-3.0 relative to the chunk start (seconds), from the model.
SEGMENTATION_FRAMES = SlidingWindow(start=_MODEL_FRAMES.start_s, duration=_MODEL_FRAMES.duration_s,
                                    step=_MODEL_FRAMES.step_s)


class FrameWindow(Protocol):
    """Anything with ``start``/``duration``/``step`` in seconds (e.g. ``SlidingWindow``)."""

    start: float
    duration: float
    step: float


def _check_segmentations(segmentations: np.ndarray) -> np.ndarray:
    segmentations = np.asarray(segmentations)
    if segmentations.ndim != 3:
        raise ValueError(
            "segmentations must be (num_chunks, num_frames, num_local_speakers), "
            f"got shape {segmentations.shape}"
        )
    return segmentations


def powerset_to_multilabel(logprobs: np.ndarray) -> np.ndarray:
    """Hard-decode powerset scores into multilabel local-speaker activations.

    ``(num_chunks, num_frames, 7)`` log-probabilities (any monotonic score works) ->
    ``(num_chunks, num_frames, 3)`` float32 in ``{0, 1}``: one-hot(argmax) @ ``POWERSET_MAPPING``.
    Ties in the argmax go to the lowest class index (``np.argmax`` semantics).
    """
    logprobs = np.asarray(logprobs)
    num_classes = POWERSET_MAPPING.shape[0]
    if logprobs.ndim != 3 or logprobs.shape[-1] != num_classes:
        raise ValueError(
            f"logprobs must be (num_chunks, num_frames, {num_classes}), got {logprobs.shape}"
        )
    best_class = np.argmax(logprobs, axis=-1)  # (num_chunks, num_frames)
    # Indexing the mapping by the argmax is exactly one_hot(argmax) @ mapping.
    return POWERSET_MAPPING[best_class].astype(np.float32, copy=True)


def clean_frame_masks(segmentations: np.ndarray) -> np.ndarray:
    """Restrict activations to "clean" frames where fewer than two local speakers are active.

    ``(num_chunks, num_frames, num_local_speakers)`` -> same shape float32: a local speaker's
    mask is kept on frames where it is the only active speaker and zeroed on overlapped frames.
    """
    segmentations = _check_segmentations(segmentations)
    num_active = np.sum(segmentations, axis=-1, keepdims=True)
    return (segmentations * (num_active < 2)).astype(np.float32)


def embedding_masks(
    segmentations: np.ndarray,
    min_num_clean_frames: int | None = None,
    *,
    min_clean_frames_ratio: float | None = None,
) -> np.ndarray:
    """Per (chunk, local speaker) frame mask used to pool the speaker embedding.

    ``(num_chunks, num_frames, 3)`` -> ``(num_chunks, num_frames, 3)`` float32. Like pyannote's
    ``exclude_overlap=True``: the clean (non-overlapped) mask is used when it has *strictly more*
    than the minimum number of active frames, else the full mask. Give at most one of
    ``min_num_clean_frames`` (frames) or ``min_clean_frames_ratio`` (fraction of
    ``num_frames``, rounded up); if neither is given the minimum is 0 (any clean frame suffices).
    pyannote derives the minimum as ``ceil(num_frames * min_num_samples / num_samples_per_chunk)``
    from the embedding model's minimum input length.
    """
    segmentations = _check_segmentations(segmentations)
    if min_num_clean_frames is not None and min_clean_frames_ratio is not None:
        raise ValueError("give min_num_clean_frames or min_clean_frames_ratio, not both")
    num_frames = segmentations.shape[1]
    if min_clean_frames_ratio is not None:
        min_frames = int(np.ceil(min_clean_frames_ratio * num_frames))
    else:
        min_frames = int(min_num_clean_frames or 0)
    full = segmentations.astype(np.float32)
    clean = clean_frame_masks(segmentations)
    use_clean = np.sum(clean, axis=1) > min_frames  # (num_chunks, num_local_speakers)
    return np.where(use_clean[:, None, :], clean, full)


def active_local_speakers(segmentations: np.ndarray, min_active_frames: int = 1) -> np.ndarray:
    """Local speakers worth embedding.

    ``(num_chunks, num_frames, 3)`` -> ``(num_chunks, 3)`` bool, True where the local speaker
    is active on at least ``min_active_frames`` frames. With the default of 1 this is pyannote's
    rule (only all-silent slots are skipped). Skipped slots must get NaN embeddings downstream,
    which the clustering turns into ``-2``.
    """
    segmentations = _check_segmentations(segmentations)
    return np.sum(segmentations > 0, axis=1) >= min_active_frames


def chunk_frame_offsets(chunk_starts_s: np.ndarray, frames: FrameWindow) -> np.ndarray:
    """Output-grid index of each chunk's first frame: ``(num_chunks,)`` int64.

    ``rint(chunk_starts_s / frames.step)``; see the module docstring for the grid convention.
    """
    chunk_starts_s = np.asarray(chunk_starts_s, dtype=np.float64).reshape(-1)
    if np.any(chunk_starts_s < 0):
        raise ValueError("chunk starts must be non-negative")
    return np.rint(chunk_starts_s / float(frames.step)).astype(np.int64)


def num_output_frames(
    chunk_starts_s: np.ndarray, num_frames_per_chunk: int, frames: FrameWindow
) -> int:
    """Number of output frames needed to hold every chunk frame (last chunk end included)."""
    offsets = chunk_frame_offsets(chunk_starts_s, frames)
    if offsets.size == 0:
        return 0
    return int(offsets.max()) + int(num_frames_per_chunk)


def output_frames(frames: FrameWindow) -> SlidingWindow:
    """The file-level output frame grid (same start/duration/step as the chunk frames)."""
    return SlidingWindow(
        start=float(frames.start), duration=float(frames.duration), step=float(frames.step)
    )


def overlap_add(
    chunk_values: np.ndarray,
    chunk_starts_s: np.ndarray,
    frames: FrameWindow,
    *,
    num_out_frames: int | None = None,
    average: bool = True,
    missing: float = 0.0,
) -> np.ndarray:
    """Overlap-add per-chunk frame values into the file-level frame grid.

    ``chunk_values (num_chunks, num_frames, num_classes)`` -> ``(num_out_frames, num_classes)``
    float64. NaN inputs are ignored (they neither add nor count as coverage). With
    ``average=True`` each output frame is the mean over the chunks covering it (no Hamming
    window, no warm-up); with ``average=False`` it is the plain sum (pyannote's
    ``skip_average``). Output frames covered by no (non-NaN) chunk value are set to
    ``missing``. Chunk frames beyond ``num_out_frames`` are dropped.
    """
    chunk_values = np.asarray(chunk_values, dtype=np.float64)
    if chunk_values.ndim != 3:
        raise ValueError(f"chunk_values must be 3-D, got shape {chunk_values.shape}")
    num_chunks, num_frames, num_classes = chunk_values.shape
    offsets = chunk_frame_offsets(chunk_starts_s, frames)
    if offsets.shape[0] != num_chunks:
        raise ValueError(
            f"got {offsets.shape[0]} chunk starts for {num_chunks} chunks of values"
        )
    if num_out_frames is None:
        num_out_frames = int(offsets.max()) + num_frames if num_chunks else 0

    valid = ~np.isnan(chunk_values)
    values = np.where(valid, chunk_values, 0.0)
    total = np.zeros((num_out_frames, num_classes), dtype=np.float64)
    coverage = np.zeros((num_out_frames, num_classes), dtype=np.float64)
    for offset, chunk_value, chunk_valid in zip(offsets, values, valid):
        stop = min(offset + num_frames, num_out_frames)
        if stop <= offset:
            continue
        length = stop - offset
        total[offset:stop] += chunk_value[:length]
        coverage[offset:stop] += chunk_valid[:length]

    out = total / np.maximum(coverage, 1.0) if average else total
    out[coverage == 0] = missing
    return out


def speaker_count(
    segmentations: np.ndarray,
    chunk_starts_s: np.ndarray,
    frames: FrameWindow = SEGMENTATION_FRAMES,
    *,
    num_out_frames: int | None = None,
) -> np.ndarray:
    """Instantaneous number of speakers on the output frame grid.

    ``segmentations (num_chunks, num_frames, 3)`` hard activations, ``chunk_starts_s
    (num_chunks,)`` -> ``(num_out_frames,)`` uint8: per chunk frame the number of active local
    speakers, averaged over the overlapping chunks and rounded with ``np.rint`` (half to even),
    as pyannote's ``speaker_count`` (no warm-up trimming). ``num_out_frames`` defaults to
    :func:`num_output_frames`; frames covered by no chunk get 0.
    """
    segmentations = _check_segmentations(segmentations)
    per_chunk_count = np.sum(segmentations, axis=-1, keepdims=True, dtype=np.float64)
    averaged = overlap_add(
        per_chunk_count,
        chunk_starts_s,
        frames,
        num_out_frames=num_out_frames,
        average=True,
        missing=0.0,
    )
    return np.rint(averaged[:, 0]).astype(np.uint8)
