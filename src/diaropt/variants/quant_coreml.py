"""The quant axis on Core ML: a converted package per mode, compressed with coremltools' own calls.

Precision modes are set at conversion (``compute_precision``: ``ct.precision.FLOAT32`` / ``FLOAT16``,
or ``ct.transform.FP16ComputePrecision`` with an op selector for ``fp16_selective``). Compressed
modes convert in fp16, then ``coremltools.optimize.coreml`` compresses the program:
``linear_quantize_weights`` (``OpLinearQuantizerConfig``, int8 per channel / int4 per block),
``palettize_weights`` (``OpPalettizerConfig``, k-means LUT), and for w8a8 (macOS) first
``linear_quantize_activations``. Before converting a compressed mode, conv -> BatchNorm pairs are
folded (``torch.nn.utils.fusion.fuse_conv_bn_eval``) so that Core ML has no further fusion to do and
every weight const equals a torch parameter; the package's compressed weights can then be read back
and tied to parameters (``variants.quant_readback``), which the faithful ONNX stand-in needs
(``variants.quant_faithful``). The choices themselves live in ``variants.quant``.
"""

from __future__ import annotations

import collections
import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos
from diaropt.variants.quant import COREML_OPTIONS, CoreMLQuant, coreml_quant, with_defaults
from diaropt.variants.quant_readback import (Consumers, WeightSource, match_parameters, op_consumers,
                                             read_compressed_weights, source_const)

# ----------------------------------------------------------------------------------------------
# BatchNorm folding


def fold_batchnorm(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``module`` with every conv -> BatchNorm pair folded into the conv; [(conv, bn)] names.

    Pairs are found in the traced graph (``torch.jit.trace`` on ``example_inputs``): a ``ConvNd``
    (not transposed) whose output feeds only an eval-mode ``BatchNorm`` with running statistics, each
    module called once. The fold is ``torch.nn.utils.fusion.fuse_conv_bn_eval`` (conv weight
    ``W * s``, bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``), evaluated in float64
    and rounded once to float32; the BatchNorm becomes ``nn.Identity``. ``module`` is left unchanged.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    pairs = []
    for conv_name, bn_name in _conv_bn_pairs(folded, example_inputs):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv.double(), bn.double()).float()
        for name, replacement in ((conv_name, fused), (bn_name, nn.Identity())):
            parent_name, _, attr = name.rpartition(".")
            setattr(folded.get_submodule(parent_name), attr, replacement)
        pairs.append((conv_name, bn_name))
    return folded, pairs


def _conv_bn_pairs(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, str]]:
    """(conv, BatchNorm) submodule names that ``fold_batchnorm`` may fold, in graph order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.jit.trace(module, example_inputs, check_trace=False).inlined_graph
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
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        if (calls[conv_name] == 1 and calls[bn_name] == 1 and isinstance(conv, nn.modules.conv._ConvNd)
                and not conv.transposed and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and bn.running_var is not None and not bn.training):
            pairs.append((conv_name, bn_name))
    return pairs


# ----------------------------------------------------------------------------------------------
# Core ML build


@dataclass
class CoreMLBuild:
    """What a compressed Core ML build knows beyond its info, for the faithful ONNX stand-in."""

    module: nn.Module  # the (folded) module converted
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # compressible consts before compression
    consumers: dict[str, Consumers] = field(default_factory=dict)
    sources: dict[str, WeightSource] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)

    def const_by_consumer(self) -> dict[tuple[str, str], str]:
        """{(consumer op, argument): const name}: how a compressed weight finds the const it replaced."""
        return {key: name for name, keys in self.consumers.items() for key in keys}


def _keeps_fp32(op_type: str, keep: Iterable[str]) -> bool:
    return op_type in keep or op_type.startswith("reduce_")


def _compute_precision(name: str, keep_fp32_ops: Iterable[str]) -> Any:
    """The coremltools ``compute_precision`` argument for fp32 / fp16 / fp16_selective."""
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


def _op_config(spec: CoreMLQuant, options: dict[str, Any]) -> Any:
    """The ``coremltools.optimize.coreml`` op config of a compressed mode."""
    import coremltools.optimize.coreml as cto

    threshold = options["weight_threshold"]
    if spec.kind in ("linear", "activation"):
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{spec.nbits}",
                                           granularity=spec.granularity, block_size=options["block_size"],
                                           weight_threshold=threshold)
    return cto.OpPalettizerConfig(nbits=spec.nbits, mode="kmeans", granularity="per_tensor",
                                  num_kmeans_workers=options["num_kmeans_workers"], weight_threshold=threshold)


def _compressible_consts(model: Any, threshold: int) -> tuple[dict[str, np.ndarray], dict[str, Consumers]]:
    """Float consts of a converted (uncompressed) ``MLModel`` that compression may touch (> threshold
    elements), by const op name: ({name: value}, {name: consumers})."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    from diaropt.backends.coreml import mil_operations

    spec = model.get_spec()
    program = load_milproto(model_spec=spec, specification_version=spec.specificationVersion,
                            file_weights_dir=model.weights_dir)
    consts, consumers = {}, {}
    for op in mil_operations(program):
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype in (np.float16, np.float32) and value.size > threshold:
            consts[op.name] = value  # the op name (what OptimizationConfig.op_name_configs matches), not the var's
            consumers[op.name] = op_consumers(op.outputs[0])
    return consts, consumers


