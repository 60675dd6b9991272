"""Embedding stage: one embedding per active (chunk, local speaker), masked pooling, batched.

Contract: ``audio (num_samples,)``, ``starts (num_chunks,)``, ``masks (num_chunks, num_frames, 3)``,
``active (num_chunks, 3) bool`` -> ``embeddings (num_chunks, 3, dimension)`` float32, NaN rows for
inactive local speakers (skipped, never embedded). The model is any backend's ``RunnableModel``
with inputs ``waveforms (batch, chunk_samples)`` and ``masks (batch, num_frames)`` and output
``embeddings (batch, dimension)``, or, per chunk (``embedding.shared_trunk``), ``masks (batch,
num_frames, 3)`` -> ``embeddings (batch, 3, dimension)``; ``variants.fusion`` builds both.

``embedding.tiled_trunk`` (``TiledTrunk``, ``embed_tiled``): the trunk runs only on chunks that tile
the recording (one every ~9 s instead of one per step); each embedded chunk's trunk frames are cut
from its tiles and pooled per speaker by a second model. Not exact: a frame carries the context
(mean normalisation, CAM++'s global context) of its tile instead of its chunk.

``ready(n)`` (optional, every path): blocks until ``masks``/``active`` hold chunks ``[0, n)``, so the
stage can run while the segmentation of later chunks is still being computed
(``backend.overlap_stages``, ``pipeline.diarization``). The model calls, their batches and their
order are the same as without it (the batches are formed in the same order from the same chunks),
so the outputs are identical; a batch is only started once every chunk that decides it is known.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from diaropt.backends.base import RunnableModel, TensorSpec
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
                  on_batch: Callable[[int], None] | None = None,
                  ready: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Every per-speaker output of the embedding model as ``(num_chunks, 3, ...)``, NaN where inactive:
    ``embeddings`` and, from an ``embedding_with_post`` model, ``unit_embeddings`` (and per chunk
    ``distances (num_chunks, 3, 3)``, NaN rows/columns of inactive slots).

    A per-pair model gets one row per active (chunk, speaker) pair, ``batch_size`` pairs per call; a
    per-chunk model (``embedding.shared_trunk``) one row per chunk with an active speaker,
    ``batch_size`` chunks per call. ``ready``: see the module docstring.
    """
    results = _nan_outputs(model, masks.shape[0], masks.shape[2], dimension)
    if isinstance(model, TiledTrunk):
        if ready is not None:
            return embed_tiled_streaming(model, audio, starts, chunk_samples, masks, active, batch_size, results,
                                         on_batch, ready)
        return embed_tiled(model, audio, starts, chunk_samples, masks, active, batch_size, results, on_batch)
    if per_chunk(model):
        for chunks in _chunk_batches(active, batch_size, ready):
            feeds = {"waveforms": make_chunks(audio, starts[chunks], chunk_samples),
                     "masks": np.ascontiguousarray(masks[chunks], dtype=np.float32)}
            _store(results, run_batched_all(model, feeds), chunks)
            if on_batch is not None:
                on_batch(int(active[chunks].sum()))
        return mask_inactive(results, active)
    for chunks, speakers in _pair_batches(active, batch_size, ready):
        feeds = {"waveforms": make_chunks(audio, starts[chunks], chunk_samples),
                 "masks": np.ascontiguousarray(masks[chunks, :, speakers], dtype=np.float32)}
        _store(results, run_batched_all(model, feeds), (chunks, speakers))
        if on_batch is not None:
            on_batch(len(chunks))
    return results


