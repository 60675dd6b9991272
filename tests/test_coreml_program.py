"""The Core ML ML-program executor (``backends.coreml_program``) against torch, op by op and per model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from diaropt.backends.coreml_program import (SUPPORTED_OPS, PipelineTypeError, ProgramExecutor,  # noqa: E402
                                             UnsupportedOp, check_pipeline)

RNG = np.random.default_rng(0)


def _run(program, **inputs):
    return ProgramExecutor(program, "test-program")(**inputs)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _program(shapes, body, dtype=types.fp32, target=None):
    specs = [mb.TensorSpec(shape=s, dtype=dtype) for s in shapes]
    return mb.program(input_specs=specs, opset_version=target or ct.target.iOS16)(body)


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float32), rtol=tol, atol=tol)


def test_conv_linear_matmul_against_torch():
    x, w, b = _x(2, 3, 50), _x(4, 3, 5), _x(4)
    prog = _program([(2, 3, 50)], lambda a: mb.conv(x=a, weight=w, bias=b, strides=[2], pad_type="custom",
                                                    pad=[1, 2], dilations=[1], groups=1))
    _close(list(_run(prog, a=x).values())[0],
           F.conv1d(F.pad(torch.from_numpy(x), (1, 2)), torch.from_numpy(w), torch.from_numpy(b), stride=2))
    lw, lb = _x(6, 50), _x(6)
    prog = _program([(2, 3, 50)], lambda a: mb.linear(x=a, weight=lw, bias=lb))
    _close(list(_run(prog, a=x).values())[0], F.linear(torch.from_numpy(x), torch.from_numpy(lw), torch.from_numpy(lb)),
           1e-4)
    y = _x(2, 50, 7)
    prog = _program([(2, 3, 50), (2, 50, 7)], lambda a, c: mb.matmul(x=a, y=c))
    _close(list(_run(prog, a=x, c=y).values())[0], x @ y, 1e-4)


def test_norms_pool_softmax_reductions_against_torch():
    x = _x(2, 4, 30)
    gamma, beta = _x(4), _x(4)
    prog = _program([(2, 4, 30)], lambda a: mb.instance_norm(x=a, gamma=gamma, beta=beta, epsilon=1e-5))
    _close(list(_run(prog, a=x).values())[0],
           F.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(gamma), bias=torch.from_numpy(beta)), 1e-4)
    mean, var = _x(4), np.abs(_x(4)) + 0.5
    prog = _program([(2, 4, 30)], lambda a: mb.batch_norm(x=a, mean=mean, variance=var, gamma=gamma, beta=beta))
    _close(list(_run(prog, a=x).values())[0],
           F.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(gamma),
                        torch.from_numpy(beta)), 1e-4)
    prog = _program([(2, 4, 30)], lambda a: mb.max_pool(x=a, kernel_sizes=[3], strides=[3], pad_type="valid"))
    _close(list(_run(prog, a=x).values())[0], F.max_pool1d(torch.from_numpy(x), 3, 3))
    prog = _program([(2, 4, 30)], lambda a: mb.softmax(x=a, axis=1))
    _close(list(_run(prog, a=x).values())[0], torch.softmax(torch.from_numpy(x), 1))
    prog = _program([(2, 4, 30)], lambda a: (mb.reduce_mean(x=a, axes=[2], keep_dims=True),
                                             mb.reduce_sum(x=a, axes=[1, 2]), mb.reduce_max(x=a, axes=[-1]),
                                             mb.reduce_argmax(x=a, axis=1)))
    got = list(_run(prog, a=x).values())
    _close(got[0], x.mean(2, keepdims=True))
    _close(got[1], x.sum((1, 2)), 1e-4)
    _close(got[2], x.max(-1))
    _close(got[3], x.argmax(1))


def test_bidirectional_lstm_against_torch():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 3, bidirectional=True)
    x = _x(7, 2, 5)

    def reorder(w):  # torch i, f, g, o -> Core ML i, f, o, g
        i, f, g, o = np.split(w.detach().numpy(), 4)
        return np.concatenate([i, f, o, g])

    def body(a):
        h0 = mb.fill(shape=[2, 6], value=0.0)
        return mb.lstm(x=a, initial_h=h0, initial_c=h0, weight_ih=reorder(lstm.weight_ih_l0),
                       weight_hh=reorder(lstm.weight_hh_l0), bias=reorder(lstm.bias_ih_l0 + lstm.bias_hh_l0),
                       weight_ih_back=reorder(lstm.weight_ih_l0_reverse), weight_hh_back=reorder(lstm.weight_hh_l0_reverse),
                       bias_back=reorder(lstm.bias_ih_l0_reverse + lstm.bias_hh_l0_reverse), direction="bidirectional",
                       output_sequence=True)[0]

    got = list(_run(_program([(7, 2, 5)], body), a=x).values())[0]
    with torch.no_grad():
        want = lstm(torch.from_numpy(x))[0]
    _close(got, want, 1e-5)


def test_layout_ops_against_numpy():
    x = _x(2, 6, 8)
    prog = _program([(2, 6, 8)], lambda a: (
        mb.slice_by_index(x=a, begin=[0, 1, 0], end=[2, 5, 8], stride=[1, 2, 1]),
        mb.gather(x=a, indices=np.array([3, 0, 5], dtype=np.int32), axis=1),
        mb.concat(values=[a, a], axis=2), mb.stack(values=[a, a], axis=0), mb.tile(x=a, reps=[1, 2, 1]),
        mb.transpose(x=a, perm=[2, 0, 1]), mb.reshape(x=a, shape=[12, 8]),
        mb.select(cond=mb.greater(x=a, y=0.0), a=a, b=mb.mul(x=a, y=2.0)),
        mb.clip(x=a, alpha=-0.5, beta=0.5), mb.log(x=mb.abs(x=a)), mb.pow(x=mb.abs(x=a), y=2.0)))
    got = list(_run(prog, a=x).values())
    wants = [x[:, 1:5:2], x[:, [3, 0, 5]], np.concatenate([x, x], 2), np.stack([x, x]), np.tile(x, (1, 2, 1)),
             x.transpose(2, 0, 1), x.reshape(12, 8), np.where(x > 0, x, 2 * x), np.clip(x, -0.5, 0.5),
             np.log(np.abs(x)), np.abs(x) ** 2]
    for value, want in zip(got, wants):
        _close(value, want, 1e-5)


def test_fp16_program_rounds_every_tensor_and_counts_overflow_and_underflow():
    """x * 1000 in an fp16 program: 100 -> 1e5 overflows to inf; 1e-6 * 1e-3 underflows to 0;
    3.3 rounds to fp16's nearest value."""
    x = np.array([[100.0, 1e-6, 3.3, -70.0]], dtype=np.float32)

    def body(a):
        half = mb.cast(x=a, dtype="fp16")
        big = mb.mul(x=half, y=np.float16(1000.0))
        small = mb.mul(x=half, y=np.float16(1e-3))
        return mb.cast(x=big, dtype="fp32"), mb.cast(x=small, dtype="fp32")

    executor = ProgramExecutor(_program([(1, 4)], body), "test-program")
    big, small = executor(a=x).values()
    assert np.isinf(big[0, 0]) and np.isinf(big[0, 3]) and big[0, 3] < 0
    assert big[0, 2] == np.float32(np.float16(np.float16(3.3) * np.float16(1000.0)))
    assert small[0, 1] == 0.0  # 1e-6 is subnormal in fp16; times 1e-3 it underflows to zero
    assert executor.stats.counts["fp16_overflows"] == 2
    assert executor.stats.counts["fp16_underflows"] >= 1
    assert executor.stats.counts["nonfinite_outputs"] == 2
    assert executor.stats.first_nonfinite_op is not None


