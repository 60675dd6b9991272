"""``embedding.tiled_trunk`` (``pipeline.embedding.embed_tiled``): the trunk runs on tiles, every
chunk's frames are cut from them at the right place, and a chunk that is its own tile is exact."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from diaropt.backends.base import BackendUnavailable, TensorSpec
from diaropt.pipeline.embedding import TiledTrunk, embed_outputs, tile_plan
from diaropt.variants.fusion import FusionPlan, stage_specs

S, F, L = 160000, 589, 3
HOP, T = 320, 499  # CAM++: one trunk frame per 2 fbank frames of 10 ms; 499 per 10 s chunk


class PositionTrunk:
    """A trunk whose frame t of a window starting at sample s is ``[s / HOP + t, channel]``: the frames
    of a chunk depend only on where they are, so a tiled chunk must get exactly its own frames."""

    def __init__(self, batch: int = -1) -> None:
        self.inputs = [TensorSpec("waveforms", (batch, S))]
        self.outputs = [TensorSpec("frame_features", (batch, 2, T))]
        self.calls: list[int] = []
        self.outputs_alive: list[weakref.ref] = []
        self.max_alive = 0  # most output batches still referenced (by the tile cache) at any call

    def __call__(self, waveforms: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(waveforms))
        first_frame = waveforms[:, 0] / HOP  # the test audio's sample i holds the value i
        frames = first_frame[:, None] + np.arange(T)[None, :]
        out = np.stack([frames, -frames], axis=1).astype(np.float32)
        self.outputs_alive.append(weakref.ref(out))
        self.max_alive = max(self.max_alive, sum(ref() is not None for ref in self.outputs_alive))
        return {"frame_features": out}

    def sync(self) -> None:
        pass


class RecordingPool:
    """Pooling stand-in: embeddings[b, l] = the masked mean of channel 0 and the first/last frame."""

    def __init__(self) -> None:
        self.inputs = [TensorSpec("frame_features", (-1, 2, T)), TensorSpec("masks", (-1, F, L))]
        self.outputs = [TensorSpec("embeddings", (-1, L, 3))]
        self.seen: list[np.ndarray] = []

    def __call__(self, frame_features: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(frame_features)
        first, last = frame_features[:, 0, 0], frame_features[:, 0, -1]
        mean = frame_features[:, 0].mean(axis=-1)
        row = np.stack([first, last, mean], axis=-1)  # (B, 3)
        return {"embeddings": np.repeat(row[:, None, :], L, axis=1)}

    def sync(self) -> None:
        pass


def _coverage_ok(starts: np.ndarray) -> None:
    tiles, boundaries = tile_plan(starts, HOP, T)
    on_grid = np.flatnonzero(starts % HOP == 0)
    grid_tiles = tiles[: len(boundaries) + 1]
    assert grid_tiles[0] == on_grid[0] and grid_tiles[-1] == on_grid[-1]
    assert set(tiles[len(boundaries) + 1:]) == set(np.flatnonzero(starts % HOP))  # off the grid: alone
    offsets = starts[grid_tiles] // HOP
    for chunk in on_grid:
        frames = starts[chunk] // HOP + np.arange(T)
        owner = np.searchsorted(boundaries, frames, side="right")
        local = frames - offsets[owner]
        assert local.min() >= 0 and local.max() < T, f"chunk {chunk}: frames outside their tile"


@pytest.mark.parametrize("step_s, num_chunks", [(1.0, 1011), (2.0, 40), (0.5, 7), (10.0, 4), (1.0, 1), (2.5, 30)])
def test_tile_plan_covers_every_chunk_with_contiguous_frames(step_s, num_chunks):
    starts = np.arange(num_chunks, dtype=np.int64) * int(step_s * 16000)
    _coverage_ok(starts)
    _coverage_ok(np.append(starts, starts[-1] + 5000))  # an end-aligned last chunk off the grid
    tiles, _ = tile_plan(starts, HOP, T)
    if step_s == 1.0 and num_chunks > 100:
        assert len(tiles) == int(np.ceil((num_chunks - 1) / 9)) + 1  # every 9th chunk (+ the last)
    if step_s == 10.0:
        assert list(tiles) == [0, 1, 2, 3]  # nothing overlaps: every chunk is its own tile


@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_tiled_chunk_gets_its_own_frames_and_old_tiles_are_dropped(batch_size):
    num_samples = 95 * 16000 + 7000  # 95.4 s: 86 chunks at 1 s, plus an end-aligned one off the grid
    audio = np.arange(num_samples, dtype=np.float32)
    starts = np.arange(0, num_samples - S + 1, 16000, dtype=np.int64)
    starts = np.append(starts, num_samples - S)
    active = np.ones((len(starts), L), dtype=bool)
    active[10:20] = False  # chunks without speech are not embedded and need no tile of their own
    masks = np.ones((len(starts), F, L), dtype=np.float32)
    trunk, pool = PositionTrunk(), RecordingPool()
    model = TiledTrunk(trunk, pool, HOP)
    embeddings = embed_outputs(model, audio, starts, S, masks, active, batch_size, 3)["embeddings"]
    expected_first = starts / HOP
    expected = np.stack([expected_first, expected_first + T - 1, expected_first + (T - 1) / 2], axis=-1)
    rows = active.any(axis=1)
    np.testing.assert_allclose(embeddings[rows][:, 0], expected[rows], rtol=0, atol=1e-3)
    assert np.isnan(embeddings[~rows]).all()
    assert sum(trunk.calls) <= len(tile_plan(starts, HOP, T)[0]) < len(starts) / 7  # ~1 trunk run per 9 chunks
    assert max(trunk.calls) <= batch_size  # embedding.batch_size tiles per trunk call (fixed-batch models)
    assert len(trunk.calls) >= 5 and trunk.max_alive <= 4  # tiles no later chunk needs are freed
    for features in pool.seen:  # every frame of every chunk, in order, without a gap or a repeat
        np.testing.assert_allclose(np.diff(features[:, 0], axis=-1), 1.0, atol=1e-3)


def test_called_directly_every_row_is_its_own_tile():
    trunk, pool = PositionTrunk(), RecordingPool()
    model = TiledTrunk(trunk, pool, HOP)
    waveforms = np.stack([np.arange(S, dtype=np.float32) + offset for offset in (0, 32000)])
    out = model(waveforms=waveforms, masks=np.ones((2, F, L), dtype=np.float32))
    np.testing.assert_allclose(out["embeddings"][:, 0, 0], [0, 100], atol=1e-3)
    assert [s.name for s in model.inputs] == ["waveforms", "masks"]


def test_plan_refuses_what_cannot_tile():
    with pytest.raises(BackendUnavailable, match="shared_trunk=true"):
        FusionPlan(tiled_trunk=True).check()
    with pytest.raises(BackendUnavailable, match="coreml_pipeline"):
        FusionPlan(tiled_trunk=True, shared_trunk=True, coreml_pipeline=True, clean_frames_in_graph=True).check()


def test_tiled_stage_specs_split_trunk_and_pooling():
    from diaropt.models.embedding import SpeakerEmbedding
    from diaropt.models.segmentation import PyanNet

    embedding = SpeakerEmbedding("campplus", "strided")
    specs = {s.kind: s for s in stage_specs(FusionPlan(shared_trunk=True, tiled_trunk=True, embedding_with_post=True),
                                            PyanNet(), embedding, 8, 4)}
    assert list(specs) == ["segmentation", "embedding", "embedding_pool"]
    trunk, pool = specs["embedding"], specs["embedding_pool"]
    assert [(s.name, s.shape) for s in trunk.outputs] == [("frame_features", (4, 512, T))]
    assert [(s.name, s.shape) for s in pool.inputs] == [("frame_features", (4, 512, T)), ("masks", (4, F, L))]
    assert [s.name for s in pool.outputs] == ["embeddings", "unit_embeddings", "distances"]
    assert trunk.quant_kind == "embedding" and pool.quant_kind is None
    assert embedding.fbank.frame_shift * embedding.network.time_stride == HOP
    with torch.no_grad():  # the two models together are the per-chunk shared-trunk model
        waveforms = torch.randn(2, S) * 0.1
        masks = (torch.rand(2, F, L) > 0.5).float()
        frames = trunk.module(waveforms)
        split = pool.module(frames, masks)[0]
        from diaropt.variants.fusion import FusedEmbedding

        whole = FusedEmbedding(embedding, per_chunk=True, shared_trunk=True)(waveforms, masks)
    torch.testing.assert_close(split, whole)


def test_tiled_pipeline_end_to_end_close_to_the_shared_trunk(dev00_audio, tmp_path):
    """30 s of real AMI on ONNX Runtime: tiling changes the embeddings a little (the tiles' context),
    the speakers found stay the same; step 10 s (every chunk its own tile) is exact."""
    from diaropt.config import compose
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import load_pipeline
    from diaropt.variants.build import build_models

    def run(*overrides):
        cfg = compose(["backend=onnxruntime", "compute_unit=cpu_only", f"paths.cache_dir={tmp_path}",
                       "frame_extraction=strided", "embedding.shared_trunk=true", *overrides])
        built = build_models(cfg)
        return built, load_pipeline(cfg, built, StageTimer())(dev00_audio, "dev00", keep_arrays=True)

    _, shared = run("embedding.tiled_trunk=false")
    built, tiled = run("embedding.tiled_trunk=true")
    assert built.fusion["tiled_trunk"] == 1 and {m.kind for m in built.stages} >= {"embedding", "embedding_pool"}
    np.testing.assert_array_equal(tiled.arrays["active"], shared.arrays["active"])
    active = shared.arrays["active"]
    a, b = shared.arrays["embeddings"][active], tiled.arrays["embeddings"][active]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.median(cosine) > 0.9 and not np.allclose(a, b, atol=1e-4)  # close, not the same numbers
    assert set(tiled.annotation.labels()) and len(tiled.annotation.labels()) == len(shared.annotation.labels())

    _, shared_10 = run("segmentation.step_s=10", "embedding.tiled_trunk=false")
    _, tiled_10 = run("segmentation.step_s=10", "embedding.tiled_trunk=true")
    np.testing.assert_allclose(tiled_10.arrays["embeddings"], shared_10.arrays["embeddings"], atol=1e-5)

    with pytest.raises(BackendUnavailable, match="trunk frames"):
        run("embedding.tiled_trunk=true", "segmentation.step_s=0.51")
