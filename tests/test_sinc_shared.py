"""``segmentation.sinc_shared`` (``pipeline.segmentation.SharedSinc``): the segmentation model split
after its first max-pool, the sinc convolution shared between overlapping chunks, equals the
per-chunk model up to float32 rounding on real audio.

Tolerance (derived, not picked): both float32 computations are compared with the per-chunk model
evaluated in float64 on the same chunks. The per-chunk float32 model's own error against it,
``e = max |logprobs_fp32 - logprobs_fp64|``, is what float32 rounding does to this network on this
audio (~1e-3 on the log-probabilities of unlikely classes, where the LSTM's rounding is amplified);
the split model must be as accurate within a factor 2 (``max |split - fp64| <= 2 e``) and differ from
the per-chunk float32 model by at most ``2 e``. The powerset argmax is compared on every frame where
the per-chunk model's two best classes differ by more than ``2 e`` in log-probability (elsewhere
rounding may legitimately flip it); the measured differences are printed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import soundfile as sf
import torch

from diaropt.backends.base import BackendUnavailable, TensorSpec
from diaropt.backends.torch import TorchModel
from diaropt.models.segmentation import SincFront, SincRest
from diaropt.pipeline.audio import chunk_starts, make_chunks
from diaropt.pipeline.segmentation import (SINC_BLOCK_POOLED, SINC_BLOCK_SAMPLES, SINC_FILTERS, SINC_GRID_SAMPLES,
                                           SINC_POOL, SINC_STRIDE, SINC_TAPS, SharedSinc, chunk_moments,
                                           segment_outputs, sinc_pooled_frames)

S = 160000
STEP = 24000  # the default 1.5 s step


def _clips(assets) -> dict[str, np.ndarray]:
    """Real audio: two AMI clips (480001 samples: the end-aligned last chunk is off the 30-sample grid),
    pyannote's sample (480000: its last chunk on the grid), and 7.3 s of an AMI clip (one padded chunk)."""
    read = lambda path: sf.read(path, dtype="float32")[0]  # noqa: E731
    dev01 = read(assets["ami"] / "dev01.wav")
    return {"dev00": read(assets["ami"] / "dev00.wav"), "tst00": read(assets["ami"] / "tst00.wav"),
            "sample": read(assets["sample"] / "sample.wav"), "dev01_7.3s": dev01[: int(7.3 * 16000)]}


def _torch_split(model) -> SharedSinc:
    front = TorchModel(SincFront(model), [TensorSpec("waveforms", (-1, 1, SINC_BLOCK_SAMPLES))],
                       [TensorSpec(n, (-1, SINC_FILTERS, SINC_BLOCK_POOLED)) for n in ("sinc_max", "sinc_max_neg")])
    pooled = sinc_pooled_frames(S)
    rest = TorchModel(SincRest(model), [TensorSpec("sinc_max", (-1, SINC_FILTERS, pooled)),
                                        TensorSpec("sinc_max_neg", (-1, SINC_FILTERS, pooled)),
                                        TensorSpec("waveform_mean", (-1, 1)), TensorSpec("waveform_variance", (-1, 1))],
                      [TensorSpec("logprobs", (-1, 589, 7))])
    return SharedSinc(front, rest)


def _starts(audio: np.ndarray, limit: int | None = 6) -> np.ndarray:
    """The default windowing; with ``limit``, its first ``limit - 1`` chunks and the last (end-aligned)."""
    starts = chunk_starts(audio.shape[0], S, STEP)
    return starts if limit is None or len(starts) <= limit else np.concatenate([starts[: limit - 1], starts[-1:]])


@pytest.fixture(scope="module")
def references(assets, segmentation_model):
    """Per clip: (starts, per-chunk fp32 logprobs, per-chunk fp64 logprobs)."""
    model64 = copy.deepcopy(segmentation_model).double()
    out = {}
    for name, audio in _clips(assets).items():
        starts = _starts(audio)
        chunks = make_chunks(audio, starts, S)[:, None]
        with torch.inference_mode():
            ref32 = segmentation_model(torch.from_numpy(chunks)).numpy()
            ref64 = model64(torch.from_numpy(chunks.astype(np.float64))).numpy()
        out[name] = (audio, starts, ref32, ref64)
    return out


def test_geometry_matches_the_model(segmentation_model):
    """The constants the torch-free run path uses are the network's, and the split's premises hold:
    the sinc convolution has no bias and no padding, the input norm is a per-chunk instance norm."""
    sincnet = segmentation_model.sincnet
    encoder = sincnet.conv1d[0]
    assert (encoder.filterbank.num_filters, encoder.filterbank.kernel_size, encoder.stride) == (
        SINC_FILTERS, SINC_TAPS, SINC_STRIDE)
    assert sincnet.pool1d[0].kernel_size == sincnet.pool1d[0].stride == SINC_POOL and SINC_GRID_SAMPLES == 30
    norm = sincnet.wav_norm1d
    assert norm.affine and not norm.track_running_stats and norm.eps == 1e-5 and float(norm.weight.detach()) > 0
    assert not any(name.endswith("bias") for name, _ in encoder.named_parameters())
    with torch.inference_mode():
        pooled_max, pooled_neg = SincFront(segmentation_model)(torch.zeros(1, 1, S))
        block = SincFront(segmentation_model)(torch.zeros(2, 1, SINC_BLOCK_SAMPLES))[0]
    assert pooled_max.shape == pooled_neg.shape == (1, SINC_FILTERS, sinc_pooled_frames(S)) == (1, 80, 5325)
    assert block.shape == (2, SINC_FILTERS, SINC_BLOCK_POOLED)