def _chunk_batches(active: np.ndarray, batch_size: int,
                   ready: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Indices of the chunks with an active speaker, ``batch_size`` at a time, in order; with
    ``ready``, each batch as soon as the chunks that decide it are known."""
    if ready is None:
        chunk_rows = np.flatnonzero(active.any(axis=1))
        yield from (chunk_rows[first: first + batch_size] for first in range(0, len(chunk_rows), batch_size))
        return
    batch: list[int] = []
    for chunk in range(active.shape[0]):
        ready(chunk + 1)
        if active[chunk].any():
            batch.append(chunk)
        if len(batch) == batch_size:
            yield np.array(batch, dtype=np.intp)
            batch = []
    if batch:
        yield np.array(batch, dtype=np.intp)


def _pair_batches(active: np.ndarray, batch_size: int,
                  ready: Callable[[int], None] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(chunks, speakers) of the active (chunk, speaker) pairs in chunk order, ``batch_size`` at a time."""
    if ready is None:
        chunk_index, speaker_index = np.nonzero(active)  # (num_active,) pairs in chunk order
        for first in range(0, len(chunk_index), batch_size):
            yield chunk_index[first: first + batch_size], speaker_index[first: first + batch_size]
        return
    chunks: list[int] = []
    speakers: list[int] = []
    for chunk in range(active.shape[0]):
        ready(chunk + 1)
        for speaker in np.flatnonzero(active[chunk]):
            chunks.append(chunk)
            speakers.append(int(speaker))
            if len(chunks) == batch_size:
                yield np.array(chunks, dtype=np.intp), np.array(speakers, dtype=np.intp)
                chunks, speakers = [], []
    if chunks:
        yield np.array(chunks, dtype=np.intp), np.array(speakers, dtype=np.intp)


def _store(results: dict[str, np.ndarray], outputs: dict[str, np.ndarray], index: object) -> None:
    """Write one call's outputs into ``results`` at ``index`` (chunks, or (chunks, speakers))."""
    for name, value in outputs.items():
        if name in results:
            results[name][index] = value


def _nan_outputs(model: RunnableModel, num_chunks: int, num_local_speakers: int,
                 dimension: int) -> dict[str, np.ndarray]:
    """NaN ``(num_chunks, L, dimension)`` arrays (``distances``: ``(num_chunks, L, L)``) per model output."""
    names = [spec.name for spec in model.outputs if spec.name in ("embeddings", "unit_embeddings", "distances")]
    return {name: np.full((num_chunks, num_local_speakers, num_local_speakers if name == "distances" else dimension),
                          np.nan, dtype=np.float32) for name in names}


class TiledTrunk:
    """The embedding stage of ``embedding.tiled_trunk`` as one runnable: ``trunk`` waveforms (B, S) ->
    ``frame_features (B, C, T)`` and ``pool`` frame_features + masks (B, F, L) -> embeddings (B, L, D)
    [...]. One trunk frame every ``frame_hop_samples``. Called directly, every row is its own tile
    (the exact shared-trunk numbers); ``embed_tiled`` shares tiles between overlapping chunks.
    """

    def __init__(self, trunk: RunnableModel, pool: RunnableModel, frame_hop_samples: int) -> None:
        self.trunk, self.pool, self.frame_hop_samples = trunk, pool, int(frame_hop_samples)
        self.inputs: list[TensorSpec] = [*trunk.inputs, *(s for s in pool.inputs if s.name != "frame_features")]
        self.outputs: list[TensorSpec] = list(pool.outputs)
        self.trunk_frames = int(next(s for s in trunk.outputs if s.name == "frame_features").shape[-1])

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        masks = inputs.pop("masks")
        frames = run_batched_all(self.trunk, inputs)["frame_features"]
        return run_batched_all(self.pool, {"frame_features": frames, "masks": masks})

    def sync(self) -> None:
        self.trunk.sync()
        self.pool.sync()


def tile_plan(starts: np.ndarray, frame_hop_samples: int, trunk_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tiles, boundaries)``: chunk indices whose trunk frames tile the recording, in order, and for
    each pair of consecutive tiles the first frame (in hops from sample 0) the later one provides.

    Greedy over the chunks on the frame grid (start a multiple of the hop): the next tile is the
    furthest chunk that still starts within the current tile's frames, so frames are contiguous
    (every 9th chunk at a 1 s step: 499 frames per 10 s chunk); where tiles overlap, the switch is
    in the middle of the overlap. A chunk off the grid (the end-aligned last chunk) is a tile alone.
    """
    offsets = starts // frame_hop_samples
    on_grid = np.flatnonzero(starts % frame_hop_samples == 0)
    tiles = [int(on_grid[0])] if len(on_grid) else []
    boundaries: list[int] = []
    while tiles and tiles[-1] != on_grid[-1]:
        current = tiles[-1]
        reachable = on_grid[(on_grid > current) & (offsets[on_grid] <= offsets[current] + trunk_frames)]
        following = int(reachable[-1]) if len(reachable) else int(on_grid[on_grid > current][0])
        current_end = offsets[current] + trunk_frames
        boundaries.append(int((offsets[following] + current_end) // 2) if offsets[following] < current_end
                          else int(offsets[following]))
        tiles.append(following)
    tiles += [int(c) for c in np.flatnonzero(starts % frame_hop_samples)]  # after the grid's: no boundary
    return np.array(tiles, dtype=np.int64), np.array(boundaries, dtype=np.int64)


def embed_tiled(model: TiledTrunk, audio: np.ndarray, starts: np.ndarray, chunk_samples: int, masks: np.ndarray,
                active: np.ndarray, batch_size: int, results: dict[str, np.ndarray],
                on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Fill ``results`` (``_nan_outputs``) for the chunks with an active speaker, ``batch_size`` tiles
    per trunk call and chunks per pooling call. Tiles are computed in order and dropped once no later
    chunk needs them, so memory does not grow with the recording."""
    hop, length = model.frame_hop_samples, model.trunk_frames
    tiles, boundaries = tile_plan(starts, hop, length)
    tile_offsets = starts[tiles] // hop
    frames_cache: dict[int, np.ndarray] = {}  # position in ``tiles`` -> (C, T) trunk frames

    def sources(chunk: int) -> list[tuple[int, int, int]]:
        """``(tile position, first frame in the tile, frames)`` runs that make up ``chunk``'s frames."""
        if starts[chunk] % hop:  # off the grid: its own tile
            return [(int(np.flatnonzero(tiles == chunk)[0]), 0, length)]
        frame = starts[chunk] // hop + np.arange(length)
        owner = np.searchsorted(boundaries, frame, side="right")
        runs = np.flatnonzero(np.diff(owner)) + 1
        return [(int(owner[a]), int(frame[a] - tile_offsets[owner[a]]), int(b - a))
                for a, b in zip([0, *runs], [*runs, length])]

    batches = list(_chunk_batches(active, batch_size))
    plans = {int(c): sources(int(c)) for chunks in batches for c in chunks}
    needed = sorted({position for runs in plans.values() for position, _, _ in runs})

    def ensure(positions: set[int]) -> None:
        missing = sorted(p for p in positions if p not in frames_cache)
        if not missing:
            return
        prefetch = max(0, batch_size - len(missing))  # a chunk may need more tiles than a batch holds
        batch = missing + [p for p in needed if p > missing[-1] and p not in frames_cache][:prefetch]
        for first in range(0, len(batch), batch_size):  # fixed-batch models (Core ML) take batch_size rows
            part = batch[first: first + batch_size]
            waveforms = make_chunks(audio, starts[tiles[part]], chunk_samples)
            frames = run_batched_all(model.trunk, {model.trunk.inputs[0].name: waveforms})["frame_features"]
            frames_cache.update(zip(part, frames))

    for chunks in batches:
        positions = {position for c in chunks for position, _, _ in plans[int(c)]}
        for stale in [p for p in frames_cache if p < min(positions)]:
            del frames_cache[stale]
        ensure(positions)
        features = np.stack([np.concatenate([frames_cache[p][:, a: a + n] for p, a, n in plans[int(c)]], axis=1)
                             for c in chunks])
        feeds = {"frame_features": features, "masks": np.ascontiguousarray(masks[chunks], dtype=np.float32)}
        _store(results, run_batched_all(model.pool, feeds), chunks)
        if on_batch is not None:
            on_batch(int(active[chunks].sum()))
    return mask_inactive(results, active)


def embed_tiled_streaming(model: TiledTrunk, audio: np.ndarray, starts: np.ndarray, chunk_samples: int,
                          masks: np.ndarray, active: np.ndarray, batch_size: int, results: dict[str, np.ndarray],
                          on_batch: Callable[[int], None] | None, ready: Callable[[int], None]) -> dict[str, np.ndarray]:
    """``embed_tiled`` while ``masks``/``active`` are still being filled (``ready``): the same trunk
    and pooling calls on the same rows in the same order. ``embed_tiled`` decides up front which tiles
    are needed (used by a chunk with an active speaker); here a tile's need is settled once the last
    chunk that can use it is known, which is what its prefetch of the next needed tiles waits for."""
    hop, length = model.frame_hop_samples, model.trunk_frames
    tiles, boundaries = tile_plan(starts, hop, length)
    tile_offsets = starts[tiles] // hop
    offsets = starts // hop
    grid = np.flatnonzero(starts % hop == 0)  # chunks on the frame grid, in order
    num_grid_tiles = len(boundaries) + 1 if len(grid) else 0
    frames_cache: dict[int, np.ndarray] = {}
    plans: dict[int, list[tuple[int, int, int]]] = {}
    settled: dict[int, bool] = {}

    def sources(chunk: int) -> list[tuple[int, int, int]]:  # as in embed_tiled
        if chunk not in plans:
            if starts[chunk] % hop:
                plans[chunk] = [(int(np.flatnonzero(tiles == chunk)[0]), 0, length)]
            else:
                frame = starts[chunk] // hop + np.arange(length)
                owner = np.searchsorted(boundaries, frame, side="right")
                runs = np.flatnonzero(np.diff(owner)) + 1
                plans[chunk] = [(int(owner[a]), int(frame[a] - tile_offsets[owner[a]]), int(b - a))
                                for a, b in zip([0, *runs], [*runs, length])]
        return plans[chunk]

    def needed(position: int) -> bool:
        """Whether a chunk with an active speaker uses tile ``position`` (waits until that is known)."""
        if position not in settled:
            if position >= num_grid_tiles:  # an off-grid chunk: its own tile only
                users = np.array([tiles[position]])
            else:  # grid chunks whose frames overlap the frames this tile provides
                low = boundaries[position - 1] if position > 0 else np.iinfo(np.int64).min
                high = boundaries[position] if position < num_grid_tiles - 1 else np.iinfo(np.int64).max
                users = grid[(offsets[grid] < high) & (offsets[grid] + length > low)] if low < high else grid[:0]
            if len(users):
                ready(int(users.max()) + 1)
            settled[position] = bool(active[users].any()) if len(users) else False
        return settled[position]

    def ensure(positions: set[int]) -> None:
        missing = sorted(p for p in positions if p not in frames_cache)
        if not missing:
            return
        prefetch = max(0, batch_size - len(missing))
        extra: list[int] = []
        position = missing[-1] + 1
        while len(extra) < prefetch and position < len(tiles):
            if position not in frames_cache and needed(position):
                extra.append(position)
            position += 1
        batch = missing + extra
        for first in range(0, len(batch), batch_size):
            part = batch[first: first + batch_size]
            waveforms = make_chunks(audio, starts[tiles[part]], chunk_samples)
            frames = run_batched_all(model.trunk, {model.trunk.inputs[0].name: waveforms})["frame_features"]
            frames_cache.update(zip(part, frames))

    for chunks in _chunk_batches(active, batch_size, ready):
        positions = {position for c in chunks for position, _, _ in sources(int(c))}
        for stale in [p for p in frames_cache if p < min(positions)]:
            del frames_cache[stale]
        ensure(positions)
        features = np.stack([np.concatenate([frames_cache[p][:, a: a + n] for p, a, n in sources(int(c))], axis=1)
                             for c in chunks])
        feeds = {"frame_features": features, "masks": np.ascontiguousarray(masks[chunks], dtype=np.float32)}
        _store(results, run_batched_all(model.pool, feeds), chunks)
        if on_batch is not None:
            on_batch(int(active[chunks].sum()))
    ready(active.shape[0])
    return mask_inactive(results, active)


def mask_inactive(results: dict[str, np.ndarray], active: np.ndarray) -> dict[str, np.ndarray]:
    """NaN for inactive slots (``(num_chunks, 3, ...)`` arrays; ``distances`` rows and columns)."""
    for name, value in results.items():
        value[~active] = np.nan
        if name == "distances":
            value.transpose(0, 2, 1)[~active] = np.nan
    return results
