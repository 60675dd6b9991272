"""Segmentation stage: sliding 10 s chunks -> powerset log-probabilities, batched over chunks.

Contract: ``audio (num_samples,)`` + ``starts (num_chunks,)`` -> ``logprobs (num_chunks, 589, 7)``.
The model is any backend's ``RunnableModel`` with input ``waveforms (batch, 1, chunk_samples)`` and
output ``logprobs``; a fixed-batch model (Core ML) gets its last batch zero-padded.

``segmentation.sinc_shared`` (``SharedSinc``): the model is split after its first max-pool. The sinc
convolution of the raw waveform (80 filters, 251 taps, stride 10: ~25 % of the model's FLOPs) and the
max-pool of it and of its negation (the ``front`` model) run once per row of ``SINC_BLOCK_FRAMES``
frames of the recording, rows kept from one batch of chunks to the next while needed, and each
chunk's 5325 pooled frames are copied out of them; the ``rest`` model applies the chunk's input
normalization, the abs and the rest of the network per chunk (``models.segmentation.SincFront``: why
this is exact). Chunks whose starts differ by a multiple of ``SINC_GRID_SAMPLES`` (30: stride x pool)
share rows; any other chunk (the end-aligned last chunk, usually) gets its own from the same two
models. Equal to the per-chunk model up to float32 rounding (``tests/test_sinc_shared.py``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from diaropt.backends.base import RunnableModel, TensorSpec
from diaropt.models.constants import CHUNK_SAMPLES
from diaropt.pipeline.audio import make_chunks

#: PyanNet's sinc convolution and first max-pool (``models.segmentation.SincNet``; tests check these)
SINC_FILTERS = 80
SINC_TAPS = 251
SINC_STRIDE = 10
SINC_POOL = 3
#: chunks whose starts differ by a multiple of this share a stretch (whole pooled frames)
SINC_GRID_SAMPLES = SINC_STRIDE * SINC_POOL
#: sinc frames per row of the ``segmentation.sinc_shared`` front model (~1 s of audio, whole pooling
#: windows); each row reads ``SINC_TAPS - SINC_STRIDE`` samples past its frames (1.5 % recomputed)
SINC_BLOCK_FRAMES = 1602
SINC_BLOCK_POOLED = SINC_BLOCK_FRAMES // SINC_POOL
SINC_BLOCK_SAMPLES = SINC_STRIDE * (SINC_BLOCK_FRAMES - 1) + SINC_TAPS
SINC_BLOCK_HOP = SINC_STRIDE * SINC_BLOCK_FRAMES  # samples between consecutive rows of one grid


def sinc_conv_frames(num_samples: int) -> int:
    """Frames of the sinc convolution (no padding) over ``num_samples`` (15975 for a 10 s chunk)."""
    return (num_samples - SINC_TAPS) // SINC_STRIDE + 1


def sinc_pooled_frames(num_samples: int) -> int:
    """Frames after the sinc convolution and the first max-pool of ``num_samples`` (5325 for a 10 s
    chunk)."""
    return sinc_conv_frames(num_samples) // SINC_POOL


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
    if isinstance(model, SharedSinc):
        yield from model.segment_batches(audio, starts, chunk_samples, batch_size)
        return
    flat = len(model.inputs[0].shape) == 2
    for first in range(0, len(starts), batch_size):
        chunks = make_chunks(audio, starts[first: first + batch_size], chunk_samples)
        outputs = run_batched_all(model, {"waveforms": chunks if flat else chunks[:, None, :]})
        yield first, {name: np.asarray(value) for name, value in outputs.items()}


def concatenate_batches(outputs: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch outputs concatenated on the chunk axis, as float32 (``segment_outputs``'s result)."""
    return {name: np.concatenate(values).astype(np.float32, copy=False) for name, values in outputs.items()}


