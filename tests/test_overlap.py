"""``backend.overlap_stages``: segmentation in a worker thread overlapped with the embedding stage
gives the same model calls, in the same order, hence identical arrays and RTTMs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from diaropt.backends.base import TensorSpec
from diaropt.models.constants import CHUNK_SAMPLES, NUM_FRAMES, NUM_LOCAL_SPEAKERS
from diaropt.pipeline.diarization import DiarizationPipeline, PipelineParams
from diaropt.pipeline.embedding import TiledTrunk
from diaropt.pipeline.preprocessing import POWERSET_MAPPING
from diaropt.pipeline.timing import StageTimer

S, F, L = CHUNK_SAMPLES, NUM_FRAMES, NUM_LOCAL_SPEAKERS
HOP = 320  # CAM++'s trunk frame hop (samples)
T, C_TRUNK, D = 499, 4, 8


class Recorder:
    """A fake model that records every call (name, batch rows' digests) and computes each row alone."""

    def __init__(self, name, inputs, outputs, fn, log, fail_at=None):
        self.name, self.inputs, self.outputs, self.fn, self.log = name, inputs, outputs, fn, log
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, **feeds):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError(f"{self.name} failed on call {self.calls}")
        self.log.append((self.name, threading.current_thread().name == "diaropt-segmentation",
                         tuple(hash(np.asarray(v).tobytes()) for _, v in sorted(feeds.items()))))
        return self.fn(**feeds)

    def sync(self):
        pass


def fake_segmentation(log, fail_at=None):
    classes = np.array([1, 2, 3, 4, 0, 0, 5, 1, 6], np.int64)  # powerset classes, mostly single speakers

    def run(waveforms):
        frames = waveforms[:, 0, : F * 271].reshape(len(waveforms), F, 271)
        energy = np.abs(frames).mean(axis=-1)  # (B, F)
        level = np.floor(energy * 97).astype(np.int64) % len(classes)
        best = np.where(energy > 1e-3, classes[level], 0)
        logprobs = np.full((len(waveforms), F, len(POWERSET_MAPPING)), -5.0, np.float32)
        np.put_along_axis(logprobs, best[..., None], 0.0, axis=-1)
        return {"logprobs": logprobs}

    return Recorder("segmentation", [TensorSpec("waveforms", (-1, 1, S))],
                    [TensorSpec("logprobs", (-1, F, 7))], run, log, fail_at)


def fake_trunk(log):
    def run(waveforms):
        frames = waveforms[:, : T * HOP].reshape(len(waveforms), T, HOP).mean(axis=-1)  # (B, T)
        return {"frame_features": np.stack([frames * (c + 1) for c in range(C_TRUNK)], axis=1).astype(np.float32)}

    return Recorder("trunk", [TensorSpec("waveforms", (-1, S))], [TensorSpec("frame_features", (-1, C_TRUNK, T))],
                    run, log)


def _pool(features, masks):
    weights = masks[:, :: 2, :][:, :T]  # (B, T', L) crude resampling, per row
    pooled = np.einsum("bct,btl->blc", features[:, :, : weights.shape[1]], weights)  # (B, L, C)
    return np.concatenate([pooled, pooled ** 2], axis=-1).astype(np.float32)  # (B, L, D)


def fake_pool(log):
    return Recorder("pool", [TensorSpec("frame_features", (-1, C_TRUNK, T)), TensorSpec("masks", (-1, F, L))],
                    [TensorSpec("embeddings", (-1, L, D))],
                    lambda frame_features, masks: {"embeddings": _pool(frame_features, masks)}, log)


def fake_per_chunk(log):
    def run(waveforms, masks):
        features = np.repeat(waveforms[:, None, : T * HOP].reshape(len(waveforms), 1, T, HOP).mean(-1), C_TRUNK, 1)
        return {"embeddings": _pool(features.astype(np.float32), masks)}

    return Recorder("embedding", [TensorSpec("waveforms", (-1, S)), TensorSpec("masks", (-1, F, L))],
                    [TensorSpec("embeddings", (-1, L, D))], run, log)


def fake_per_pair(log):
    def run(waveforms, masks):
        return {"embeddings": np.stack([waveforms[:, :: 20000].sum(-1) * masks.sum(-1)] * D, axis=-1).astype(np.float32)}

    return Recorder("embedding", [TensorSpec("waveforms", (-1, S)), TensorSpec("masks", (-1, F))],
                    [TensorSpec("embeddings", (-1, D))], run, log)


