"""The ``quant`` sweep axis, realized on Core ML and on ONNX Runtime: the one place that knows it.

Core ML (``build_coreml``, modes in ``COREML_QUANT``): compute precision (``fp32``, ``fp16``,
``fp16_selective``) set at conversion; weight compression (``int8``, ``int4``, ``palettize4/6/8``)
applied to the converted program with ``coremltools.optimize.coreml``; ``w8a8`` also quantizes
activations, which needs Core ML predictions for calibration (``linear_quantize_activations`` runs
the model): it is refused before any work off macOS (``variants.build.refuse_unbuildable``).
``int4`` needs the iOS18 / macOS15 opset, where coremltools converts the segmentation LSTMs in fp16
too (under macOS13 the LSTM op is fp32 only, with casts around it). The fbank (waveform to log-mel)
stays fp32 in every fp16 and compressed build (``backends.coreml.fbank_in_fp32``).

ONNX Runtime (``build_onnx``, modes in ``ONNX_QUANT``): ``native`` variants (``fp32``, ``fp16``,
``fp16_selective``, ``int8_dynamic``) transform the exported graph; ``faithful_coreml`` variants carry
in the ONNX graph exactly the weights of the compressed Core ML package (dequantized, read back from
the saved ``.mlpackage``), so a Core ML weight compression's accuracy cost is measured on any OS.

Faithful mapping: conv -> BatchNorm pairs are folded in a copy of the module first (so Core ML has
no further fusion to do and its weight consts equal torch parameters), that copy is converted and
every weight const is matched to a parameter by exact value (identity, transpose, or the LSTM gate
reorder i,f,g,o -> i,f,o,g). After compression the dequantized tensors are loaded into the copy and
exported. Consts that are not parameters (fbank DFT matrices, constant averaging matrices, weights
computed from parameters such as SincNet's filters) are matched to the ONNX graph's constants or
input-independent computed tensors and substituted there. Whatever cannot be mapped is reported in
``info["unmapped_weights"]``; every mapped weight is then verified bit for bit in the ONNX file.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The axis


@dataclass(frozen=True)
class CoreMLQuant:
    """How a quant mode is realized as a Core ML package.

    ``kind``: "precision" (conversion only), "linear" (linear weight quantization), "palettize"
    (k-means LUT), "activation" (weights and activations, calibrated by predictions).
    """

    kind: str
    description: str
    compute_precision: str = "fp16"  # fp32 | fp16 | fp16_selective
    nbits: int | None = None
    granularity: str | None = None
    minimum_deployment_target: str = "macOS13"
    needs_macos: str | None = None  # why building needs macOS (checked before any work)


@dataclass(frozen=True)
class OnnxQuant:
    """How a quant mode is realized as an ONNX graph: ``native`` or ``faithful_coreml``."""

    kind: str
    description: str


W8A8_NEEDS_MACOS = ("w8a8 calibrates activation ranges by running Core ML predictions "
                    "(coremltools.optimize.coreml.linear_quantize_activations), which need macOS")

COREML_QUANT: dict[str, CoreMLQuant] = {
    "fp32": CoreMLQuant("precision", "fp32 weights and compute", compute_precision="fp32"),
    "fp16": CoreMLQuant("precision", "fp16 weights and compute (compute_precision=FLOAT16)"),
    "fp16_selective": CoreMLQuant(
        "precision", "fp16, except pooling, reductions, normalization, softmax/log and L2 norm in fp32",
        compute_precision="fp16_selective"),
    "int8": CoreMLQuant("linear", "int8 weights, per-channel symmetric (constexpr_affine_dequantize)",
                        nbits=8, granularity="per_channel"),
    "int4": CoreMLQuant("linear", "int4 weights, per-block symmetric (constexpr_blockwise_shift_scale)",
                        nbits=4, granularity="per_block", minimum_deployment_target="macOS15"),
    **{f"palettize{n}": CoreMLQuant("palettize", f"{n}-bit k-means LUT weights (constexpr_lut_to_dense)", nbits=n)
       for n in (4, 6, 8)},
    "w8a8": CoreMLQuant("activation", "int8 weights and int8 activations (calibrated)", nbits=8,
                        granularity="per_channel", needs_macos=W8A8_NEEDS_MACOS),
}

ONNX_QUANT: dict[str, OnnxQuant] = {
    "fp32": OnnxQuant("native", "the exported fp32 graph"),
    "fp16": OnnxQuant("native", "fp16 initializers and compute, fp32 inputs/outputs"),
    "fp16_selective": OnnxQuant("native", "fp16, except pooling, reductions, normalization, softmax/log in fp32"),
    "int8_dynamic": OnnxQuant("native", "onnxruntime quantize_dynamic: int8 weights, activations quantized at run time"),
    **{mode: OnnxQuant("faithful_coreml", f"the dequantized weights of the Core ML {mode} package, fp32 compute")
       for mode in ("int8", "int4", "palettize4", "palettize6", "palettize8")},
}

QUANT_MODES: tuple[str, ...] = tuple(sorted(set(COREML_QUANT) | set(ONNX_QUANT)))

# Core ML op types kept in fp32 by ``fp16_selective`` (plus every ``reduce_*``).
COREML_FP32_OPS = frozenset({
    "max_pool", "avg_pool", "l2_pool",
    "batch_norm", "instance_norm", "layer_norm", "l2_norm", "local_response_norm",
    "softmax", "log", "reduce_log_sum_exp",
})
# The same selection in ONNX op types (plus every ``Reduce*``).
ONNX_FP32_OPS = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LpNormalization",
    "Softmax", "LogSoftmax", "Log",
})


def check_mode(mode: str) -> None:
    """ValueError naming the valid modes unless ``mode`` is a value of the quant axis."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {mode!r}; valid modes: {', '.join(QUANT_MODES)}")


def coreml_quant(mode: str) -> CoreMLQuant:
    check_mode(mode)
    if mode not in COREML_QUANT:
        raise BackendUnavailable(f"quant={mode} has no Core ML realization (it is ONNX Runtime's dynamic "
                                 f"quantization); Core ML modes: {', '.join(sorted(COREML_QUANT))}")
    return COREML_QUANT[mode]


