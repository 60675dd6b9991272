"""Segmentation stage: sliding 10 s chunks -> powerset log-probabilities, batched over chunks.

Contract: ``audio (num_samples,)`` + ``starts (num_chunks,)`` -> ``logprobs (num_chunks, 589, 7)``.
The model is any backend's ``RunnableModel`` with input ``waveforms (batch, 1, chunk_samples)`` and
output ``logprobs``; a fixed-batch model (Core ML) gets its last batch zero-padded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diaropt.backends.base import RunnableModel
from diaropt.pipeline.audio import make_chunks


def fixed_batch_size(model: RunnableModel) -> int | None:
    """The batch size a model was built for, or None if its batch axis is dynamic."""
    size = model.inputs[0].shape[0]
    return size if isinstance(size, int) and size > 0 else None


def run_batched(model: RunnableModel, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """``model(**feeds)[output]``, padding the batch to the model's fixed size if it has one."""
    batch = next(iter(feeds.values())).shape[0]
    fixed = fixed_batch_size(model)
    if fixed is None or fixed == batch:
        return model(**feeds)[output]
    if batch > fixed:
        raise ValueError(f"batch of {batch} exceeds the model's fixed batch size {fixed}")
    padded = {name: np.concatenate([value, np.zeros((fixed - batch, *value.shape[1:]), value.dtype)])
              for name, value in feeds.items()}
    return model(**padded)[output][:batch]


def segment(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int, batch_size: int,
            on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """(num_chunks, num_frames, 7) float32 powerset log-probabilities of every chunk."""
    outputs = []
    for first in range(0, len(starts), batch_size):
        chunks = make_chunks(audio, starts[first: first + batch_size], chunk_samples)
        outputs.append(run_batched(model, {"waveforms": chunks[:, None, :]}, "logprobs"))
        if on_batch is not None:
            on_batch(len(chunks))
    return np.concatenate(outputs).astype(np.float32, copy=False)