def _audio(seconds=95.3, seed=0):
    """Noise with silent stretches (so some tiles and chunks have no active speaker)."""
    rng = np.random.default_rng(seed)
    audio = (0.05 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    for start_s, end_s in ((12.0, 31.0), (50.0, 52.5), (70.0, 83.0)):
        audio[int(start_s * 16000): int(end_s * 16000)] = 0.0
    return audio


def _run(kind, overlap, seg_batch, emb_batch, step_s=1.0, fail_at=None):
    log: list = []
    embedding = {"tiled": lambda: TiledTrunk(fake_trunk(log), fake_pool(log), HOP),
                 "per_chunk": lambda: fake_per_chunk(log), "per_pair": lambda: fake_per_pair(log)}[kind]()
    params = PipelineParams(step_s=step_s, segmentation_batch_size=seg_batch, embedding_batch_size=emb_batch,
                            overlap_stages=overlap)
    pipeline = DiarizationPipeline(fake_segmentation(log, fail_at), embedding, D, clustering=None, params=params)
    audio = _audio()
    starts = np.arange(0, len(audio) - S + 1, pipeline.step_samples)
    starts = np.append(starts, len(audio) - S) if starts[-1] + S < len(audio) else starts
    timer = StageTimer()
    if overlap:
        outputs, (segmentations, masks, active), embedded, info = pipeline._overlapped(audio, starts, timer)
    else:
        outputs, (segmentations, masks, active, *_), embedded = pipeline._sequential(
            audio, starts, starts / 16000, timer, None, ("embeddings",))
        info = {}
    arrays = {"segmentations": segmentations, "masks": masks, "active": active, **outputs, **embedded}
    return arrays, log, timer, info


@pytest.mark.parametrize("kind", ["tiled", "per_chunk", "per_pair"])
@pytest.mark.parametrize("seg_batch,emb_batch,step_s", [(8, 4, 1.0), (2, 3, 1.0), (32, 4, 1.0), (3, 2, 2.5)])
def test_overlap_makes_the_same_calls_and_arrays(kind, seg_batch, emb_batch, step_s):
    sequential, seq_log, _, _ = _run(kind, False, seg_batch, emb_batch, step_s)
    overlapped, ovl_log, timer, info = _run(kind, True, seg_batch, emb_batch, step_s)
    assert 0 < sequential["active"].sum() < sequential["active"].size  # silences and speech
    assert set(sequential) == set(overlapped)
    for name in sequential:
        np.testing.assert_array_equal(overlapped[name], sequential[name], err_msg=name)
    # the same model calls on the same inputs, in order per model; segmentation ran in the worker
    for model in ("segmentation", "trunk", "pool", "embedding"):
        assert [c[2] for c in ovl_log if c[0] == model] == [c[2] for c in seq_log if c[0] == model], model
    assert all(worker for name, worker, _ in ovl_log if name == "segmentation")
    assert not any(worker for name, worker, _ in ovl_log if name != "segmentation")
    # the attributed stage times add up to the overlapped section's wall time
    attributed = sum(timer.seconds[s] for s in ("segmentation", "preprocessing", "embedding"))
    assert attributed == pytest.approx(info["wall_s"], rel=1e-9, abs=1e-9)
    assert info["segmentation_busy_s"] > 0


def test_a_segmentation_error_reaches_the_caller_and_stops_the_worker():
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="segmentation failed on call 3"):
        _run("tiled", True, 4, 4, fail_at=3)
    assert not [t for t in threading.enumerate() if t.name == "diaropt-segmentation" and t.name not in before]


def test_an_embedding_error_stops_the_worker():
    log: list = []

    def broken(**feeds):
        raise ValueError("embedding broke")

    embedding = Recorder("embedding", [TensorSpec("waveforms", (-1, S)), TensorSpec("masks", (-1, F))],
                         [TensorSpec("embeddings", (-1, D))], broken, log)
    pipeline = DiarizationPipeline(fake_segmentation(log), embedding, D, clustering=None,
                                   params=PipelineParams(segmentation_batch_size=1, overlap_stages=True))
    audio = _audio()
    starts = np.arange(0, len(audio) - S + 1, 16000)
    with pytest.raises(ValueError, match="embedding broke"):
        pipeline._overlapped(audio, starts, StageTimer())
    assert not any(t.name == "diaropt-segmentation" for t in threading.enumerate())


def test_overlapped_pipeline_writes_the_same_rttm_and_arrays(assets, tmp_path):
    """The default configuration on ONNX Runtime, 60 s of real audio (pyannote's sample + 30 s of AMI):
    overlap on vs off gives identical arrays and RTTM."""
    import soundfile as sf

    from diaropt.config import compose
    from diaropt.data.annotations import write_rttm
    from diaropt.runner import load_pipeline
    from diaropt.variants.build import build_models

    sample, _ = sf.read(assets["sample"] / "sample.wav", dtype="float32")
    ami, _ = sf.read(assets["ami"] / "dev00.wav", dtype="float32")
    audio = np.concatenate([sample, ami[: 30 * 16000]])
    results = {}
    for overlap in (False, True):
        cfg = compose(["backend=onnxruntime", f"backend.overlap_stages={str(overlap).lower()}"])
        built = build_models(cfg)
        pipeline = load_pipeline(cfg, built, StageTimer(), warm_up=False)
        assert pipeline.params.overlap_stages is overlap
        output = pipeline(audio, "mix", keep_arrays=True)
        assert bool(output.overlap) is overlap
        write_rttm(output.annotation, tmp_path / f"{overlap}.rttm", uri="mix")
        results[overlap] = output
    assert (tmp_path / "True.rttm").read_text() == (tmp_path / "False.rttm").read_text()
    assert set(results[True].arrays) == set(results[False].arrays)
    for name, value in results[False].arrays.items():
        np.testing.assert_array_equal(results[True].arrays[name], value, err_msg=name)