def onnx_quant(mode: str) -> OnnxQuant:
    check_mode(mode)
    if mode not in ONNX_QUANT:
        raise BackendUnavailable(f"quant={mode} has no ONNX Runtime realization: {W8A8_NEEDS_MACOS}, and ONNX "
                                 f"Runtime's static quantization would not be the same model; ONNX modes: "
                                 f"{', '.join(sorted(ONNX_QUANT))}")
    return ONNX_QUANT[mode]


# ----------------------------------------------------------------------------------------------
# BatchNorm folding


def fold_batchnorm(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``module`` with every conv -> BatchNorm pair folded into the conv; [(conv, bn)] names.

    Pairs are found in the traced graph: a ``ConvNd`` (not transposed) whose output feeds only an
    eval-mode ``BatchNorm`` with running statistics, each module called once. The BatchNorm becomes
    ``nn.Identity``; the conv gets ``W * s`` and bias ``(b - mean) * s + beta``, ``s = gamma /
    sqrt(var + eps)`` (computed in float64).
    """
    folded = copy.deepcopy(module).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.jit.trace(folded, example_inputs, check_trace=False).inlined_graph
    paths: dict[int, str] = {next(iter(graph.inputs())).unique(): ""}
    conv_output: dict[int, str] = {}
    calls: collections.Counter[str] = collections.Counter()
    candidates: list[tuple[str, str]] = []
    for node in graph.nodes():
        kind, args = node.kind(), list(node.inputs())
        if kind == "prim::GetAttr":
            parent = paths.get(args[0].unique())
            if parent is not None:
                paths[node.output().unique()] = f"{parent}.{node.s('name')}".lstrip(".")
        elif kind in ("aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d"):
            weight = paths.get(args[1].unique(), "")
            if weight.endswith(".weight") and not (kind == "aten::_convolution" and args[6].toIValue()):
                conv_output[node.output().unique()] = weight[: -len(".weight")]
                calls[weight[: -len(".weight")]] += 1
        elif kind == "aten::batch_norm":
            running_mean = paths.get(args[3].unique(), "")
            if running_mean.endswith(".running_mean"):
                bn = running_mean[: -len(".running_mean")]
                calls[bn] += 1
                conv = conv_output.get(args[0].unique())
                if conv is not None and len(args[0].uses()) == 1:
                    candidates.append((conv, bn))
    pairs = []
    for conv_name, bn_name in candidates:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        if (calls[conv_name] == 1 and calls[bn_name] == 1 and isinstance(conv, nn.modules.conv._ConvNd)
                and not conv.transposed and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and bn.running_var is not None and not bn.training):
            _fold_pair(conv, bn)
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent_name), attr, nn.Identity())
            pairs.append((conv_name, bn_name))
    return folded, pairs


def _fold_pair(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * scale.view(shape)).float())
        conv.bias = nn.Parameter(bias.float())


# ----------------------------------------------------------------------------------------------
# Reading compressed Core ML weights back


def _op_consumers(var) -> frozenset[tuple[str, str]]:
    """(consumer op name, input argument) pairs reading ``var``: a weight's identity that survives
    compression (the const is replaced, its consumers are not renamed)."""
    keys = set()
    for op in var.child_ops:
        for arg, value in op.inputs.items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            if any(v is var for v in values):
                keys.add((op.name, arg))
    return frozenset(keys)


def _all_ops(block) -> list:
    ops = []
    for op in block.operations:
        ops.append(op)
        for nested in op.blocks:
            ops.extend(_all_ops(nested))
    return ops


def _program_ops(program) -> list:
    return [op for function in program.functions.values() for op in _all_ops(function)]


def _unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unsigned ``nbits`` fields packed LSB first into bytes (the iOS16 LUT index layout) -> (count,)."""
    bits = np.unpackbits(packed.astype(np.uint8).reshape(-1), bitorder="little")[: count * nbits]
    return (bits.reshape(count, nbits).astype(np.uint16) << np.arange(nbits, dtype=np.uint16)).sum(axis=1)


def _expand_blocks(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each entry of ``values`` over its block so the result has ``shape`` (each dim divides)."""
    for axis, (size, blocks) in enumerate(zip(shape, values.shape)):
        if size % blocks:
            raise ValueError(f"block layout {values.shape} does not divide shape {shape}")
        values = np.repeat(values, size // blocks, axis=axis)
    return values


def _materialize(op, value_of) -> np.ndarray:
    """The dense value of one constexpr op (numpy, in the op's output dtype).

    ``value_of(var)`` gives an input's value (const, or an earlier constexpr's result).
    """
    kind = op.op_type
    if kind == "constexpr_affine_dequantize":  # iOS16: (q - zero_point) * scale along ``axis``
        data = value_of(op.quantized_data).astype(np.float32)
        scale, zero_point, axis = value_of(op.scale), value_of(op.zero_point), int(value_of(op.axis))
        shape = [1] * data.ndim
        if np.ndim(scale):
            shape[axis] = -1
        offset = np.reshape(zero_point.astype(np.float32), shape if np.ndim(zero_point) else [1] * data.ndim)
        return ((data - offset) * np.reshape(scale.astype(np.float32), shape)).astype(scale.dtype)
    if kind == "constexpr_blockwise_shift_scale":  # iOS18: scale * (data - offset), per block
        data = value_of(op.data)
        scale = value_of(op.scale)
        result = data.astype(np.float32)
        if op.offset is not None:
            result = result - _expand_blocks(value_of(op.offset).astype(np.float32), data.shape)
        return (result * _expand_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)
    if kind == "constexpr_lut_to_dense":
        lut, indices = value_of(op.lut), value_of(op.indices)
        if "shape" in op.inputs:  # iOS16: flat LUT, indices packed LSB first, explicit shape
            shape = tuple(int(d) for d in value_of(op.shape))
            nbits = int(np.log2(lut.size))
            return lut[_unpack_lsb_first(indices, nbits, int(np.prod(shape)))].reshape(shape)
        # iOS18: lut (*groups, 2**nbits, vector_size), indices with the output's shape
        if lut.shape[-1] != 1:
            raise NotImplementedError(f"{op.name}: vector palettization (vector size {lut.shape[-1]}) is not supported")
        tables = lut[..., 0]  # (*groups, 2**nbits)
        group_index = [np.arange(size) // (size // groups) for size, groups in zip(indices.shape, tables.shape[:-1])]
        grid = np.ix_(*group_index)
        return tables[(*grid, indices.astype(np.int64))]
    if kind == "constexpr_cast":
        return value_of(op.source_val).astype({"fp32": np.float32, "fp16": np.float16}[op.output_dtype.val])
    raise NotImplementedError(f"{op.name}: cannot materialize {kind}")


@dataclass
class CompressedWeight:
    """One weight as a Core ML package stores it compressed: its dense value and where it is read."""

    name: str
    value: np.ndarray  # float32, the dequantized weight
    dtype: str  # dtype Core ML materializes it in (float16 / float32)
    op_types: tuple[str, ...]  # the constexpr chain, outermost last
    consumers: frozenset[tuple[str, str]]


def read_compressed_weights(mlpackage_path: Path) -> dict[str, CompressedWeight]:
    """Every weight of a saved package that is stored compressed, dequantized (see
    ``read_dequantized_weights``), with the ops that read it."""
    from diaropt.backends.coreml import load_mil_program

    values: dict[int, np.ndarray] = {}
    chains: dict[int, tuple[str, ...]] = {}

    def value_of(var) -> np.ndarray:
        if id(var) in values:
            return values[id(var)]
        if var.val is None:
            raise ValueError(f"{var.name} is not constant")
        return np.asarray(var.val)

    weights: dict[str, CompressedWeight] = {}
    for op in _program_ops(load_mil_program(mlpackage_path)):
        if not op.op_type.startswith("constexpr_"):
            continue
        result = _materialize(op, value_of)
        out = op.outputs[0]
        values[id(out)] = result
        chains[id(out)] = sum((chains.get(id(v), ()) for v in op.inputs.values() if not isinstance(v, (list, tuple))),
                              ()) + (op.op_type,)
        if any(not child.op_type.startswith("constexpr_") for child in out.child_ops):
            weights[out.name] = CompressedWeight(out.name, result.astype(np.float32), str(result.dtype),
                                                 chains[id(out)], _op_consumers(out))
    return weights


def read_dequantized_weights(mlpackage_path: Path) -> dict[str, np.ndarray]:
    """{name: float32 array} for every weight a saved ``.mlpackage`` stores compressed.

    Walks the package's MIL program and materializes each ``constexpr_*`` op read by a compute op
    (``constexpr_affine_dequantize``, ``constexpr_blockwise_shift_scale``, ``constexpr_lut_to_dense``
    iOS16 and iOS18 scalar, ``constexpr_cast``; chains are evaluated in order) in the dtype Core ML
    materializes it in, then widened exactly to float32. Names are the constexpr outputs' names.
    """
    return {name: weight.value for name, weight in read_compressed_weights(mlpackage_path).items()}


# ----------------------------------------------------------------------------------------------
# Core ML weight consts -> torch parameters

LSTM_GATES_TORCH_TO_COREML = (0, 1, 3, 2)  # torch i,f,g,o -> Core ML i,f,o,g (self-inverse)
LSTM_GATES_COREML_TO_ONNX = (0, 2, 1, 3)  # Core ML i,f,o,g -> ONNX i,o,f,c


def _gate_reorder(array: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    blocks = np.split(array, 4, axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


@dataclass(frozen=True)
class WeightSource:
    """A Core ML weight const is torch parameter ``parameter`` under ``transform``
    ("identity" incl. reshape, "transpose", or "lstm_gates")."""

    parameter: str
    transform: str


def _to_coreml_layout(parameter: np.ndarray, transform: str) -> np.ndarray:
    if transform == "transpose":
        return parameter.T
    if transform == "lstm_gates":
        return _gate_reorder(parameter, LSTM_GATES_TORCH_TO_COREML)
    return parameter


def _to_parameter_layout(value: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    if transform == "transpose":
        return np.ascontiguousarray(value.T)
    if transform == "lstm_gates":
        return _gate_reorder(value, LSTM_GATES_TORCH_TO_COREML)
    return value.reshape(shape)


def _match_parameters(consts: dict[str, np.ndarray], module: nn.Module) -> tuple[dict[str, WeightSource], dict[str, str]]:
    """Match Core ML consts to ``module``'s parameters by exact value (after casting the parameter to
    the const's dtype). Returns ({const: source}, {const: why unmatched})."""
    lstm_weights = {f"{name}.{p}" if name else p for name, sub in module.named_modules() if isinstance(sub, nn.LSTM)
                    for p, _ in sub.named_parameters(recurse=False) if p.startswith("weight_")}
    by_size: dict[int, list[tuple[str, np.ndarray]]] = collections.defaultdict(list)
    for name, parameter in module.named_parameters():
        by_size[parameter.numel()].append((name, parameter.detach().cpu().numpy()))
    sources, unmatched = {}, {}
    for const_name, value in consts.items():
        found = []
        for name, parameter in by_size.get(value.size, []):
            cast = parameter.astype(value.dtype)
            transforms = ["identity"] + (["transpose"] if parameter.ndim == 2 else [])
            transforms += ["lstm_gates"] if name in lstm_weights and parameter.shape[0] % 4 == 0 else []
            for transform in transforms:
                candidate = _to_coreml_layout(cast, transform)
                if (candidate.shape == value.shape or transform == "identity") and np.array_equal(
                        candidate.reshape(value.shape), value):
                    found.append(WeightSource(name, transform))
                    break
        if len(found) == 1:
            sources[const_name] = found[0]
        else:
            unmatched[const_name] = ("no parameter has these values" if not found else
                                     f"ambiguous: equals {[f.parameter for f in found]}")
    return sources, unmatched


# ----------------------------------------------------------------------------------------------
# Core ML build


@dataclass
class _CoreMLBuild:
    """What a compressed Core ML build knows beyond its info: for the faithful ONNX run."""

    module: nn.Module  # the (folded) module converted
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # compressible consts before compression
    consumers: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    sources: dict[str, WeightSource] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)


_COREML_OPTIONS = {"block_size": 32, "weight_threshold": 2048, "compute_precision": None,
                   "minimum_deployment_target": None, "compress_scope": "parameters", "keep_fp32_ops": COREML_FP32_OPS,
                   "num_kmeans_workers": 1, "fold_batchnorm": True, "calibration_data": None}


def _options(given: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"{where}: unknown options {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **given}


def _keeps_fp32(op_type: str, keep: Iterable[str]) -> bool:
    return op_type in keep or op_type.startswith("reduce_")


def _compute_precision(name: str, keep_fp32_ops: Iterable[str]):
    import coremltools as ct

    if name == "fp32":
        return ct.precision.FLOAT32
    if name == "fp16":
        return ct.precision.FLOAT16
    if name == "fp16_selective":
        keep = frozenset(keep_fp32_ops)
        return ct.transform.FP16ComputePrecision(op_selector=lambda op: not _keeps_fp32(op.op_type, keep))
    raise ValueError(f"unknown compute_precision {name!r}; expected fp32, fp16 or fp16_selective")


def _target_at_least(requested: str | None, needed: str) -> str:
    import coremltools as ct

    if requested is None:
        return needed
    if getattr(ct.target, requested) < getattr(ct.target, needed):
        raise ValueError(f"minimum_deployment_target {requested} is below {needed}, which this mode needs")
    return requested


def _op_config(spec: CoreMLQuant, options: dict[str, Any]):
    import coremltools.optimize.coreml as cto

    threshold = options["weight_threshold"]
    if spec.kind in ("linear", "activation"):
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{spec.nbits}",
                                           granularity=spec.granularity, block_size=options["block_size"],
                                           weight_threshold=threshold)
    return cto.OpPalettizerConfig(nbits=spec.nbits, mode="kmeans", granularity="per_tensor",
                                  num_kmeans_workers=options["num_kmeans_workers"], weight_threshold=threshold)


def _compressible_consts(model, threshold: int) -> tuple[dict[str, np.ndarray], dict[str, frozenset]]:
    """Float consts of a converted (uncompressed) model that compression may touch (> threshold
    elements), by const op name: ({name: value}, {name: consumers})."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    spec = model.get_spec()
    program = load_milproto(model_spec=spec, specification_version=spec.specificationVersion,
                            file_weights_dir=model.weights_dir)
    consts, consumers = {}, {}
    for op in _program_ops(program):
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype in (np.float16, np.float32) and value.size > threshold:
            consts[op.name] = value  # the op name (what OptimizationConfig.op_name_configs matches), not the var's
            consumers[op.name] = _op_consumers(op.outputs[0])
    return consts, consumers


def build_coreml(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], path: Path, mode: str, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Convert ``module`` to a Core ML package at ``path`` realizing quant ``mode``; (path, info).

    Options: ``block_size`` (int4, 32), ``weight_threshold`` (consts with more elements are
    compressed, 2048), ``compute_precision`` (fp32 / fp16 / fp16_selective; default the mode's: fp16
    for compressed modes), ``minimum_deployment_target`` (default the mode's: macOS13, int4 macOS15),
    ``compress_scope`` ("all" consts, or only "parameters": not fbank/averaging constants),
    ``keep_fp32_ops`` (fp16_selective), ``num_kmeans_workers``, ``fold_batchnorm`` (True),
    ``calibration_data`` (w8a8, macOS: list of input dicts).

    info: mode, compute_precision, deployment_target, package_size_bytes, op_histogram (non-const),
    constexpr_ops, op_dtypes (fp16/fp32 compute ops), convert_s, compress_s, and for compressed modes
    compressed_weights/elements, uncompressed_weights, compressed_parameter_fraction, weight_sources.
    """
    path, info, _ = _build_coreml(module, example_inputs, inputs, outputs, Path(path), mode, **options)
    return path, info


def _build_coreml(module, example_inputs, inputs, outputs, path: Path, mode: str,
                  **given: Any) -> tuple[Path, dict[str, Any], _CoreMLBuild]:
    import coremltools.optimize.coreml as cto

    from diaropt.backends import coreml

    spec = coreml_quant(mode)
    if spec.needs_macos and not is_macos():
        raise BackendUnavailable(spec.needs_macos)
    options = _options(given, _COREML_OPTIONS, "build_coreml")
    if options["compress_scope"] not in ("all", "parameters"):
        raise ValueError(f"compress_scope must be 'all' or 'parameters', not {options['compress_scope']!r}")
    if spec.kind == "activation" and not options["calibration_data"]:
        raise ValueError("w8a8 needs calibration_data: a list of {input name: array} from real inputs")
    precision = options["compute_precision"] or spec.compute_precision
    target = _target_at_least(options["minimum_deployment_target"], spec.minimum_deployment_target)
    compresses = spec.kind != "precision"
    info: dict[str, Any] = {"quant": mode, "coreml_quant": spec.description, "compute_precision": precision}

    start = time.perf_counter()
    build = _CoreMLBuild(module)
    if compresses and options["fold_batchnorm"]:
        build.module, pairs = fold_batchnorm(module, example_inputs)
        info.update(folded_batchnorms=len(pairs), fold_s=time.perf_counter() - start)
    start = time.perf_counter()
    model = coreml.convert_coreml(build.module, example_inputs, inputs, outputs, path,
                                  minimum_deployment_target=target,
                                  compute_precision=_compute_precision(precision, options["keep_fp32_ops"]))
    info["convert_s"] = time.perf_counter() - start

    if compresses:
        start = time.perf_counter()
        build.consts, build.consumers = _compressible_consts(model, options["weight_threshold"])
        build.sources, build.unmatched = _match_parameters(build.consts, build.module)
        info["match_s"] = time.perf_counter() - start
        skip = {name: None for name in build.unmatched} if options["compress_scope"] == "parameters" else None
        config = cto.OptimizationConfig(global_config=_op_config(spec, options), op_name_configs=skip)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.kind == "activation":
                import coremltools as ct

                model = ct.models.MLModel(str(path))  # calibration runs predictions: loaded (macOS)
                activation_config = cto.OptimizationConfig(
                    global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
                model = cto.linear_quantize_activations(model, activation_config, options["calibration_data"])
            compress = cto.palettize_weights if spec.kind == "palettize" else cto.linear_quantize_weights
            model = compress(model, config)
        info["compress_s"] = time.perf_counter() - start
        coreml.save_mlpackage(model, path)
        info.update(_compression_summary(path, build, options["compress_scope"]))

    histogram = coreml.op_histogram(path)
    dtypes: collections.Counter[str] = collections.Counter()
    for op_type, counts in coreml.op_dtype_histogram(path).items():
        if not op_type.startswith("constexpr_"):
            dtypes.update(counts)
    info.update(deployment_target=coreml.deployment_target(path), minimum_deployment_target=target,
                package_size_bytes=coreml.package_size_bytes(path),
                op_histogram={k: v for k, v in histogram.items() if not k.startswith("constexpr_")},
                constexpr_ops={k: v for k, v in histogram.items() if k.startswith("constexpr_")},
                op_dtypes=dict(sorted(dtypes.items())))
    return path, info, build


def _compression_summary(path: Path, build: _CoreMLBuild, scope: str) -> dict[str, Any]:
    """Which compressible consts the saved package stores compressed, and how much of the module's
    parameters that covers."""
    compressed = read_compressed_weights(path)
    by_consumer = {key: name for name, keys in build.consumers.items() for key in keys}
    compressed_consts = {_source_const(w, by_consumer) for w in compressed.values()}
    uncompressed = sorted(set(build.consts) - compressed_consts)
    parameters = dict(build.module.named_parameters())
    covered = {build.sources[c].parameter for c in compressed_consts if c in build.sources}
    total = sum(p.numel() for p in parameters.values())
    return {
        "compress_scope": scope,
        "compressed_weights": len(compressed),
        "compressed_elements": int(sum(w.value.size for w in compressed.values())),
        "uncompressed_weights": {name: list(build.consts[name].shape) for name in uncompressed},
        "compressed_parameter_fraction": sum(parameters[p].numel() for p in covered) / max(total, 1),
        "weight_sources": {c: f"{s.parameter} ({s.transform})" for c, s in sorted(build.sources.items())},
        "non_parameter_consts": {c: reason for c, reason in sorted(build.unmatched.items())},
    }


def _source_const(weight: CompressedWeight, by_consumer: dict[tuple[str, str], str]) -> str | None:
    names = {by_consumer.get(key) for key in weight.consumers}
    if len(names) != 1 or None in names:
        return None
    return names.pop()


# ----------------------------------------------------------------------------------------------
# ONNX fp16


def _schema_positions(node, opset: dict[str, int]):
    """(input type strings, output type strings, {type var: allowed types}) from the op schema."""
    schema = onnx.defs.get_schema(node.op_type, opset.get(node.domain, 1), node.domain)
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def type_strs(formals, count):
        if not formals:
            return [None] * count
        return [formals[min(i, len(formals) - 1)].type_str for i in range(count)]

    return type_strs(schema.inputs, len(node.input)), type_strs(schema.outputs, len(node.output)), constraints


def _to_fp16(array: np.ndarray, stats: collections.Counter) -> np.ndarray:
    finite = np.isfinite(array)
    over = finite & (np.abs(array) > 65504)
    stats["clipped_values"] += int(over.sum())
    converted = np.where(over, np.sign(array) * 65504, array).astype(np.float16)
    stats["flushed_to_zero"] += int(((converted == 0) & (array != 0)).sum())
    return converted


def convert_onnx_fp16(src: Path, dst: Path, keep_fp32_ops: Iterable[str] = ()) -> dict[str, Any]:
    """Write ``src`` with fp16 weights and compute to ``dst``; graph inputs and outputs stay fp32.

    Every node whose float inputs/outputs may be fp16 (per its op schema) computes in fp16, except
    ``keep_fp32_ops`` (and any ``Reduce*`` when that set is non-empty) and nodes that cannot
    (fixed-float positions stay fp32, e.g. Resize scales). Float initializers and Constant values
    read in fp16 are converted (finite values beyond +-65504 clipped); Cast-to-float,
    Constant and ConstantOfShape are retyped; Cast nodes bridge fp16/fp32 at graph inputs, outputs
    and kept-fp32 nodes. value_info is dropped and re-inferred; the result passes the checker.
    Returns counts: fp16/fp32 nodes, inserted casts, clipped / flushed-to-zero values.
    """
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    keep = frozenset(keep_fp32_ops)
    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{src}: node {node.name or node.op_type} has subgraphs; fp16 conversion does not handle them")
    opset = {imp.domain: imp.version for imp in model.opset_import}
    opset[""] = opset.get("", opset.get("ai.onnx", 1))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.input, *inferred.output]}
    dtype.update({init.name: init.data_type for init in graph.initializer})
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    stats: collections.Counter[str] = collections.Counter()

    # 1. Precision of every node, and what each float input position needs. Source-like nodes
    #    (Constant, ConstantOfShape, Cast to float) are decided in step 2, like initializers.
    needs: list[list[int | None]] = []  # per node, per input: FLOAT / HALF / None (no requirement)
    new_dtype: dict[str, int] = {name: FLOAT for name in graph_inputs if dtype.get(name) == FLOAT}
    sources: dict[str, Any] = {}  # output name -> source-like node
    for node in graph.node:
        float_in = [dtype.get(name) == FLOAT for name in node.input]
        float_out = [dtype.get(name) == FLOAT for name in node.output]
        if node.op_type in ("Constant", "ConstantOfShape", "Cast"):
            needs.append([None] * len(node.input))
            sources.update({name: node for name, f in zip(node.output, float_out) if f})
            continue
        in_types, out_types, constraints = _schema_positions(node, opset)
        typed_positions = [t for t, f in zip(in_types + out_types, float_in + float_out) if f and t in constraints]
        fp16 = (node.op_type not in keep and not (keep and node.op_type.startswith("Reduce"))
                and all("tensor(float16)" in constraints[t] for t in typed_positions)
                and all(t in constraints and t in in_types for t, f in zip(out_types, float_out) if f))
        if any(float_in) or any(float_out):
            stats["fp16_nodes" if fp16 else "fp32_nodes"] += 1
        needs.append([(HALF if fp16 and t in constraints else FLOAT) if f else None for t, f in zip(in_types, float_in)])
        for name, is_float in zip(node.output, float_out):
            if is_float:
                new_dtype[name] = HALF if fp16 else FLOAT

    # 2. Constant sources become fp16 when every reader computes in fp16 (graph outputs read fp32).
    wanted: dict[str, set[int]] = collections.defaultdict(set)
    for node, node_needs in zip(graph.node, needs):
        for name, need in zip(node.input, node_needs):
            wanted[name].add(need if need is not None else -1)
    for output in graph.output:
        wanted[output.name].add(FLOAT)
    for name, node in sources.items():
        new_dtype[name] = HALF if wanted.get(name) == {HALF} else FLOAT
        if new_dtype[name] == HALF:
            _retype_to_fp16(node, stats)
    for name, init in initializers.items():
        if init.data_type == FLOAT and wanted.get(name) == {HALF}:
            init.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(init), stats), name))
            new_dtype[name] = HALF
        elif init.data_type == FLOAT:
            new_dtype[name] = FLOAT

    # 3. Casts where a reader needs another precision than the tensor has.
    casts: dict[tuple[str, int], str] = {}
    nodes = []
    for node, node_needs in zip(graph.node, needs):
        for index, (name, need) in enumerate(zip(node.input, node_needs)):
            if need is None or new_dtype.get(name, need) == need:
                continue
            key = (name, need)
            if key not in casts:
                casts[key] = f"{name}__to_{'fp16' if need == HALF else 'fp32'}"
                nodes.append(onnx.helper.make_node("Cast", [name], [casts[key]], to=need, name=casts[key]))
                stats["inserted_casts"] += 1
            node.input[index] = casts[key]
        nodes.append(node)

    # 4. Graph outputs stay fp32.
    for output in graph.output:
        if new_dtype.get(output.name) == HALF:
            internal = f"{output.name}__fp16"
            for node in nodes:
                node.input[:] = [internal if n == output.name else n for n in node.input]
                node.output[:] = [internal if n == output.name else n for n in node.output]
            nodes.append(onnx.helper.make_node("Cast", [internal], [output.name], to=FLOAT, name=f"{output.name}__to_fp32"))
            stats["inserted_casts"] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dict(stats)


