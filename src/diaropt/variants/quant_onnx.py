"""The quant axis on ONNX Runtime: an exported graph per mode, transformed with onnxruntime's own tools.

``fp16`` / ``fp16_selective``: onnxruntime's ``transformers.float16.convert_float_to_float16``
(``keep_io_types=True``; ``fp16_selective`` adds ``quant.ONNX_FP32_OPS`` and every ``Reduce*`` to
the op block list), after the input-independent computed tensors (SincNet's filters) are folded
into fp32 initializers, as Core ML's conversion does. ``int8_dynamic`` (Conv, MatMul, Gemm, LSTM) and
``int8_dynamic_lstm`` (LSTM only; graphs without one stay fp32):
``onnxruntime.quantization.quantize_dynamic``. ``w8a8`` (Conv weights and activations, calibrated on
AMI dev windows): ``onnxruntime.quantization.quantize_static`` in QDQ format. Faithful modes (the
Core ML compressions) are built by ``variants.quant_faithful``. The choices themselves live in
``variants.quant``.
"""

from __future__ import annotations

import collections
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from diaropt.backends.base import TensorSpec
from diaropt.variants.quant import ONNX_OPTIONS, W8A8_CALIBRATION, W8A8_STATIC, onnx_quant, with_defaults
from diaropt.variants.quant_faithful import build_faithful, fold_computed_constants, zero_feeds


def convert_onnx_fp16(src: Path, dst: Path, keep_fp32_ops: Iterable[str] = ()) -> dict[str, int]:
    """Write ``src`` with fp16 weights and compute to ``dst``; graph inputs and outputs stay fp32.

    The conversion is onnxruntime's ``float16.convert_float_to_float16`` through
    ``OnnxModel.convert_float_to_float16`` (which also drops cascaded and useless Casts), with
    ``keep_io_types=True`` and the op block list ``float16.DEFAULT_OP_BLOCK_LIST`` plus
    ``keep_fp32_ops`` (and every ``Reduce*`` when that set is non-empty): blocked nodes compute in
    fp32 behind Casts. Float values beyond fp16's range are clipped to +-65504 and nonzero values
    below its smallest subnormal become +-5.96e-8 (the library's defaults). The nodes are then
    sorted topologically (the library appends its Casts), value_info re-inferred, and the result
    passes ``onnx.checker`` (full check). Returns counts: fp16 / fp32 compute nodes, Casts.

    Raises:
        onnx.checker.ValidationError / onnx.shape_inference.InferenceError: the converted graph is invalid.
    """
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = frozenset(keep_fp32_ops)
    reduce_ops = {schema.name for schema in onnx.defs.get_all_schemas() if schema.name.startswith("Reduce")}
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | keep | (reduce_ops if keep else set()))
    converted = OnnxModel(onnx.load(str(src)))
    converted.convert_float_to_float16(use_symbolic_shape_infer=False, keep_io_types=True, op_block_list=block)
    converted.topological_sort(is_deterministic=True)
    model = converted.model
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return _precision_counts(model)


def _precision_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Compute nodes writing fp16 / fp32 tensors, and Cast nodes, in a shape-inferred graph."""
    graph = model.graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if node.op_type == "Cast":
            counts["casts"] += 1
            continue
        written = {dtype.get(name) for name in node.output}
        if TensorProto.FLOAT16 in written:
            counts["fp16_nodes"] += 1
        elif TensorProto.FLOAT in written:
            counts["fp32_nodes"] += 1
    return dict(counts)


INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul")


def _quantize_dynamic(src: Path, dst: Path, mode: str, op_types: Iterable[str], per_channel: bool,
                      fp32_without_targets: bool = False) -> dict[str, Any]:
    """int8 weights (initializers of ``op_types``) with ``quantize_dynamic``, written to ``dst``.

    A graph with no node of ``op_types`` is copied unchanged when ``fp32_without_targets`` (info
    ``int8_nodes`` 0 and ``kept_fp32`` saying why); otherwise, and whenever the quantizer quantized
    nothing, RuntimeError (the "int8" model would be the fp32 graph). Info: ``dynamic_op_types``,
    ``dynamic_per_channel``, ``quantized_ops`` (count per integer op type), ``int8_nodes`` (their sum).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = list(op_types)
    info: dict[str, Any] = {"dynamic_op_types": op_types, "dynamic_per_channel": per_channel}
    present = collections.Counter(node.op_type for node in onnx.load(str(src), load_external_data=False).graph.node
                                  if node.op_type in op_types)
    if not present and fp32_without_targets:
        shutil.copyfile(src, dst)
        return {**info, "quantized_ops": {}, "int8_nodes": 0,
                "kept_fp32": f"no {'/'.join(op_types)} node in the graph: quant={mode} leaves it fp32"}
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=op_types)
    counts = collections.Counter(node.op_type for node in onnx.load(str(dst), load_external_data=False).graph.node)
    quantized = {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS}
    if not quantized:
        raise RuntimeError(f"quantize_dynamic quantized nothing in {src.name} (op types {op_types}, present "
                           f"{dict(present)}): quant={mode} would be the fp32 graph")
    left = {k: counts[k] for k in op_types if counts.get(k)}  # e.g. an LSTM without a constant weight
    if left:
        info["left_fp32_ops"] = left
    return {**info, "quantized_ops": quantized, "int8_nodes": sum(quantized.values())}