def test_unknown_op_is_refused_by_name_and_path():
    prog = _program([(2, 3)], lambda a: mb.sinh(x=a))
    assert "sinh" not in SUPPORTED_OPS
    with pytest.raises(UnsupportedOp, match="sinh.*not supported") as error:
        ProgramExecutor(prog, "/some/model.mlpackage")
    assert "/some/model.mlpackage" in str(error.value)


def _feature(name, shape, data_type):
    from coremltools.proto import Model_pb2

    feature = Model_pb2.FeatureDescription()
    feature.name = name
    feature.type.multiArrayType.shape.extend(shape)
    feature.type.multiArrayType.dataType = data_type
    return feature


def test_pipeline_check_refuses_a_dtype_mismatch_and_accepts_matching_types():
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    FLOAT32, FLOAT16 = FeatureTypes_pb2.ArrayFeatureType.FLOAT32, FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for produced, ok in ((FLOAT16, False), (FLOAT32, True)):
        spec = Model_pb2.Model()
        spec.description.input.append(_feature("waveforms", [2, 160000], FLOAT32))
        first, second = spec.pipeline.models.add(), spec.pipeline.models.add()
        first.description.input.append(_feature("waveforms", [2, 160000], FLOAT32))
        first.description.output.append(_feature("logprobs", [2, 589, 7], produced))
        second.description.input.append(_feature("logprobs", [2, 589, 7], FLOAT32))
        if ok:
            check_pipeline(spec, "p.mlpackage")
        else:
            with pytest.raises(PipelineTypeError, match="logprobs.*Core ML refuses"):
                check_pipeline(spec, "p.mlpackage")