def _retype_to_fp16(node, stats: collections.Counter) -> None:
    """Nodes whose output type comes from an attribute: make that attribute say fp16."""
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attribute.name == "value" \
                and attribute.t.data_type == TensorProto.FLOAT:
            attribute.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(attribute.t), stats),
                                                         attribute.t.name))
        elif node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
            raise ValueError(f"Constant {node.name}: {attribute.name} attributes are not handled by the fp16 conversion")


# ----------------------------------------------------------------------------------------------
# ONNX build


_ONNX_OPTIONS = {"optimization_level": "all", "probe": True, "probe_timeout_s": 600.0, "keep_fp32_ops": ONNX_FP32_OPS,
                 "dynamic_op_types": ("Conv", "MatMul", "Gemm", "LSTM"), "dynamic_per_channel": False,
                 "keep_work": True,
                 **{f"coreml_{k}": v for k, v in _COREML_OPTIONS.items()}}


def build_onnx(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
               outputs: list[TensorSpec], path: Path, mode: str, work_dir: Path | None = None,
               **options: Any) -> tuple[Path, dict[str, Any]]:
    """Export ``module`` to an ONNX graph at ``path`` realizing quant ``mode``; (path, info).

    Native modes transform the exported fp32 graph (``fp16``/``fp16_selective``: ``convert_onnx_fp16``;
    ``int8_dynamic``: ``quantize_dynamic`` with int8 weights on ``dynamic_op_types``). Faithful modes
    build the Core ML package of ``mode`` under ``work_dir`` (options ``coreml_<option>`` go to
    ``build_coreml``) and carry its dequantized weights. The batch axis is dynamic.

    Unless ``probe=False``, a CPU session is built and run once in a child process at
    ``optimization_level`` and lower levels until one works (ONNX Runtime crashes on some fp16
    conv+LSTM graphs at the highest level); ``info["ort_level"]`` is the level to use and
    ``info["ort_probe"]`` the outcome per level tried.
    """
    from diaropt.backends import onnxruntime as ort_backend

    spec = onnx_quant(mode)
    options = _options(options, _ONNX_OPTIONS, "build_onnx")
    path = Path(path)
    work_dir = Path(work_dir) if work_dir is not None else path.parent
    work = work_dir / f"{path.stem}_{mode}_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info: dict[str, Any] = {"quant": mode, "onnx_quant_kind": spec.kind, "onnx_quant": spec.description}
    start = time.perf_counter()
    if spec.kind == "faithful_coreml":
        info.update(_build_faithful(module, example_inputs, inputs, outputs, path, mode, work, options))
    elif mode == "fp32":
        ort_backend.export_onnx(module, example_inputs, inputs, outputs, path)
    else:
        fp32 = ort_backend.export_onnx(module, example_inputs, inputs, outputs, work / "fp32.onnx")
        if mode in ("fp16", "fp16_selective"):
            feeds = {s.name: np.zeros(tuple(t.shape), s.dtype) for s, t in zip(inputs, example_inputs)}
            info["folded_constants"] = fold_computed_constants(fp32, feeds)  # in fp32, as Core ML does
            keep = options["keep_fp32_ops"] if mode == "fp16_selective" else ()
            info["fp16_conversion"] = convert_onnx_fp16(fp32, path, keep)
        elif mode == "int8_dynamic":
            info.update(_quantize_dynamic(fp32, path, options["dynamic_op_types"], options["dynamic_per_channel"]))
        fp32.unlink()
    info["build_onnx_s"] = time.perf_counter() - start
    info["onnx_size_bytes"] = path.stat().st_size
    if not options["keep_work"] or not any(work.iterdir()):
        shutil.rmtree(work, ignore_errors=True)
    if options["probe"]:
        feeds = {s.name: (tuple(t.shape), s.dtype) for s, t in zip(inputs, example_inputs)}
        level, outcomes = ort_backend.usable_optimization_level(path, feeds, options["optimization_level"],
                                                                options["probe_timeout_s"])
        info.update(ort_level=level, ort_probe=outcomes)
    return path, info