def calibration_windows(inputs: list[TensorSpec], calibration: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for ``w8a8`` on ONNX Runtime: one dict per window, each input at batch 1.

    ``waveforms`` (float32 (B, [1,] S)): consecutive windows of S samples of the ``calibration``
    files (``quant.W8A8_CALIBRATION``: pinned asset files, read at 16 kHz, verified by
    ``diaropt.assets.asset_path``) every ``hop_s`` seconds, at most ``max_windows``; ``masks``: ones
    (every frame of every local speaker active). Returns at least one feed.

    Raises:
        ValueError: an input other than ``waveforms`` / ``masks`` (e.g. the separate fbank's
            ``features``: calibrating it would need the upstream model), a file not at 16 kHz or
            shorter than one window.
    """
    import soundfile as sf

    from diaropt.assets import asset_path
    from diaropt.models.constants import SAMPLE_RATE_HZ

    unknown = [s.name for s in inputs if s.name not in ("waveforms", "masks")]
    if unknown:
        raise ValueError(f"w8a8 on ONNX Runtime calibrates from waveforms; this model also takes {unknown}")
    wave = next(s for s in inputs if s.name == "waveforms")
    samples = int(wave.shape[-1])
    hop = int(round(calibration["hop_s"] * SAMPLE_RATE_HZ))
    windows: list[np.ndarray] = []
    for name in calibration["files"]:
        audio, rate = sf.read(str(asset_path(calibration["asset"]) / name), dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE_HZ or len(audio) < samples:
            raise ValueError(f"calibration file {name}: {rate} Hz, {len(audio)} samples (need {SAMPLE_RATE_HZ} Hz, "
                             f">= {samples})")
        mono = audio.mean(axis=1)
        windows += [mono[start:start + samples] for start in range(0, len(mono) - samples + 1, hop)]
    windows = windows[:int(calibration["max_windows"])]
    feeds = []
    for window in windows:
        feed = {}
        for spec in inputs:
            shape = (1, *spec.shape[1:])
            feed[spec.name] = (window.reshape(shape) if spec.name == "waveforms"
                               else np.ones(shape, np.float32)).astype(np.float32)
        feeds.append(feed)
    return feeds


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _quantize_static(src: Path, dst: Path, mode: str, inputs: list[TensorSpec], op_types: Iterable[str],
                     calibration: dict[str, Any], static: dict[str, Any], work: Path,
                     fp32_without_targets: bool = False) -> dict[str, Any]:
    """Weights and input activations of ``op_types`` nodes in 8 bits with onnxruntime's
    ``quantize_static`` (``static``: ``quant.W8A8_STATIC``), calibrated on ``calibration_windows``.

    ``src`` first gets its input-independent computed tensors folded into initializers (SincNet's
    filters become weights) and, with ``pre_process``, onnxruntime's ``quant_pre_process`` (shape
    inference and basic graph optimization: Conv+BatchNorm folding; no symbolic shape inference).
    Nodes whose name contains one of ``exclude_name_parts`` stay fp32 (a graph whose every target is
    excluded is ``src`` unchanged when ``fp32_without_targets``). Info: ``w8a8_onnx`` (the
    calibration and options used, ``quant.w8a8_onnx_key``), ``calibration_windows``,
    ``static_op_types``, ``qdq_nodes`` (QuantizeLinear / DequantizeLinear counts in the saved QDQ
    graph), ``quantized_ops`` (per op type, nodes whose weight is dequantized int8), ``int8_nodes``
    (their sum), ``fp32_target_nodes`` (names of ``op_types`` nodes left fp32), ``ort_fused_ops``
    (QLinear* / remaining Q/DQ op counts after ONNX Runtime's extended, hardware-independent graph
    optimization: what the CPU kernels run), ``calibrate_s``.

    Raises:
        RuntimeError: nothing was quantized (unless the graph has no ``op_types`` node left after the
            exclusion and ``fp32_without_targets``: then ``dst`` is ``src`` and ``kept_fp32`` says why).
        ValueError: from ``calibration_windows``.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from diaropt.variants.quant import w8a8_onnx_key

    op_types = list(op_types)
    info: dict[str, Any] = {"static_op_types": op_types, "w8a8_onnx": w8a8_onnx_key(calibration, static)}
    parts = tuple(static["exclude_name_parts"])
    nodes = onnx.load(str(src), load_external_data=False).graph.node
    present = collections.Counter(node.op_type for node in nodes if node.op_type in op_types)
    targets = [node.name for node in nodes if node.op_type in op_types and not any(p in node.name for p in parts)]
    if not targets and fp32_without_targets:
        shutil.copyfile(src, dst)
        why = (f"no {'/'.join(op_types)} node in the graph" if not present else
               f"every {'/'.join(op_types)} node ({dict(present)}) is excluded by name ({list(parts)})")
        return {**info, "quantized_ops": {}, "int8_nodes": 0, "kept_fp32": f"{why}: quant={mode} leaves it fp32"}
    feeds = calibration_windows(inputs, calibration)
    info["folded_constants"] = fold_computed_constants(src, dict(feeds[0]))
    model_in = src
    if static["pre_process"]:
        model_in = work / "pre_processed.onnx"
        quant_pre_process(str(src), str(model_in), skip_symbolic_shape=True)
    graph = onnx.load(str(model_in)).graph
    exclude = [n.name for n in graph.node if any(part in n.name for part in parts)]

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    start = time.perf_counter()
    quantize_static(str(model_in), str(dst), Windows(), quant_format=getattr(QuantFormat, static["quant_format"]),
                    op_types_to_quantize=op_types, per_channel=bool(static["per_channel"]),
                    reduce_range=bool(static["reduce_range"]),
                    activation_type=getattr(QuantType, static["activation_type"]),
                    weight_type=getattr(QuantType, static["weight_type"]), nodes_to_exclude=exclude,
                    calibrate_method=getattr(CalibrationMethod, static["calibrate_method"]))
    info.update(calibrate_s=time.perf_counter() - start, calibration_windows=len(feeds), excluded_nodes=len(exclude))
    if model_in != src:
        model_in.unlink()  # an fp32 copy: not kept in the cache entry
    quantized_graph = onnx.load(str(dst)).graph
    producer = {out: node.op_type for node in quantized_graph.node for out in node.output}
    initializers = {t.name for t in quantized_graph.initializer}
    counts = collections.Counter(node.op_type for node in quantized_graph.node)
    quantized: collections.Counter[str] = collections.Counter()
    left: list[str] = []
    for node in quantized_graph.node:
        if node.op_type in op_types:
            weight = node.input[1] if len(node.input) > 1 else ""
            if producer.get(weight) == "DequantizeLinear":
                quantized[node.op_type] += 1
            elif weight in initializers or producer.get(weight) == "Constant":
                left.append(node.name)
    if not quantized:
        raise RuntimeError(f"quantize_static quantized nothing in {src.name} (op types {op_types}, present "
                           f"{dict(present)}): quant={mode} would be the fp32 graph")
    optimized = work / "ort_extended.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node
                                if node.op_type.startswith("QLinear") or node.op_type in QDQ_OPS)
    optimized.unlink()
    return {**info, "qdq_nodes": {k: counts.get(k, 0) for k in QDQ_OPS},
            "quantized_ops": dict(sorted(quantized.items())), "int8_nodes": sum(quantized.values()),
            "fp32_target_nodes": left, "ort_fused_ops": dict(sorted(fused.items()))}