def test_chunk_moments_match_numpy_float64(dev00_audio):
    starts = np.array([0, 24000, 48000, 320001])
    mean, variance = chunk_moments(dev00_audio, starts, S)
    chunks = make_chunks(dev00_audio, starts, S).astype(np.float64)
    np.testing.assert_allclose(mean, chunks.mean(axis=1), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(variance, chunks.var(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="runs past the audio"):
        chunk_moments(dev00_audio, np.array([dev00_audio.shape[0] - S + 1]), S)


def _check(name: str, got: np.ndarray, ref32: np.ndarray, ref64: np.ndarray) -> None:
    e = float(np.abs(ref32 - ref64).max())
    to_truth = float(np.abs(got - ref64).max())
    to_ref = float(np.abs(got - ref32).max())
    top2 = np.sort(ref32, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * e
    agree = float((got.argmax(-1) == ref32.argmax(-1))[clear].mean())
    print(f"{name}: per-chunk fp32 error {e:.2e}, split vs fp64 {to_truth:.2e}, split vs per-chunk fp32 "
          f"{to_ref:.2e}, argmax agreement {agree:.6f} on {int(clear.sum())} of {clear.size} frames "
          f"({float((got.argmax(-1) == ref32.argmax(-1)).mean()):.6f} on all)")
    assert to_truth <= 2 * e, name
    assert to_ref <= 2 * e, name
    assert agree == 1.0, name


def test_torch_split_equals_the_per_chunk_model(references, segmentation_model):
    split = _torch_split(segmentation_model)
    for name, (audio, starts, ref32, ref64) in references.items():
        blocks_before = split.blocks_computed
        got = segment_outputs(split, audio, starts, S, batch_size=4)["logprobs"]
        _check(f"torch {name}", got, ref32, ref64)
        if len(starts) > 1:  # chunks 1.5 s apart share blocks: fewer than 10 per chunk
            assert split.blocks_computed - blocks_before < 10 * len(starts) * 0.6
        # called directly (the per-chunk contract) on the same chunks
        direct = split(waveforms=make_chunks(audio, starts[:2], S)[:, None])["logprobs"]
        _check(f"torch {name} direct", direct, ref32[:2], ref64[:2])


@pytest.fixture(scope="module")
def ort_models(assets):
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    models = {}
    for shared in (False, True):
        cfg = compose(["backend=onnxruntime", f"segmentation.sinc_shared={str(shared).lower()}"])
        models[shared] = build_models(cfg)
    return models


def test_onnxruntime_split_equals_the_per_chunk_model(references, ort_models):
    built = ort_models[True]
    assert {m.kind for m in built.stages} >= {"segmentation_sinc", "segmentation"}
    assert built.fusion["sinc_shared"] == 1 and ort_models[False].fusion["sinc_shared"] == 0
    assert built.segmentation.info["content_key"] != ort_models[False].segmentation.info["content_key"]
    split, per_chunk = built.segmentation.load(), ort_models[False].segmentation.load()
    assert isinstance(split, SharedSinc) and split.inputs[0].shape[1:] == (1, S)
    # the default backend.ort_force_spinning_stop reaches both sessions (without it they spin against each other)
    for model in (split.front, split.rest):
        assert model.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    for name, (audio, starts, ref32, ref64) in references.items():
        got = segment_outputs(split, audio, starts, S, batch_size=8)["logprobs"]
        ort32 = segment_outputs(per_chunk, audio, starts, S, batch_size=8)["logprobs"]
        _check(f"onnxruntime {name} (vs torch per-chunk)", got, ref32, ref64)
        _check(f"onnxruntime {name} (vs ORT per-chunk)", got, ort32, ref64)


def test_a_whole_file_in_batches_reuses_blocks_and_matches_one_batch(dev00_audio, segmentation_model):
    """Blocks carried from one batch to the next give the same numbers as one batch holding every chunk
    (batch boundaries change nothing), and every block is computed once."""
    split = _torch_split(segmentation_model)
    starts = _starts(dev00_audio, limit=None)  # 15 chunks, the last off the grid
    assert starts[-1] % SINC_GRID_SAMPLES != 0 and starts[-2] % SINC_GRID_SAMPLES == 0
    whole = segment_outputs(split, dev00_audio, starts, S, batch_size=len(starts))["logprobs"]
    once = split.blocks_computed
    batched = segment_outputs(split, dev00_audio, starts, S, batch_size=3)["logprobs"]
    assert split.blocks_computed - once == once  # no block computed twice across batches
    np.testing.assert_allclose(batched, whole, rtol=0, atol=1e-5)
    # 14 on-grid chunks cover 29.5 s (30 one-second rows on their grid) + the off-grid chunk's 10-11 rows
    assert once <= 30 + 11


def test_end_to_end_rttm_with_and_without(assets, ort_models, tmp_path):
    """The default pipeline (ONNX Runtime) on two real files with and without the option: same RTTM,
    or the DER difference is printed (a frame whose powerset argmax flips within rounding may move a
    boundary by one frame)."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    from diaropt.config import compose
    from diaropt.data.annotations import load_rttm
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import load_pipeline

    reference = load_rttm(assets["ami"] / "debug.development.rttm")
    outputs = {}
    for shared in (False, True):
        cfg = compose(["backend=onnxruntime", f"segmentation.sinc_shared={str(shared).lower()}"])
        pipeline = load_pipeline(cfg, ort_models[shared], StageTimer(), warm_up=False)
        outputs[shared] = {uri: pipeline(assets["ami"] / f"{uri}.wav", uri, keep_arrays=True)
                           for uri in ("dev00", "dev01")}
    for uri in ("dev00", "dev01"):
        a, b = outputs[False][uri], outputs[True][uri]
        assert np.abs(a.arrays["logprobs"] - b.arrays["logprobs"]).max() < 1e-2
        ders = [DiarizationErrorRate()(reference[uri], o.annotation) for o in (a, b)]
        same = a.annotation == b.annotation
        print(f"{uri}: RTTM identical {same}; DER {100 * ders[0]:.2f} % without, {100 * ders[1]:.2f} % with")
        assert same or abs(ders[0] - ders[1]) < 0.005, uri


@pytest.mark.parametrize("overrides", [["fusion.segmentation_with_preprocessor=true"],
                                       ["fusion=on", "embedding.tiled_trunk=false"]])
def test_refused_with_fused_segmentation_before_any_work(overrides, tmp_path):
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    cfg = compose(["backend=onnxruntime", "segmentation.sinc_shared=true", f"paths.cache_dir={tmp_path}", *overrides])
    with pytest.raises(BackendUnavailable, match="segmentation.sinc_shared"):
        build_models(cfg)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.parametrize("overrides, backend, expected", [
    ([], "onnxruntime", True),  # auto: the ONNX Runtime default
    ([], "coreml", False), ([], "torch", False),  # auto elsewhere: not measured there
    (["fusion.segmentation_with_preprocessor=true"], "onnxruntime", False),  # auto never asks the impossible
    (["fusion=on", "embedding.tiled_trunk=false"], "onnxruntime", False),
    (["segmentation.sinc_shared=false"], "onnxruntime", False),
    (["segmentation.sinc_shared=true"], "coreml", True),  # explicit values are kept
    (["experiment=seed_baseline"], "onnxruntime", False),  # the design note's pipeline: whole model per chunk
])
def test_auto_resolution(overrides, backend, expected):
    from diaropt.config import compose
    from diaropt.variants.fusion_plan import FusionPlan

    plan = FusionPlan.from_config(compose(overrides), backend)
    assert plan.sinc_shared is expected
    plan.check()


def test_parity_reference_is_the_per_chunk_model():
    from diaropt.config import compose
    from diaropt.parity import reference_config

    cfg = compose(["segmentation.sinc_shared=true"])
    assert reference_config(cfg).segmentation.sinc_shared is False


@pytest.mark.slow
def test_coreml_split_builds_and_matches_torch(tmp_path, assets, segmentation_model, dev00_audio):
    """Both parts convert to Core ML (fixed batches: the front 10 rows, the rest 2 chunks) and the
    ML-program executor's numbers match the torch per-chunk model within the same derived bound."""
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    cfg = compose(["backend=coreml", "compute_unit=cpu_only", f"paths.cache_dir={tmp_path}",
                   "segmentation.batch_size=2", "segmentation.sinc_shared=true"])
    built = build_models(cfg)
    assert {m.kind for m in built.stages} >= {"segmentation_sinc", "segmentation"}
    split = built.segmentation.load()
    assert isinstance(split, SharedSinc) and split.front.inputs[0].shape == (10, 1, SINC_BLOCK_SAMPLES)
    starts = _starts(dev00_audio, limit=4)
    got = segment_outputs(split, dev00_audio, starts, S, batch_size=2)["logprobs"]
    chunks = make_chunks(dev00_audio, starts, S)[:, None]
    with torch.inference_mode():
        ref32 = segmentation_model(torch.from_numpy(chunks)).numpy()
        ref64 = copy.deepcopy(segmentation_model).double()(torch.from_numpy(chunks.astype(np.float64))).numpy()
    _check("coreml executor dev00", got, ref32, ref64)
