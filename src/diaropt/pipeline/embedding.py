"""Embedding stage: one embedding per active (chunk, local speaker), masked pooling, batched.

Contract: ``audio (num_samples,)``, ``starts (num_chunks,)``, ``masks (num_chunks, num_frames, 3)``,
``active (num_chunks, 3) bool`` -> ``embeddings (num_chunks, 3, dimension)`` float32, NaN rows for
inactive local speakers (skipped, never embedded). The model is any backend's ``RunnableModel``
with inputs ``waveforms (batch, chunk_samples)`` and ``masks (batch, num_frames)`` and output
``embeddings (batch, dimension)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diaropt.backends.base import RunnableModel
from diaropt.pipeline.audio import make_chunks
from diaropt.pipeline.segmentation import run_batched


def embed(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int, masks: np.ndarray,
          active: np.ndarray, batch_size: int, dimension: int,
          on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    num_chunks, num_frames, num_local_speakers = masks.shape
    embeddings = np.full((num_chunks, num_local_speakers, dimension), np.nan, dtype=np.float32)
    chunk_index, speaker_index = np.nonzero(active)  # (num_active,) pairs in chunk order
    for first in range(0, len(chunk_index), batch_size):
        chunks = chunk_index[first: first + batch_size]
        speakers = speaker_index[first: first + batch_size]
        feeds = {"waveforms": make_chunks(audio, starts[chunks], chunk_samples),
                 "masks": np.ascontiguousarray(masks[chunks, :, speakers], dtype=np.float32)}
        embeddings[chunks, speakers] = run_batched(model, feeds, "embeddings")
        if on_batch is not None:
            on_batch(len(chunks))
    return embeddings