def build_coreml(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], path: Path, mode: str, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Convert ``module`` to a Core ML package at ``path`` realizing quant ``mode``; (path, info).

    ``example_inputs`` are traced (float32, the specs' shapes or one row); ``inputs`` / ``outputs``
    name and shape the package's float32 features. Options (defaults in ``quant.COREML_OPTIONS``):
    ``block_size`` (int4, 32), ``weight_threshold`` (consts with more elements are compressed,
    2048), ``compute_precision`` (fp32 / fp16 / fp16_selective; default the mode's: fp16 for
    compressed modes), ``minimum_deployment_target`` (default the mode's: macOS13, int4 macOS15),
    ``compress_scope`` ("all" consts, or only "parameters": not fbank/averaging constants),
    ``keep_fp32_ops`` (fp16_selective), ``num_kmeans_workers``, ``fold_batchnorm`` (True),
    ``calibration_data`` (w8a8, macOS: list of input dicts).

    info: mode, compute_precision, deployment_target, package_size_bytes, op_histogram (non-const),
    constexpr_ops, op_dtypes (fp16/fp32 compute ops), convert_s, compress_s, and for compressed modes
    compressed_weights/elements, uncompressed_weights, compressed_parameter_fraction, weight_sources.

    Raises:
        ValueError: unknown mode or option value, a deployment target below the mode's, w8a8 without
            calibration data.
        TypeError: an unknown option.
        BackendUnavailable: the mode has no Core ML realization, or needs macOS here (before any work).
    """
    path, info, _ = build_coreml_for_readback(module, example_inputs, inputs, outputs, Path(path), mode, **options)
    return path, info


def build_coreml_for_readback(module: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                              inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path, mode: str,
                              **given: Any) -> tuple[Path, dict[str, Any], CoreMLBuild]:
    """``build_coreml``, plus what the build knows about its weight consts (``CoreMLBuild``)."""
    import coremltools.optimize.coreml as cto

    from diaropt.backends import coreml

    spec = coreml_quant(mode)
    if spec.needs_macos and not is_macos():
        raise BackendUnavailable(spec.needs_macos)
    options = with_defaults(given, COREML_OPTIONS, "build_coreml")
    if options["compress_scope"] not in ("all", "parameters"):
        raise ValueError(f"compress_scope must be 'all' or 'parameters', not {options['compress_scope']!r}")
    if spec.kind == "activation" and not options["calibration_data"]:
        raise ValueError("w8a8 needs calibration_data: a list of {input name: array} from real inputs")
    precision = options["compute_precision"] or spec.compute_precision
    target = _target_at_least(options["minimum_deployment_target"], spec.minimum_deployment_target)
    compresses = spec.kind != "precision"
    info: dict[str, Any] = {"quant": mode, "coreml_quant": spec.description, "compute_precision": precision}

    start = time.perf_counter()
    build = CoreMLBuild(module)
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
        build.sources, build.unmatched = match_parameters(build.consts, build.module)
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


def _compression_summary(path: Path, build: CoreMLBuild, scope: str) -> dict[str, Any]:
    """Which compressible consts the saved package stores compressed, and how much of the module's
    parameters that covers."""
    compressed = read_compressed_weights(path)
    by_consumer = build.const_by_consumer()
    compressed_consts = {source_const(w, by_consumer) for w in compressed.values()}
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