def _quantize_dynamic(src: Path, dst: Path, op_types: Iterable[str], per_channel: bool) -> dict[str, Any]:
    """int8 weights (initializers of ``op_types``) with ``quantize_dynamic``; fails if nothing was quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=list(op_types))
    counts = collections.Counter(node.op_type for node in onnx.load(str(dst), load_external_data=False).graph.node)
    quantized = {k: v for k, v in sorted(counts.items())
                 if k in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul")}
    if not quantized:
        raise RuntimeError(f"quantize_dynamic quantized nothing in {src.name} (op types {list(op_types)}): "
                           "int8_dynamic would be the fp32 graph")
    return {"dynamic_op_types": list(op_types), "dynamic_per_channel": per_channel, "quantized_ops": quantized}


def _build_faithful(module, example_inputs, inputs, outputs, path: Path, mode: str, work: Path,
                    options: dict[str, Any]) -> dict[str, Any]:
    from diaropt.backends import onnxruntime as ort_backend

    coreml_options = {k[len("coreml_"):]: v for k, v in options.items() if k.startswith("coreml_")}
    package, coreml_info, build = _build_coreml(module, example_inputs, inputs, outputs,
                                                work / f"{mode}.mlpackage", mode, **coreml_options)
    compressed = read_compressed_weights(package)
    by_consumer = {key: name for name, keys in build.consumers.items() for key in keys}
    parameters = dict(build.module.named_parameters())
    loaded: dict[str, tuple[str, np.ndarray]] = {}  # parameter -> (weight, value)
    remaining: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weight -> (const before compression, dequantized)
    unmapped: dict[str, dict[str, Any]] = {}
    for name, weight in compressed.items():
        const = _source_const(weight, by_consumer)
        if const is None:
            unmapped[name] = {"shape": list(weight.value.shape), "reason": "no uncompressed const reads the same way"}
        elif const in build.sources:
            source = build.sources[const]
            value = _to_parameter_layout(weight.value, source.transform, tuple(parameters[source.parameter].shape))
            if source.parameter in loaded and not np.array_equal(loaded[source.parameter][1], value):
                unmapped[name] = {"shape": list(weight.value.shape),
                                  "reason": f"{source.parameter} is also {loaded[source.parameter][0]}, compressed differently"}
                continue
            loaded[source.parameter] = (name, value)
        else:
            remaining[name] = (build.consts[const], weight.value)
    with torch.no_grad():
        for parameter, (_, value) in loaded.items():
            parameters[parameter].copy_(torch.from_numpy(value))
    ort_backend.export_onnx(build.module, example_inputs, inputs, outputs, path)
    feeds = {s.name: np.zeros(tuple(t.shape), s.dtype) for s, t in zip(inputs, example_inputs)}
    substituted, not_found = _substitute_onnx_constants(path, remaining, feeds)
    for name, reason in not_found.items():
        unmapped[name] = {"shape": list(compressed[name].value.shape), "reason": reason}
    mapped = {name: w.value for name, w in compressed.items() if name not in unmapped}
    check = verify_faithful_weights(path, mapped)
    if check["missing"]:
        raise RuntimeError(f"{path}: faithful {mode} graph lacks the Core ML weights {check['missing']} bit for bit")
    total = sum(p.numel() for p in parameters.values())
    coverage = sum(parameters[p].numel() for p in loaded) / max(total, 1)
    return {
        "coreml_package": os.path.relpath(package, path.parent),  # relative: cache entries get renamed
        "coreml_package_size_bytes": coreml_info["package_size_bytes"],
        "coreml_info": coreml_info,
        "faithful_scope": "weights only: the graph computes in fp32 (Core ML computes in "
                          f"{coreml_info['compute_precision']})",
        "mapped_parameters": {p: w for p, (w, _) in sorted(loaded.items())},
        "mapped_constants": substituted,
        "unmapped_weights": unmapped,
        "unmapped_elements": int(sum(compressed[n].value.size for n in unmapped)),
        "compressed_weights": len(compressed),
        "compressed_elements": int(sum(w.value.size for w in compressed.values())),
        "faithful_verified_weights": len(check["verified"]),
        "compressed_parameter_fraction": coverage,
        "folded_batchnorms": coreml_info.get("folded_batchnorms", 0),
    }


def _computed_constants(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float tensors computed from initializers/Constants only (not from the graph inputs) that an
    input-dependent node reads, e.g. SincNet's filters: {name: value}, evaluated once with ONNX Runtime."""
    import onnxruntime as ort

    graph = model.graph
    dependent = {i.name for i in graph.input}
    read: set[str] = set()
    for node in graph.node:
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
            read.update(name for name in node.input if name and name not in dependent)
    constant_outputs = {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    read -= {i.name for i in graph.initializer} | constant_outputs
    if not read:
        return {}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    names = sorted(name for name in read if types.get(name) == TensorProto.FLOAT)
    if not names:
        return {}
    probe = copy.deepcopy(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


def fold_computed_constants(path: Path, feeds: dict[str, np.ndarray]) -> list[str]:
    """Replace, in the ONNX file, every input-independent computed float tensor (see
    ``_computed_constants``) by an initializer holding its fp32 value, as Core ML's conversion does;
    the subgraphs computing them are pruned. Returns the folded tensor names."""
    model = onnx.load(str(path))
    values = _computed_constants(model, feeds)
    if values:
        _rewire_to_initializers(model.graph, {name: (f"folded::{name}", value) for name, value in values.items()})
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return sorted(values)


def _rewire_to_initializers(graph, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Readers of each ``name`` read a new initializer ``(new name, value)`` instead; dead nodes pruned."""
    for name, (new_name, value) in tensors.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new_name))
    for node in graph.node:
        node.input[:] = [tensors[n][0] if n in tensors else n for n in node.input]
    _prune(graph)


@dataclass
class _OnnxConstant:
    kind: str  # initializer | constant | computed
    name: str  # tensor name
    value: np.ndarray


def _onnx_constants(model, feeds: dict[str, np.ndarray]) -> list[_OnnxConstant]:
    """Float tensors of ``model`` that do not depend on its inputs: initializers, Constant outputs, and
    computed tensors read by input-dependent nodes."""
    found = [_OnnxConstant("initializer", i.name, numpy_helper.to_array(i)) for i in model.graph.initializer
             if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.dtype in (np.float32, np.float16):
                found.append(_OnnxConstant("constant", node.output[0], value))
    found += [_OnnxConstant("computed", name, value) for name, value in _computed_constants(model, feeds).items()]
    return found


def _substitute_onnx_constants(path: Path, weights: dict[str, tuple[np.ndarray, np.ndarray]],
                               feeds: dict[str, np.ndarray]) -> tuple[dict[str, str], dict[str, str]]:
    """Replace, in the ONNX file, each constant tensor that is a Core ML weight (``{weight: (value
    before compression, dequantized value)}``) by the dequantized value. Exact matches first (all
    equal copies are replaced); else a unique approximate match (computed weights differ by
    floating-point evaluation order, or by the fp16 rounding of the Core ML const).
    Returns ({weight: "kind name[, ...] (match)"}, {weight: why not found})."""
    if not weights:
        return {}, {}
    model = onnx.load(str(path))
    candidates = _onnx_constants(model, feeds)
    substituted, not_found = {}, {}
    replacements: dict[str, tuple[_OnnxConstant, np.ndarray]] = {}
    for weight, (before, dequantized) in weights.items():
        exact, near = [], []
        scale = float(np.abs(before.astype(np.float32)).max()) or 1.0
        for candidate in candidates:
            errors = []
            for transform in ("identity", "transpose"):
                value = candidate.value.T if transform == "transpose" else candidate.value
                if value.size != before.size or (transform == "transpose" and value.shape != before.shape):
                    continue
                value = value.reshape(before.shape)
                if np.array_equal(value.astype(before.dtype), before):
                    exact.append((candidate, transform))
                    break
                errors.append((float(np.abs(value.astype(np.float32) - before.astype(np.float32)).max()) / scale,
                               candidate, transform))
            else:
                if errors:
                    near.append(min(errors, key=lambda item: item[0]))
        tolerance = 2e-3 if before.dtype == np.float16 else 1e-4
        near.sort(key=lambda item: item[0])
        if exact:
            chosen, how = exact, "exact"
        elif near and near[0][0] <= tolerance and (len(near) == 1 or near[1][0] > 10 * tolerance):
            chosen, how = [near[0][1:]], f"approximate, max relative deviation {near[0][0]:.1e}"
        else:
            not_found[weight] = "no parameter and no ONNX constant with these values" + (
                f" (closest deviates by {near[0][0]:.1e} relative)" if near else "")
            continue
        conflict = [c.name for c, _ in chosen if c.name in replacements]
        if conflict:
            not_found[weight] = f"ONNX tensors {conflict} are already another Core ML weight"
            continue
        for candidate, transform in chosen:
            value = dequantized.reshape(candidate.value.T.shape if transform == "transpose" else candidate.value.shape)
            replacements[candidate.name] = (candidate, np.ascontiguousarray(value.T if transform == "transpose" else value))
        substituted[weight] = ", ".join(f"{c.kind} {c.name}" for c, _ in chosen) + f" ({how})"
    _apply_replacements(model, replacements)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return substituted, not_found


def _apply_replacements(model, replacements: dict[str, tuple[_OnnxConstant, np.ndarray]]) -> None:
    graph = model.graph
    for init in graph.initializer:
        if init.name in replacements:
            _, value = replacements[init.name]
            init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), init.name))
    computed = {}
    for name, (candidate, value) in replacements.items():
        if candidate.kind == "constant":
            node = next(n for n in graph.node if n.op_type == "Constant" and n.output[0] == name)
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(candidate.value.dtype)))
        elif candidate.kind == "computed":
            computed[name] = (f"coreml_dequantized::{name}", value.astype(np.float32))
    if computed:
        _rewire_to_initializers(graph, computed)


def _prune(graph) -> None:
    """Drop nodes whose outputs nobody reads, then unread initializers."""
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def verify_faithful_weights(onnx_path: Path, weights: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Which Core ML weights (``{name: dequantized value in Core ML layout}``) an ONNX file holds bit
    for bit, as an initializer or Constant under reshape, transpose, or, for LSTM weights, as one
    direction of an LSTM W/R with the gates reordered to ONNX's i,o,f,c.
    Returns {"verified": [...], "missing": [...]}."""
    graph = onnx.load(str(onnx_path)).graph
    tensors = [numpy_helper.to_array(i) for i in graph.initializer]
    tensors += [numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and n.attribute[0].name == "value"]
    lstm_inputs = {name for node in graph.node if node.op_type == "LSTM" for name in node.input[1:3]}
    lstm = [numpy_helper.to_array(i) for i in graph.initializer if i.name in lstm_inputs]
    by_size: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    for tensor in tensors:
        if tensor.dtype == np.float32:
            by_size[tensor.size].append(tensor)
    lstm_slices: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    for tensor in lstm:
        for direction in tensor:
            lstm_slices[direction.size].append(direction)
    report: dict[str, list[str]] = {"verified": [], "missing": []}
    for name, value in weights.items():
        value = value.astype(np.float32)
        forms = [value.reshape(-1)] + ([value.T.reshape(-1)] if value.ndim == 2 else [])
        ok = any(np.array_equal(t.reshape(-1), form) for t in by_size.get(value.size, []) for form in forms)
        if not ok and value.ndim == 2 and value.shape[0] % 4 == 0:
            reordered = _gate_reorder(value, LSTM_GATES_COREML_TO_ONNX)
            ok = any(np.array_equal(t, reordered) for t in lstm_slices.get(value.size, []))
        report["verified" if ok else "missing"].append(name)
    return report