def build_onnx(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
               outputs: list[TensorSpec], path: Path, mode: str, work_dir: Path | None = None,
               **options: Any) -> tuple[Path, dict[str, Any]]:
    """Export ``module`` to an ONNX graph at ``path`` realizing quant ``mode``; (path, info).

    ``example_inputs`` are traced (float32); ``inputs`` / ``outputs`` name the graph's float32
    tensors, whose batch axis is dynamic. Native modes transform the exported fp32 graph (``fp16`` /
    ``fp16_selective``: ``convert_onnx_fp16``; ``int8_dynamic`` / ``int8_dynamic_lstm``:
    ``quantize_dynamic`` with int8 weights on ``dynamic_op_types``, default the mode's
    ``OnnxQuant.dynamic_op_types``; ``w8a8``: ``quantize_static`` of the mode's ``static_op_types``,
    options ``calibration`` / ``static``, defaults ``quant.W8A8_CALIBRATION`` / ``quant.W8A8_STATIC``,
    see ``_quantize_static``). Faithful modes build the Core ML package of ``mode`` under
    ``work_dir`` (options ``coreml_<option>`` go to ``quant_coreml.build_coreml``) and carry its
    dequantized weights (``quant_faithful.build_faithful``). Defaults: ``quant.ONNX_OPTIONS``.

    Unless ``probe=False``, a CPU session is built and run once in a child process at
    ``optimization_level`` and lower levels until one works (ONNX Runtime crashes on some fp16
    conv+LSTM graphs at the highest level); ``info["ort_level"]`` is the level to use and
    ``info["ort_probe"]`` the outcome per level tried.

    Raises:
        ValueError: an unknown mode. TypeError: an unknown option.
        BackendUnavailable: the mode has no ONNX realization, before any work.
        ValueError: w8a8 on a model whose inputs are not waveforms (+ masks).
        RuntimeError: a dynamic or static mode quantized nothing (int8_dynamic_lstm, w8a8: in a graph
            that has a target node); a faithful graph lacks a Core ML weight; no optimization level works.
    """
    from diaropt.backends import onnxruntime as ort_backend

    spec = onnx_quant(mode)
    options = with_defaults(options, ONNX_OPTIONS, "build_onnx")
    options["calibration"] = with_defaults(options["calibration"], W8A8_CALIBRATION, "build_onnx calibration")
    options["static"] = with_defaults(options["static"], W8A8_STATIC, "build_onnx static")
    path = Path(path)
    work_dir = Path(work_dir) if work_dir is not None else path.parent
    work = work_dir / f"{path.stem}_{mode}_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info: dict[str, Any] = {"quant": mode, "onnx_quant_kind": spec.kind, "onnx_quant": spec.description}
    start = time.perf_counter()
    if spec.kind == "faithful_coreml":
        info.update(build_faithful(module, example_inputs, inputs, outputs, path, mode, work, options))
    elif mode == "fp32":
        ort_backend.export_onnx(module, example_inputs, inputs, outputs, path)
    else:
        fp32 = ort_backend.export_onnx(module, example_inputs, inputs, outputs, work / "fp32.onnx")
        if mode in ("fp16", "fp16_selective"):
            # in fp32 first, as Core ML does
            info["folded_constants"] = fold_computed_constants(fp32, zero_feeds(inputs, example_inputs))
            keep = options["keep_fp32_ops"] if mode == "fp16_selective" else ()
            info["fp16_conversion"] = convert_onnx_fp16(fp32, path, keep)
        elif spec.static_op_types:  # w8a8
            op_types = options["static"].get("op_types") or spec.static_op_types
            info.update(_quantize_static(fp32, path, mode, inputs, op_types, options["calibration"],
                                         options["static"], work, spec.fp32_without_targets))
        elif spec.dynamic_op_types:  # int8_dynamic, int8_dynamic_lstm
            op_types = options["dynamic_op_types"] or spec.dynamic_op_types
            info.update(_quantize_dynamic(fp32, path, mode, op_types, options["dynamic_per_channel"],
                                          spec.fp32_without_targets))
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