class SharedSinc:
    """The segmentation model of ``segmentation.sinc_shared`` as one runnable (module docstring).

    ``front``: ``waveforms (B, 1, SINC_BLOCK_SAMPLES)`` raw audio -> ``sinc_max``, ``sinc_max_neg (B,
    80, SINC_BLOCK_POOLED)``; ``rest``: ``sinc_max``, ``sinc_max_neg (B, 80, 5325)``, ``waveform_mean``
    and ``waveform_variance (B, 1)`` -> ``logprobs (B, 589, 7)`` (``models.segmentation.SincFront`` /
    ``SincRest``). The front's rows (blocks) lie on a grid per residue of the chunk starts modulo
    ``SINC_GRID_SAMPLES``: block ``k`` of residue ``r`` starts at sample ``r + k * SINC_BLOCK_HOP``.
    ``segment_batches`` keeps the blocks the next batch still needs, so each block is computed once per
    file; called directly (``waveforms (B, 1, 160000)``, the per-chunk model's contract) the rows are
    laid back to back (a chunk's frames read only its own samples, so sharing blocks across rows is
    still exact).
    """

    def __init__(self, front: RunnableModel, rest: RunnableModel) -> None:
        self.front, self.rest = front, rest
        batch = rest.inputs[0].shape[0]
        self.inputs: list[TensorSpec] = [TensorSpec("waveforms", (batch, 1, CHUNK_SAMPLES))]
        self.outputs: list[TensorSpec] = list(rest.outputs)
        self._buffers: dict[str, np.ndarray] = {}  # reused rest inputs: no page faults per batch
        self.blocks_computed = 0  # front rows run so far (tests, benchmarks)

    def load(self) -> None:
        for model in (self.front, self.rest):
            load = getattr(model, "load", None)
            if callable(load):
                load()

    def sync(self) -> None:
        self.front.sync()
        self.rest.sync()

    def __call__(self, waveforms: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(waveforms, dtype=np.float32).reshape(len(waveforms), -1)  # (B, samples)
        starts = np.arange(len(rows), dtype=np.int64) * rows.shape[1]
        return self._outputs(rows.reshape(-1), starts, rows.shape[1], {})

    def segment_batches(self, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                        batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first chunk, outputs)`` per batch of ``batch_size`` chunks, in order (the contract of
        ``pipeline.segmentation.segment_batches``), as ``make_chunks`` would feed the per-chunk model
        (a file shorter than a chunk is zero-padded). ``starts`` must increase."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.shape[0] < chunk_samples:
            audio = np.pad(audio, (0, chunk_samples - audio.shape[0]))
        starts = np.asarray(starts, dtype=np.int64)
        if np.any(np.diff(starts) < 0):
            raise ValueError("segmentation.sinc_shared: chunk starts must increase")
        blocks: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # blocks kept from the previous batch
        for first in range(0, len(starts), batch_size):
            yield first, self._outputs(audio, starts[first: first + batch_size], chunk_samples, blocks)

    def _outputs(self, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                 blocks: dict[tuple[int, int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The rest model's outputs for the chunks at ``starts``; ``blocks`` (updated in place) holds
        the front's rows by (residue, index): those this batch does not need are dropped."""
        pooled = sinc_pooled_frames(chunk_samples)
        residues = starts % SINC_GRID_SAMPLES
        first_frames = (starts - residues) // SINC_GRID_SAMPLES  # first pooled frame on the residue's grid
        spans = [(int(r), int(f) // SINC_BLOCK_POOLED, (int(f) + pooled - 1) // SINC_BLOCK_POOLED)
                 for r, f in zip(residues, first_frames)]
        needed = sorted({(r, k) for r, low, high in spans for k in range(low, high + 1)})
        for key in [key for key in blocks if key not in needed]:
            del blocks[key]
        missing = [key for key in needed if key not in blocks]
        if missing:
            block_starts = np.array([r + k * SINC_BLOCK_HOP for r, k in missing], dtype=np.int64)
            responses = run_front(self.front, make_chunks(audio, block_starts, SINC_BLOCK_SAMPLES))
            blocks.update({key: {name: value[row] for name, value in responses.items()}
                           for row, key in enumerate(missing)})
            self.blocks_computed += len(missing)
        feeds = {}
        for name in ("sinc_max", "sinc_max_neg"):
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape[0] < len(starts) or buffer.shape[2] != pooled:
                buffer = self._buffers[name] = np.empty((len(starts), SINC_FILTERS, pooled), np.float32)
            feeds[name] = buffer[: len(starts)]
            for chunk, (residue, low, _) in enumerate(spans):
                _copy_frames([blocks[residue, k][name] for k in range(low, spans[chunk][2] + 1)],
                             int(first_frames[chunk]) % SINC_BLOCK_POOLED, feeds[name][chunk])
        mean, variance = chunk_moments(audio, starts, chunk_samples)
        feeds.update(waveform_mean=mean[:, None], waveform_variance=variance[:, None])
        return {name: np.asarray(value) for name, value in run_batched_all(self.rest, feeds).items()}


def run_front(front: RunnableModel, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """``front`` over every row of ``blocks (N, SINC_BLOCK_SAMPLES)``, in pieces of its fixed batch
    size if it has one: ``sinc_max``, ``sinc_max_neg (N, 80, SINC_BLOCK_POOLED)``."""
    size = fixed_batch_size(front) or len(blocks)
    parts = [run_batched_all(front, {"waveforms": blocks[i: i + size, None, :]}) for i in range(0, len(blocks), size)]
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _copy_frames(rows: list[np.ndarray], position: int, out: np.ndarray) -> None:
    """Pooled frames ``position .. position + out.shape[1]`` of consecutive front rows ``(80,
    SINC_BLOCK_POOLED)`` into ``out (80, frames)``."""
    done, frames = 0, out.shape[1]
    for row in rows:
        count = min(SINC_BLOCK_POOLED - position, frames - done)
        out[:, done: done + count] = row[:, position: position + count]
        done += count
        position = 0
    assert done == frames, "front rows do not cover the chunk"


def chunk_moments(audio: np.ndarray, starts: np.ndarray, chunk_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk, the mean and biased variance of ``audio[start: start + chunk_samples]`` (what
    ``InstanceNorm1d`` normalizes by) as float32 ``(num_chunks,)`` each, from float64 running sums of
    the samples and their squares over the stretch the chunks cover (one pass over the stretch, not
    one per chunk; a float32 sample's square is exact in float64, so the sums' relative error is
    ~1e-16 and the variance's absolute error ~1e-16, far below float32 rounding of any chunk's
    variance). ``audio`` must hold every chunk (pad a short file first).

    Raises:
        ValueError: a chunk runs past the end of ``audio``.
    """
    first, end = int(starts.min()), int(starts.max()) + chunk_samples
    if end > audio.shape[0]:
        raise ValueError(f"chunk at sample {int(starts.max())} runs past the audio ({audio.shape[0]} samples)")
    stretch = audio[first: end].astype(np.float64)
    sums = np.zeros((2, stretch.shape[0] + 1))
    np.cumsum(stretch, out=sums[0, 1:])
    np.cumsum(np.square(stretch, out=stretch), out=sums[1, 1:])
    offsets = starts - first
    totals = sums[:, offsets + chunk_samples] - sums[:, offsets]  # (2, num_chunks)
    mean = totals[0] / chunk_samples
    variance = np.maximum(totals[1] / chunk_samples - mean * mean, 0.0)
    return mean.astype(np.float32), variance.astype(np.float32)
