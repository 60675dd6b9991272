"""Embedding stage: one embedding per active (chunk, local speaker), masked pooling, batched.

Contract: ``audio (num_samples,)``, ``starts (num_chunks,)``, ``masks (num_chunks, num_frames, 3)``,
``active (num_chunks, 3) bool`` -> ``embeddings (num_chunks, 3, dimension)`` float32, NaN rows for
inactive local speakers (skipped, never embedded). The model is any backend's ``RunnableModel``
with inputs ``waveforms (batch, chunk_samples)`` and ``masks (batch, num_frames)`` and output
``embeddings (batch, dimension)``, or, per chunk (``embedding.shared_trunk``), ``masks (batch,
num_frames, 3)`` -> ``embeddings (batch, 3, dimension)``; ``variants.fusion`` builds both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diaropt.backends.base import RunnableModel
from diaropt.pipeline.audio import make_chunks
from diaropt.pipeline.segmentation import run_batched_all


def embed(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int, masks: np.ndarray,
          active: np.ndarray, batch_size: int, dimension: int,
          on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """``embeddings (num_chunks, 3, dimension)``, NaN for inactive local speakers."""
    return embed_outputs(model, audio, starts, chunk_samples, masks, active, batch_size, dimension,
                         on_batch)["embeddings"]


def per_chunk(model: RunnableModel) -> bool:
    """True for a per-chunk model (masks (batch, num_frames, 3) -> (batch, 3, dimension))."""
    return next(len(spec.shape) for spec in model.inputs if spec.name == "masks") == 3


def embed_outputs(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                  masks: np.ndarray, active: np.ndarray, batch_size: int, dimension: int,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Every per-speaker output of the embedding model as ``(num_chunks, 3, ...)``, NaN where inactive:
    ``embeddings`` and, from an ``embedding_with_post`` model, ``unit_embeddings`` (and per chunk
    ``distances (num_chunks, 3, 3)``, NaN rows/columns of inactive slots).

    A per-pair model gets one row per active (chunk, speaker) pair, ``batch_size`` pairs per call; a
    per-chunk model (``embedding.shared_trunk``) one row per chunk with an active speaker,
    ``batch_size`` chunks per call.
    """
    num_chunks, num_frames, num_local_speakers = masks.shape
    shape = (num_chunks, num_local_speakers)
    names = [spec.name for spec in model.outputs if spec.name in ("embeddings", "unit_embeddings", "distances")]
    results = {name: np.full((*shape, num_local_speakers if name == "distances" else dimension), np.nan,
                             dtype=np.float32) for name in names}
    if per_chunk(model):
        chunk_rows = np.flatnonzero(active.any(axis=1))
        for first in range(0, len(chunk_rows), batch_size):
            chunks = chunk_rows[first: first + batch_size]
            feeds = {"waveforms": make_chunks(audio, starts[chunks], chunk_samples),
                     "masks": np.ascontiguousarray(masks[chunks], dtype=np.float32)}
            for name, value in run_batched_all(model, feeds).items():
                if name in results:
                    results[name][chunks] = value
            if on_batch is not None:
                on_batch(int(active[chunks].sum()))
        return mask_inactive(results, active)
    chunk_index, speaker_index = np.nonzero(active)  # (num_active,) pairs in chunk order
    for first in range(0, len(chunk_index), batch_size):
        chunks = chunk_index[first: first + batch_size]
        speakers = speaker_index[first: first + batch_size]
        feeds = {"waveforms": make_chunks(audio, starts[chunks], chunk_samples),
                 "masks": np.ascontiguousarray(masks[chunks, :, speakers], dtype=np.float32)}
        for name, value in run_batched_all(model, feeds).items():
            if name in results:
                results[name][chunks, speakers] = value
        if on_batch is not None:
            on_batch(len(chunks))
    return results


def mask_inactive(results: dict[str, np.ndarray], active: np.ndarray) -> dict[str, np.ndarray]:
    """NaN for inactive slots (``(num_chunks, 3, ...)`` arrays; ``distances`` rows and columns)."""
    for name, value in results.items():
        value[~active] = np.nan
        if name == "distances":
            value.transpose(0, 2, 1)[~active] = np.nan
    return results
