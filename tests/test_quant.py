"""The quant axis on both backends: Core ML packages per mode (ops, sizes, targets, precisions),
ONNX fp16 / int8_dynamic graphs, and faithful ONNX runs carrying the dequantized weights of a
compressed Core ML package bit for bit (toy model and the real segmentation model)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from diaropt.backends import coreml
from diaropt.backends import onnxruntime as ort_backend
from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos
from diaropt.backends.onnxruntime import OnnxRuntimeModel
from diaropt.variants import quant, quant_coreml, quant_readback
from diaropt.variants.quant_coreml import build_coreml
from diaropt.variants.quant_onnx import build_onnx

TOY_IO = ([TensorSpec("x", (2, 16, 64))], [TensorSpec("y", (2, 32, 8))])
COREML_MODES = ("fp32", "fp16", "fp16_selective", "int8", "int4", "palettize4", "palettize6", "palettize8")


class Toy(nn.Module):
    """(batch, 16, 64) -> (batch, 32, 8) log-probabilities: conv+BN twice, max-pool, instance norm,
    BiLSTM, mean removal over time, a fixed (non-parameter) mixing matrix, layer norm, two linear
    layers. ~116k weights, 35% in the LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(16, 128, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(128)
        self.conv2 = nn.Conv1d(128, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(128)
        self.norm = nn.InstanceNorm1d(128, affine=True)
        self.lstm = nn.LSTM(128, 32, bidirectional=True, batch_first=True)
        self.ln = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 8)  # 2048 elements: at the default threshold, left uncompressed
        # a constant like an fbank's DFT matrix: compressed only with compress_scope="all"
        self.register_buffer("mix", torch.eye(64) + 0.01 * torch.arange(64.0).outer(torch.ones(64)) / 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool1d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.norm(x).transpose(1, 2)
        x, _ = self.lstm(x)
        x = self.ln((x - x.mean(dim=1, keepdim=True)) @ self.mix)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)


@pytest.fixture(scope="module")
def toy() -> Toy:
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding changes the conv weights
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def toy_inputs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((3, 16, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def coreml_builds(toy, tmp_path_factory) -> dict[str, tuple]:
    """mode -> (package path, info) for every Core ML mode buildable on this host (~10 s)."""
    root = tmp_path_factory.mktemp("coreml_quant")
    return {mode: build_coreml(toy, (torch.randn(2, 16, 64),), *TOY_IO, root / f"{mode}.mlpackage", mode)
            for mode in COREML_MODES}


@pytest.fixture(scope="module")
def onnx_builds(toy, tmp_path_factory) -> dict[str, tuple]:
    """mode -> (ONNX path, info); "int8_all" is faithful int8 with compress_scope="all"."""
    root = tmp_path_factory.mktemp("onnx_quant")
    builds = {mode: build_onnx(toy, (torch.randn(2, 16, 64),), *TOY_IO, root / f"{mode}.onnx", mode)
              for mode in ("fp32", "fp16", "fp16_selective", "int8_dynamic", "int8", "palettize4")}
    builds["int8_all"] = build_onnx(toy, (torch.randn(2, 16, 64),), *TOY_IO, root / "int8_all.onnx", "int8",
                                          coreml_compress_scope="all")
    return builds


def _mil_ops(path) -> list:
    """Every op of a saved package's MIL program (nested blocks included)."""
    return coreml.mil_operations(coreml.load_mil_program(path))


# ---------------------------------------------------------------------------------------- the axis


def test_modes_are_the_config_axis():
    from diaropt.config import QuantMode

    assert set(quant.QUANT_MODES) == {mode.value for mode in QuantMode}


def test_unknown_mode_lists_valid_modes(toy, tmp_path):
    for build in (build_coreml, build_onnx):
        with pytest.raises(ValueError) as error:
            build(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "m", "int3")
        assert all(mode in str(error.value) for mode in quant.QUANT_MODES)
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.skipif(is_macos(), reason="w8a8 builds on macOS")
def test_w8a8_refused_off_macos_before_any_work(toy, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("expensive work started before the refusal")

    monkeypatch.setattr(quant_coreml, "fold_batchnorm", no_work)
    monkeypatch.setattr(coreml, "convert_coreml", no_work)
    with pytest.raises(BackendUnavailable) as error:
        build_coreml(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "w8a8.mlpackage", "w8a8")
    assert "macOS" in error.value.reason and "calibrat" in error.value.reason
    # ONNX Runtime's w8a8 is its own static quantization, buildable anywhere (tests/test_quant_w8a8_ort.py)
    with pytest.raises(BackendUnavailable, match="ONNX Runtime"):  # int8_dynamic is ONNX Runtime's
        build_coreml(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "d.mlpackage", "int8_dynamic")


def test_fold_batchnorm(toy):
    example = (torch.randn(2, 16, 64),)
    folded, pairs = quant_coreml.fold_batchnorm(toy, example)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(toy.bn1, nn.BatchNorm1d)  # a copy
    assert not torch.equal(folded.conv1.weight, toy.conv1.weight)
    # the fold is evaluated in float64 and rounded once: the weights Core ML and the faithful ONNX
    # graph start from (and so the cached builds) do not depend on float32 evaluation order
    for conv, bn in ((toy.conv1, toy.bn1), (toy.conv2, toy.bn2)):
        scale = torch.rsqrt(bn.running_var.double() + bn.eps) * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        fused = getattr(folded, [n for n, m in toy.named_children() if m is conv][0])
        torch.testing.assert_close(fused.weight, (conv.weight.double() * scale[:, None, None]).float(), atol=0, rtol=0)
        torch.testing.assert_close(fused.bias, ((bias - bn.running_mean.double()) * scale + bn.bias.double()).float(),
                                   atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(folded(*example), toy(*example), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- Core ML


def test_coreml_conversion_leaves_the_module_alone(tmp_path):
    """coremltools writes into a conv -> BatchNorm(affine=False) running_mean in place (as in CAM++'s
    embedding layer); the conversion must work on a copy."""

    class ConvNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(8, 8, 1, bias=False), nn.BatchNorm1d(8, affine=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x.unsqueeze(-1))).squeeze(-1)

    module = ConvNorm().eval()
    with torch.no_grad():
        module.bn.running_mean.normal_()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    build_coreml(module, (torch.zeros(2, 8),), [TensorSpec("x", (2, 8))], [TensorSpec("y", (2, 8))],
                       tmp_path / "m.mlpackage", "fp32")
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_coreml_modes_store_the_expected_constexpr_ops(coreml_builds):
    expected = {"int8": "constexpr_affine_dequantize", "int4": "constexpr_blockwise_shift_scale",
                "palettize4": "constexpr_lut_to_dense", "palettize6": "constexpr_lut_to_dense",
                "palettize8": "constexpr_lut_to_dense"}
    for mode, (path, info) in coreml_builds.items():
        histogram = coreml.op_histogram(path)
        constexpr = {op for op in histogram if op.startswith("constexpr_")}
        assert constexpr == ({expected[mode]} if mode in expected else set()), mode
        assert info["constexpr_ops"] == {op: histogram[op] for op in constexpr}
        assert "constexpr_" not in "".join(info["op_histogram"]) and info["op_histogram"]["lstm"] == 1
    from coremltools.converters.mil.mil import types

    for mode in ("palettize4", "palettize6", "palettize8"):
        luts = [op.lut.val for op in _mil_ops(coreml_builds[mode][0]) if op.op_type == "constexpr_lut_to_dense"]
        assert luts and all(lut.size == 2 ** int(mode[-1]) for lut in luts)
    int4_data = [op.data for op in _mil_ops(coreml_builds["int4"][0]) if op.op_type == "constexpr_blockwise_shift_scale"]
    assert int4_data and all(types.builtin_to_string(var.dtype) == "int4" for var in int4_data)
    assert all(var.val.min() >= -8 and var.val.max() <= 7 for var in int4_data)


def test_coreml_package_sizes_follow_the_bits(coreml_builds):
    size = {mode: info["package_size_bytes"] for mode, (_, info) in coreml_builds.items()}
    for mode, (path, _) in coreml_builds.items():
        assert size[mode] == coreml.package_size_bytes(path)
    # fp16 stores the LSTM's 35% of the weights in fp32 at macOS13 (Core ML's lstm is fp32-only
    # before iOS18), so fp16 is ~0.7x fp32, not 0.5x; everything else halves again per step.
    assert size["fp32"] > 1.35 * size["fp16"]
    assert 1.8 * size["int8"] < size["fp16"]
    assert size["fp16_selective"] == pytest.approx(size["fp16"], rel=0.05)
    assert size["palettize8"] == pytest.approx(size["int8"], rel=0.1)
    assert size["int8"] > size["palettize6"] > size["palettize4"]
    assert size["int8"] > 1.4 * size["int4"] and size["int8"] > 1.6 * size["palettize4"]


def test_compressed_modes_cover_the_weights(coreml_builds):
    for mode in ("int8", "palettize4", "palettize6", "palettize8"):
        info = coreml_builds[mode][1]
        assert info["compressed_parameter_fraction"] > 0.9, mode
        # by default only parameters are compressed: the fixed mixing matrix stays as it was
        assert info["compress_scope"] == "parameters"
        assert list(info["uncompressed_weights"].values()) == [[64, 64]] == [
            shape for name, shape in info["uncompressed_weights"].items() if name in info["non_parameter_consts"]]
        assert info["folded_batchnorms"] == 2 and info["compute_precision"] == "fp16"
        assert info["compress_s"] > 0 and info["convert_s"] > 0
        # the LSTM weights were matched to torch parameters through the gate reorder
        assert sum("(lstm_gates)" in source for source in info["weight_sources"].values()) == 4


def test_int4_targets_ios18_and_blocks_the_input_axis(coreml_builds, toy, tmp_path):
    path, info = coreml_builds["int4"]
    assert info["deployment_target"] == coreml.deployment_target(path) == "iOS18/macOS15"
    assert info["minimum_deployment_target"] == "macOS15"
    assert all(coreml_builds[m][1]["deployment_target"] == "iOS16/macOS13" for m in COREML_MODES if m != "int4")
    # conv1 has 16 input channels: not divisible by the default block size 32, so Core ML leaves it
    # (besides the mixing matrix, which is no parameter)
    assert sorted(info["uncompressed_weights"].values()) == [[64, 64], [128, 16, 3]]
    path16, info16 = build_coreml(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "b16.mlpackage", "int4",
                                        block_size=16)
    assert list(info16["uncompressed_weights"].values()) == [[64, 64]]
    for op in _mil_ops(path16):
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.data.val, op.scale.val
            assert data.shape[0] == scale.shape[0] and data.shape[1] == 16 * scale.shape[1]
    with pytest.raises(ValueError, match="macOS15"):
        build_coreml(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "x.mlpackage", "int4",
                           minimum_deployment_target="macOS13")


def test_fp16_selective_keeps_selected_ops_fp32(coreml_builds):
    selective = coreml.op_dtype_histogram(coreml_builds["fp16_selective"][0])
    plain = coreml.op_dtype_histogram(coreml_builds["fp16"][0])
    kept = {"max_pool", "instance_norm", "layer_norm", "reduce_mean", "softmax", "log"}
    assert kept <= set(selective)
    for op_type in kept - {"softmax", "log"}:
        assert selective[op_type] == {"float32": plain[op_type]["float16"]}, op_type
    for op_type in ("softmax", "log"):  # fp32 in every fp16 build (backends.coreml.FP32_OUTPUT_OPS)
        assert set(selective[op_type]) == set(plain[op_type]) == {"float32"}, op_type
    for op_type in ("conv", "linear", "relu"):
        assert set(selective[op_type]) == set(plain[op_type]) == {"float16"}, op_type
    assert coreml_builds["fp16_selective"][1]["op_dtypes"]["float32"] > coreml_builds["fp16"][1]["op_dtypes"].get("float32", 0)


def test_read_dequantized_weights_matches_coremltools(coreml_builds, toy, tmp_path):
    """The read-back weights are exactly the constexpr outputs that compute ops read, decompressed by
    coremltools (``materialized_val_inference``) and widened to float32 without change, for every
    layout we produce (iOS16 affine / LUT with packed indices, iOS18 blockwise and grouped-LUT); an
    int8 weight lies within half a quantization step of the torch weight."""
    lut18, _ = build_coreml(toy, (torch.zeros(2, 16, 64),), *TOY_IO, tmp_path / "lut18.mlpackage", "palettize4",
                                  minimum_deployment_target="macOS15")
    for path in (coreml_builds["int8"][0], coreml_builds["int4"][0], coreml_builds["palettize6"][0], lut18):
        weights = quant_readback.read_dequantized_weights(path)
        reference = {op.outputs[0].name: op.materialized_val_inference() for op in _mil_ops(path)
                     if op.op_type.startswith("constexpr_")}
        assert weights and set(weights) <= set(reference)
        for name, value in weights.items():
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, reference[name].astype(np.float32), err_msg=name)
    fc1 = toy.fc1.weight.detach().numpy()
    int8 = next(v for v in quant_readback.read_dequantized_weights(coreml_builds["int8"][0]).values() if v.shape == fc1.shape)
    step = np.abs(fc1).max(axis=1, keepdims=True) / 127  # per output channel
    assert 0 < np.abs(int8 - fc1).max() and np.all(np.abs(int8 - fc1) <= 0.5 * step + 1e-3 * np.abs(fc1) + 1e-7)


# ---------------------------------------------------------------------------------------- ONNX


def _run(path, info, x: np.ndarray) -> np.ndarray:
    return OnnxRuntimeModel(path, optimization_level=info["ort_level"])(x=x)["y"]


def _elem_types(path) -> tuple[dict[str, int], dict[str, int]]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    values = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    values.update({i.name: i.data_type for i in model.graph.initializer})
    values.update(io)
    return io, values


def test_onnx_fp16_keeps_fp32_io_and_stays_close(onnx_builds, toy_inputs):
    fp32_path, fp32_info = onnx_builds["fp32"]
    reference = _run(fp32_path, fp32_info, toy_inputs)
    for mode in ("fp16", "fp16_selective"):
        path, info = onnx_builds[mode]
        io, values = _elem_types(path)
        assert io == {"x": TensorProto.FLOAT, "y": TensorProto.FLOAT}
        big = [i for i in onnx.load(str(path)).graph.initializer if np.prod(i.dims) > 1000]
        assert big and all(i.data_type == TensorProto.FLOAT16 for i in big)
        assert info["onnx_size_bytes"] < 0.55 * fp32_info["onnx_size_bytes"]
        assert info["onnx_quant_kind"] == "native" and info["ort_probe"][info["ort_level"]] == "ok"
        # log-probabilities: fp16 rounding of weights and activations stays below 1e-2
        np.testing.assert_allclose(_run(path, info, toy_inputs), reference, atol=1e-2, rtol=0)
    # fp16_selective: the kept op types read and write fp32, the rest fp16
    graph = onnx.load(str(onnx_builds["fp16_selective"][0])).graph
    _, values = _elem_types(onnx_builds["fp16_selective"][0])
    kinds = {}
    for node in graph.node:
        if node.op_type in quant.ONNX_FP32_OPS or node.op_type.startswith("Reduce") or node.op_type in ("Conv", "LSTM"):
            kinds.setdefault(node.op_type, set()).add(values[node.output[0]])
    assert {"MaxPool", "InstanceNormalization", "LayerNormalization", "ReduceMean", "LogSoftmax"} <= set(kinds)
    assert all(kinds[op] == {TensorProto.FLOAT} for op in kinds if op not in ("Conv", "LSTM"))
    assert kinds["Conv"] == kinds["LSTM"] == {TensorProto.FLOAT16}


def test_onnx_int8_dynamic_runs_and_is_smaller(onnx_builds, toy_inputs):
    path, info = onnx_builds["int8_dynamic"]
    fp32_path, fp32_info = onnx_builds["fp32"]
    assert info["onnx_size_bytes"] < 0.7 * fp32_info["onnx_size_bytes"]
    # fc1, fc2 and the mixing matrix; both convs; the LSTM
    assert info["quantized_ops"] == {"ConvInteger": 2, "DynamicQuantizeLSTM": 1, "MatMulInteger": 3}
    difference = np.abs(np.exp(_run(path, info, toy_inputs)) - np.exp(_run(fp32_path, fp32_info, toy_inputs))).max()
    assert 0 < difference < 0.02  # probabilities


def test_ort_level_falls_back_when_a_level_crashes(onnx_builds, monkeypatch, caplog):
    path, _ = onnx_builds["fp16"]
    crash = "was ended by SIGSEGV inside ONNX Runtime"
    monkeypatch.setattr(ort_backend, "probe_session", lambda p, feeds, level, timeout_s: (
        crash if level == "all" else None))
    with caplog.at_level(logging.INFO, logger=ort_backend.log.name):
        level, outcomes = ort_backend.usable_optimization_level(path, {"x": ((1, 16, 64), "float32")})
    assert level == "extended" and outcomes == {"all": crash, "extended": "ok"}
    # what happened and what was done, at INFO: not a crash of the user's job
    (record,) = [r for r in caplog.records if r.name == ort_backend.log.name]
    assert record.levelno == logging.INFO
    assert "probe process" in record.message and "'extended' instead" in record.message
    monkeypatch.setattr(ort_backend, "probe_session", lambda *a, **k: "failed (exit 1): no kernel")
    with pytest.raises(RuntimeError, match="no onnxruntime optimization level"):
        ort_backend.usable_optimization_level(path, {"x": ((1, 16, 64), "float32")})


def test_probe_session_reports_failures(tmp_path):
    """The probe runs in a child process and reports what went wrong instead of raising."""
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    outcome = ort_backend.probe_session(tmp_path / "broken.onnx", {}, "all")
    assert outcome.startswith("failed (exit 1)") and "InvalidProtobuf" in outcome


# ---------------------------------------------------------------------------------------- faithful


def _rows(array: np.ndarray) -> set[bytes]:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {row.tobytes() for row in array.reshape(-1, array.shape[-1])}


def _onnx_tensors(path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    tensors = [numpy_helper.to_array(i) for i in graph.initializer]
    tensors += [numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"]
    return [t for t in tensors if t.dtype == np.float32 and t.ndim]


def _assert_carries(onnx_path, weights: dict[str, np.ndarray]) -> None:
    """Independently of the builder: every row (last axis) of every dequantized Core ML weight is a
    row of one ONNX tensor (or of its transpose), bit for bit."""
    tensors = _onnx_tensors(onnx_path)
    forms = [_rows(t) for t in tensors] + [_rows(t.T) for t in tensors if t.ndim == 2]
    for name, value in weights.items():
        rows = _rows(value)
        assert any(rows <= form for form in forms), f"{name}: dequantized values not in the ONNX graph"


def _check_faithful(path, info, original: nn.Module, min_fraction: float = 0.9) -> dict[str, np.ndarray]:
    assert info["onnx_quant_kind"] == "faithful_coreml"
    assert info["unmapped_weights"] == {} and info["unmapped_elements"] == 0
    assert info["faithful_verified_weights"] == info["compressed_weights"] > 0
    assert info["compressed_parameter_fraction"] >= min_fraction
    weights = quant_readback.read_dequantized_weights(path.parent / info["coreml_package"])
    assert len(weights) == info["compressed_weights"]
    _assert_carries(path, weights)
    # the compression changed them: the original fp32 weights are gone from the graph
    onnx_rows = set().union(*(_rows(t) for t in _onnx_tensors(path)), *(_rows(t.T) for t in _onnx_tensors(path) if t.ndim == 2))
    for name, parameter in original.named_parameters():
        if name in info["mapped_parameters"]:
            assert not _rows(parameter.detach().numpy()) <= onnx_rows, name
    return weights


@pytest.mark.parametrize("mode, max_probability_change", [("int8", 0.02), ("palettize4", 0.15), ("int8_all", 0.02)])
def test_faithful_toy(mode, max_probability_change, onnx_builds, toy, toy_inputs):
    path, info = onnx_builds[mode]
    _check_faithful(path, info, toy)
    if mode == "int8_all":  # the mixing matrix was compressed too, and found among the ONNX constants
        assert len(info["mapped_constants"]) == 1 and list(info["mapped_constants"].values())[0].endswith("(exact)")
        mix = toy.mix.numpy()
        assert not any(np.array_equal(t, mix) for t in _onnx_tensors(path))
    else:
        assert info["mapped_constants"] == {} and info["coreml_info"]["compress_scope"] == "parameters"
    assert info["folded_batchnorms"] == 2 and set(info["mapped_parameters"]) >= {
        "conv1.weight", "conv2.weight", "fc1.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0_reverse"}
    # weights Core ML left alone (fc2: 2048 elements, biases) are exactly the torch values
    graph = onnx.load(str(path)).graph
    tensors = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_array_equal(tensors["fc1.bias"], toy.fc1.bias.detach().numpy())
    fc2 = toy.fc2.weight.detach().numpy()
    assert any(t.shape == fc2.T.shape and np.array_equal(t, fc2.T) for t in tensors.values())
    fp32_path, fp32_info = onnx_builds["fp32"]
    change = np.abs(np.exp(_run(path, info, toy_inputs)) - np.exp(_run(fp32_path, fp32_info, toy_inputs))).max()
    assert 0 < change < max_probability_change


# ---------------------------------------------------------------------------------------- real model


def test_segmentation_model_quant(segmentation_model, dev00_audio, tmp_path):
    """The real segmentation model: fp16 survives ONNX Runtime's level-"all" crash, and faithful
    int8 / palettize4 carry the Core ML weights bit for bit, LSTM and SincNet filters included."""
    inputs, outputs = [TensorSpec("waveforms", (1, 1, 160000))], [TensorSpec("logprobs", (1, 589, 7))]
    example = (torch.zeros(1, 1, 160000),)
    chunks = np.stack([dev00_audio[i * 160000:(i + 1) * 160000] for i in range(3)])[:, None]
    with torch.inference_mode():
        reference = segmentation_model(torch.from_numpy(chunks)).numpy()

    def run(path, info):
        return OnnxRuntimeModel(path, optimization_level=info["ort_level"])(waveforms=chunks)["logprobs"]

    path, info = build_onnx(segmentation_model, example, inputs, outputs, tmp_path / "fp16.onnx", "fp16")
    levels = list(info["ort_probe"])
    assert levels[-1] == info["ort_level"] and info["ort_probe"][info["ort_level"]] == "ok"
    assert all(outcome != "ok" for level, outcome in info["ort_probe"].items() if level != info["ort_level"])
    assert info["folded_constants"]  # SincNet's filters computed once in fp32, stored in fp16
    fp16 = run(path, info)
    assert (fp16.argmax(-1) == reference.argmax(-1)).mean() > 0.99
    np.testing.assert_allclose(np.exp(fp16), np.exp(reference), atol=0.05, rtol=0)

    for mode, scope in (("int8", "all"), ("palettize4", "parameters")):
        path, info = build_onnx(segmentation_model, example, inputs, outputs, tmp_path / f"{mode}.onnx", mode,
                                      coreml_compress_scope=scope)
        weights = _check_faithful(path, info, segmentation_model, min_fraction=0.98)
        assert sum("lstm" in p for p in info["mapped_parameters"]) == 16  # 4 layers x 2 directions x (ih, hh)
        # SincNet's filters are computed from parameters: Core ML folds them into a const, which
        # only compress_scope="all" compresses; the ONNX graph computes them, so they are found there
        sinc_compressed = [w for w in weights.values() if w.shape == (80, 1, 251)]
        if scope == "all":
            assert len(sinc_compressed) == 1 and len(info["mapped_constants"]) == 1
            assert list(info["mapped_constants"].values())[0].startswith("computed /sincnet/")
        else:
            assert not sinc_compressed and not info["mapped_constants"]
            assert list(info["coreml_info"]["uncompressed_weights"].values()) == [[80, 1, 251]]
        probabilities = np.exp(run(path, info))
        change = np.abs(probabilities - np.exp(reference)).max()
        agreement = (probabilities.argmax(-1) == reference.argmax(-1)).mean()
        assert 0 < change < 0.5 and agreement > 0.9, (mode, change, agreement)


def test_w8a8_is_refused_before_any_work_off_macos(monkeypatch, tmp_path):
    """Off macOS, quant=w8a8 (calibration needs Core ML predictions) raises the project's refusal
    before a module is loaded, and ``diarize`` exits 3 with one line."""
    import diaropt.variants.build as build
    from diaropt.__main__ import main
    from diaropt.backends.base import BackendUnavailable, is_macos
    from diaropt.config import compose

    if is_macos():
        pytest.skip("w8a8 builds on macOS")

    def no_modules(cfg):
        raise AssertionError("modules were loaded before the refusal")

    monkeypatch.setattr(build, "_torch_modules", no_modules)
    for backend in ("coreml",):  # onnxruntime: its own w8a8 (tests/test_quant_w8a8_ort.py)
        with pytest.raises(BackendUnavailable, match="w8a8.*macOS"):
            build.build_models(compose([f"backend={backend}", "quant=w8a8", f"paths.cache_dir={tmp_path}"]))
    audio = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(audio, np.zeros(16000, np.float32), 16000)
    assert main(["diarize", str(audio), "--out", str(tmp_path / "rttm"), "backend=coreml", "quant=w8a8",
                 f"paths.cache_dir={tmp_path}"]) == 3


def test_int4_block_size_reaches_the_builder_and_the_cache_key(monkeypatch, tmp_path):
    import diaropt.variants.build as build
    from diaropt.config import compose

    seen = []

    def fake_cached_build(cache_root, payload, filename, make):
        seen.append(payload)
        raise RuntimeError("stop")

    monkeypatch.setattr(build, "cached_build", fake_cached_build)
    for size in (16, 64):
        with pytest.raises(RuntimeError, match="stop"):
            build.build_models(compose(["backend=coreml", "quant=int4", f"quant.int4_block_size={size}",
                                        f"paths.cache_dir={tmp_path}"]))
    assert [p["int4_block_size"] for p in seen] == [16, 64]
    assert build.content_key(seen[0]) != build.content_key(seen[1])


def test_onnx_builds_carry_the_build_revision_in_the_cache_key(monkeypatch, tmp_path):
    """ONNX fp16 graphs changed converter (onnxruntime's float16): old cache entries must not be reused."""
    import diaropt.variants.build as build
    from diaropt.config import compose

    seen = []

    def fake_cached_build(cache_root, payload, filename, make):
        seen.append(payload)
        raise RuntimeError("stop")

    monkeypatch.setattr(build, "cached_build", fake_cached_build)
    with pytest.raises(RuntimeError, match="stop"):
        build.build_models(compose(["backend=onnxruntime", "quant=fp16", f"paths.cache_dir={tmp_path}"]))
    assert seen[0]["onnx_build_revision"] == build.ONNX_BUILD_REVISION >= 2
