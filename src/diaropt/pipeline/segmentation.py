"""Segmentation stage: sliding 10 s chunks -> powerset log-probabilities, batched over chunks.

Contract: ``audio (num_samples,)`` + ``starts (num_chunks,)`` -> ``logprobs (num_chunks, 589, 7)``.
The model is any backend's ``RunnableModel`` with input ``waveforms (batch, 1, chunk_samples)`` and
output ``logprobs``; a fixed-batch model (Core ML) gets its last batch zero-padded.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from diaropt.backends.base import RunnableModel
from diaropt.pipeline.audio import make_chunks


def fixed_batch_size(model: RunnableModel) -> int | None:
    """The batch size a model was built for, or None if its batch axis is dynamic."""
    size = model.inputs[0].shape[0]
    return size if isinstance(size, int) and size > 0 else None


def run_batched(model: RunnableModel, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """``model(**feeds)[output]``, padding the batch to the model's fixed size if it has one."""
    return run_batched_all(model, feeds)[output]


def run_batched_all(model: RunnableModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model(**feeds)``, padding the batch to the model's fixed size if it has one."""
    batch = next(iter(feeds.values())).shape[0]
    fixed = fixed_batch_size(model)
    if fixed is None or fixed == batch:
        return model(**feeds)
    if batch > fixed:
        raise ValueError(f"batch of {batch} exceeds the model's fixed batch size {fixed}")
    padded = {name: np.concatenate([value, np.zeros((fixed - batch, *value.shape[1:]), value.dtype)])
              for name, value in feeds.items()}
    return {name: value[:batch] for name, value in model(**padded).items()}


def segment(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int, batch_size: int,
            on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """(num_chunks, num_frames, 7) float32 powerset log-probabilities of every chunk."""
    return segment_outputs(model, audio, starts, chunk_samples, batch_size, on_batch)["logprobs"]


def segment_outputs(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                    batch_size: int, on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Every output of the segmentation model over all chunks, concatenated on the chunk axis:
    ``logprobs (num_chunks, num_frames, 7)`` and whatever a fused model adds (``segmentations``,
    ``masks``, ``active``, embeddings: see ``variants.fusion``). The model's input is
    ``waveforms (batch, 1, chunk_samples)``, or ``(batch, chunk_samples)`` if it declares two axes."""
    outputs: dict[str, list[np.ndarray]] = {}
    for _, batch in segment_batches(model, audio, starts, chunk_samples, batch_size):
        for name, value in batch.items():
            outputs.setdefault(name, []).append(value)
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
    return concatenate_batches(outputs)


def segment_batches(model: RunnableModel, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                    batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(first chunk, outputs of chunks first..first + batch_size)`` per model call, in order: the
    calls ``segment_outputs`` makes (``pipeline.diarization`` runs them in a worker thread to overlap
    segmentation with the embedding stage)."""
    flat = len(model.inputs[0].shape) == 2
    for first in range(0, len(starts), batch_size):
        chunks = make_chunks(audio, starts[first: first + batch_size], chunk_samples)
        outputs = run_batched_all(model, {"waveforms": chunks if flat else chunks[:, None, :]})
        yield first, {name: np.asarray(value) for name, value in outputs.items()}


def concatenate_batches(outputs: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch outputs concatenated on the chunk axis, as float32 (``segment_outputs``'s result)."""
    return {name: np.concatenate(values).astype(np.float32, copy=False) for name, values in outputs.items()}