# ----------------------------------------------------------------------------------------------
# The fbank in fp16 builds


class _FbankThenConv(torch.nn.Module):
    """The fbank then one conv: in an fp16 build the conv is fp16, the fbank must stay fp32."""

    def __init__(self, **fbank_options) -> None:
        super().__init__()
        from diaropt.models.fbank import KaldiFbank

        self.fbank = KaldiFbank(frame_extraction="strided", **fbank_options)
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(80, 8, 1)

    def forward(self, waveforms):
        features = self.fbank(waveforms)
        return features, self.conv(features.transpose(1, 2))


@pytest.mark.parametrize("fbank_options", [{}, {"window_type": "hamming", "input_scale": 32768.0}],
                         ids=["campplus", "wespeaker"])
def test_fp16_build_keeps_the_fbank_fp32_and_a_full_scale_tone_and_silence_stay_finite(tmp_path, fbank_options):
    from diaropt.backends import coreml
    from diaropt.backends.base import TensorSpec
    from diaropt.backends.coreml_program import CoreMLProgramModel

    samples = 16000
    module = _FbankThenConv(**fbank_options).eval()
    path = tmp_path / "fbank.mlpackage"
    coreml.convert_coreml(module, (torch.zeros(2, samples),), [TensorSpec("waveforms", (2, samples))],
                          [TensorSpec("features", (2, 98, 80)), TensorSpec("out", (2, 8, 98))], path, precision="fp16")
    dtypes = coreml.op_dtype_histogram(path)
    assert set(dtypes["log"]) == {"float32"}  # every log op of the fbank
    assert "float16" in dtypes["conv"]  # the rest of the program is still fp16
    tone = np.sin(2 * np.pi * 7000 * np.arange(samples) / 16000).astype(np.float32)
    waveforms = np.stack([tone, np.zeros(samples, np.float32)])
    model = CoreMLProgramModel(path, "fbank-test")
    out = model(waveforms=waveforms)
    assert np.isfinite(out["features"]).all() and np.isfinite(out["out"]).all()
    assert model.stats.counts["fp16_overflows"] == 0
    with torch.no_grad():
        want = module.fbank(torch.from_numpy(waveforms)).numpy()
    np.testing.assert_allclose(out["features"], want, rtol=1e-3, atol=1e-3)


class _LinearLogSoftmax(torch.nn.Module):
    """The segmentation model's head: 7-class log-softmax over a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, 7)

    def forward(self, features):
        return torch.nn.functional.log_softmax(self.linear(features), dim=-1)


def test_fp16_build_keeps_the_log_softmax_fp32_so_unlikely_classes_stay_finite(tmp_path):
    """In fp16 a probability under 6e-8 rounds to 0 and its log to -inf (seen on the segmentation
    program: 37,261 -inf log-probabilities on pyannote's sample); the head stays fp32."""
    from diaropt.backends import coreml
    from diaropt.backends.base import TensorSpec
    from diaropt.backends.coreml_program import CoreMLProgramModel

    module = _LinearLogSoftmax().eval()
    path = tmp_path / "head.mlpackage"
    coreml.convert_coreml(module, (torch.zeros(4, 16),), [TensorSpec("features", (4, 16))],
                          [TensorSpec("logprobs", (4, 7))], path, precision="fp16")
    dtypes = coreml.op_dtype_histogram(path)
    assert "float16" not in dtypes.get("softmax", {}) and "float16" not in dtypes.get("log", {}), dtypes
    features = (RNG.standard_normal((4, 16)) * 30).astype(np.float32)  # logits tens apart: tiny probabilities
    out = CoreMLProgramModel(path, "head-test")(features=features)["logprobs"]
    with torch.no_grad():
        want = module(torch.from_numpy(features)).numpy()
    assert want.min() < np.log(6e-8)  # the case: some probabilities fp16 cannot hold
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=2e-2, atol=0.5)


# ----------------------------------------------------------------------------------------------
# Per model, and every variant's ops (slow: conversions)


@pytest.mark.slow
def test_fp32_programs_match_torch(tmp_path, assets):
    """fp32 Core ML programs of segmentation and the CAM++ embedding vs the torch fp32 models."""
    from diaropt.config import compose
    from diaropt.models.embedding import load_embedding_model, load_segmentation_model
    from diaropt.variants.build import build_models

    cfg = compose(["backend=coreml", "compute_unit=cpu_only", f"paths.cache_dir={tmp_path}", "segmentation.batch_size=2",
                   "embedding.batch_size=2", "embedding.tiled_trunk=false", "embedding.shared_trunk=false"])
    built = build_models(cfg)
    x = (RNG.standard_normal((2, 1, 160000)) * 0.1).astype(np.float32)
    logprobs = built.segmentation.load()(waveforms=x)["logprobs"]
    with torch.no_grad():
        want = load_segmentation_model()[0](torch.from_numpy(x)).numpy()
    assert np.abs(logprobs - want).max() <= 1e-4 * np.abs(want).max()
    masks = np.ones((2, 589), np.float32)
    embeddings = built.embedding.load()(waveforms=x[:, 0], masks=masks)["embeddings"]
    with torch.no_grad():
        want = load_embedding_model("campplus", frame_extraction="strided")[0](torch.from_numpy(x[:, 0]),
                                                                               torch.from_numpy(masks)).numpy()
    assert np.abs(embeddings - want).max() <= 1e-4 * np.abs(want).max()


VARIANTS = [[f"quant={q}"] for q in ("fp32", "fp16", "fp16_selective", "int8", "int4", "palettize4", "palettize6",
                                     "palettize8")]
VARIANTS += [["frame_extraction=batched", "quant=fp16"], ["frame_extraction=per_frame", "quant=fp16"],
             ["fusion=on", "quant=int8", "embedding.tiled_trunk=false"],
             ["fusion=on", "quant=int4", "embedding.tiled_trunk=false"],
             ["experiment=seed_plan"], ["fusion.fbank_in_embedding_model=false", "quant=fp16"],
             ["embedding.tiled_trunk=false", "embedding.shared_trunk=false", "quant=fp16"]]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", VARIANTS, ids=[" ".join(v) for v in VARIANTS])
def test_every_variant_uses_only_supported_ops_and_executes(tmp_path_factory, assets, overrides):
    """The op list stays complete: every Core ML model the project builds (quant modes x frame
    extraction x fusion switches; CAM++ only: WeSpeaker has no pinned weights) is executable."""
    from diaropt.backends import coreml
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    cache = tmp_path_factory.getbasetemp() / "variant_cache"
    cfg = compose(["backend=coreml", "compute_unit=cpu_only", f"paths.cache_dir={cache}", "segmentation.batch_size=2",
                   "embedding.batch_size=2", *overrides])
    built = build_models(cfg)
    for model in built.models():
        if model.path is None:
            continue
        missing = set(coreml.op_histogram(model.path, include_const=True)) - SUPPORTED_OPS
        assert not missing, f"{' '.join(overrides)}: {model.kind} uses unsupported ops {sorted(missing)}"
        runnable = model.load()
        feeds = {s.name: (RNG.standard_normal(s.shape) * 0.1).astype(np.float32) if s.name != "masks"
                 else np.ones(s.shape, np.float32) for s in runnable.inputs}
        out = runnable(**feeds)
        assert set(out) == {s.name for s in runnable.outputs}
