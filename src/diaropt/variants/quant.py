"""The ``quant`` sweep axis: which modes exist, which target realizes each and how. Decisions only.

This module decides; four modules carry the decisions out with library calls:

| module                   | owns                                                                          |
|--------------------------|-------------------------------------------------------------------------------|
| ``variants.quant``       | the modes, where each is buildable, the refusals, the builders' option tables |
| ``variants.quant_coreml``| Core ML packages: precision at conversion, ``coremltools.optimize.coreml``    |
|                          | compression, conv+BatchNorm folding (``torch.nn.utils.fusion``)               |
| ``variants.quant_onnx``  | ONNX graphs: ``build_onnx``, fp16 by onnxruntime's ``float16`` converter,     |
|                          | int8 by ``onnxruntime.quantization.quantize_dynamic``                         |
| ``variants.quant_readback`` | a saved package's compressed weights, decompressed by coremltools' own     |
|                          | value inference, and matched to the torch parameters they came from           |
| ``variants.quant_faithful`` | the ONNX stand-in of a Core ML compression: those weights written into the |
|                          | exported graph and verified there bit for bit                                 |

Core ML (modes in ``COREML_QUANT``): compute precision (``fp32``, ``fp16``, ``fp16_selective``) set
at conversion; weight compression (``int8``, ``int4``, ``palettize4/6/8``) applied to the converted
program; ``w8a8`` also quantizes activations, which needs Core ML predictions for calibration, so it
is refused before any work off macOS (``refuse_unbuildable``). ``int4`` needs the iOS18 / macOS15
opset, where coremltools converts the segmentation LSTMs in fp16 too (under macOS13 the LSTM op is
fp32 only, with casts around it). The fbank (waveform to log-mel) stays fp32 in every fp16 and
compressed build (``backends.coreml.fbank_in_fp32``).

ONNX Runtime (modes in ``ONNX_QUANT``): ``native`` variants (``fp32``, ``fp16``, ``fp16_selective``,
``int8_dynamic``, ``int8_dynamic_lstm``) transform the exported graph; ``faithful_coreml`` variants
carry in the ONNX graph exactly the weights of the compressed Core ML package (dequantized, read back
from the saved ``.mlpackage``), so a Core ML weight compression's accuracy cost is measured on any OS.
``int8_dynamic_lstm`` quantizes only the LSTM nodes (the segmentation model's BiLSTM becomes
``DynamicQuantizeLSTM``: int8 weights, activations quantized per call); a graph without LSTM (the
CAM++ / ResNet embedding, fbank, pooling) stays the fp32 graph and its build info says so. Issue 19's
prototype (benchmarks/results/issue19_phase1/) found quantizing the Conv layers too (``ConvInteger``)
slower than fp32 on x86 CPUs and less accurate, which is why the mode stops at the LSTM.

``w8a8`` on ONNX Runtime is a ``native`` mode of its own, not a stand-in of the Core ML package:
onnxruntime's ``quantize_static`` (QDQ format) with per-channel int8 weights and uint8 activations
whose ranges are calibrated (MinMax) on 10 s windows of the AMI dev clips shipped as assets (never
the ``test`` set), on the ``Conv`` nodes only; the fbank (nodes under ``/fbank/``) and the first
convolution reading its output (``/head/conv1/``), the segmentation model's SincNet (``/sincnet/``:
its graph stays fp32), the LSTM and every other op stay fp32. The calibration's identity and the
quantizer's options are ``w8a8_onnx_key()`` (part of the model cache key). Issue 19 phase 4
measured it on the CAM++ trunk
(benchmarks/results/issue19_phase4/w8a8_ort.md): U8S8 without ``reduce_range`` (the ORT docs' 7-bit
weights for AVX2 without VNNI were as fast and less accurate on this model), Conv only (quantizing the
Concat / Add / Relu too broke CAM++'s dense blocks: frame-feature error 0.69).

The dynamic modes are ONNX Runtime kernels with no Core ML counterpart (Core ML quantizes weights, or
weights and activations with calibrated static ranges; it has no per-call activation quantization of
an LSTM), and torch is the fp32 reference: both refuse them before any work (``refuse_unbuildable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diaropt.backends.base import BackendUnavailable, is_macos


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
    """How a quant mode is realized as an ONNX graph: ``native`` or ``faithful_coreml``.

    ``dynamic_op_types``: for onnxruntime's dynamic int8 quantization, the ONNX op types whose weights
    it quantizes (empty: not a dynamic mode). ``static_op_types``: for its static (calibrated) QDQ
    quantization, the op types whose weights and input activations it quantizes (empty: not a static
    mode). ``fp32_without_targets``: a graph with no node of those types stays the fp32 graph
    (recorded in the build info) instead of failing as "quantized nothing".
    """

    kind: str
    description: str
    dynamic_op_types: tuple[str, ...] = ()
    fp32_without_targets: bool = False
    static_op_types: tuple[str, ...] = ()  # onnxruntime quantize_static (calibrated activations)


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
    "int8_dynamic": OnnxQuant("native", "onnxruntime quantize_dynamic: int8 weights, activations quantized at run time",
                              dynamic_op_types=("Conv", "MatMul", "Gemm", "LSTM")),
    "int8_dynamic_lstm": OnnxQuant(
        "native", "onnxruntime quantize_dynamic of the LSTM nodes only (DynamicQuantizeLSTM: int8 weights, "
        "activations quantized at run time); every other op, and every graph without an LSTM, in fp32",
        dynamic_op_types=("LSTM",), fp32_without_targets=True),
    "w8a8": OnnxQuant(
        "native", "onnxruntime quantize_static (QDQ): per-channel int8 weights and uint8 activations of the Conv "
        "nodes, activation ranges calibrated on AMI dev windows; the fbank, the segmentation model (SincNet convs "
        "excluded, LSTM) and all other ops fp32 (ONNX Runtime's own static quantization, not the Core ML w8a8 "
        "package)",
        static_op_types=("Conv",), fp32_without_targets=True),
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

#: ``quant_coreml.build_coreml``'s options and defaults (documented there).
COREML_OPTIONS: dict[str, Any] = {
    "block_size": 32, "weight_threshold": 2048, "compute_precision": None, "minimum_deployment_target": None,
    "compress_scope": "parameters", "keep_fp32_ops": COREML_FP32_OPS, "num_kmeans_workers": 1,
    "fold_batchnorm": True, "calibration_data": None,
}
#: ``w8a8`` on ONNX Runtime: where its calibration windows come from. ``files`` of the pinned
#: ``asset`` (the AMI dev clips: never the ``test`` set, and present on a fresh clone), cut into windows
#: of the model input's length at ``hop_s`` (22 windows of 10 s at a 2 s hop from the two 30 s clips).
W8A8_CALIBRATION: dict[str, Any] = {"asset": "ami", "files": ("dev00.wav", "dev01.wav"), "hop_s": 2.0,
                                    "max_windows": 32}
#: ``w8a8`` on ONNX Runtime: onnxruntime ``quantize_static`` options (names of its ``QuantType`` /
#: ``CalibrationMethod`` / ``QuantFormat`` members). ``exclude_name_parts``: nodes whose name contains
#: one of these path parts stay fp32: the waveform front ends, CAM++'s fbank (its DFT convolution), the
#: first convolution after it (``/head/conv1/``, reading the log-mel features: kept fp32, the frame
#: features' error fell from 0.106 to 0.096 and the short-mask embedding cosine minimum rose from
#: 0.973 to 0.981 at the same speed; benchmarks/results/issue19_phase4/w8a8_exclusions.json) and
#: the segmentation model's SincNet (all three of its Conv nodes, so the segmentation graph stays fp32:
#: quantized, it was no faster, its model time being the LSTM's, and its frame-class argmax agreed with
#: fp32 on 86 % of frames only; benchmarks/results/issue19_phase4/w8a8_ort.md).
W8A8_STATIC: dict[str, Any] = {
    "quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
    "reduce_range": False, "calibrate_method": "MinMax", "op_types": None,  # None: the mode's static_op_types
    "exclude_name_parts": ("/fbank/", "/head/conv1/", "/sincnet/"), "pre_process": True,
}

#: ``quant_onnx.build_onnx``'s options and defaults (documented there); ``coreml_<option>`` go to
#: the Core ML build of a faithful mode.
ONNX_OPTIONS: dict[str, Any] = {
    "optimization_level": "all", "probe": True, "probe_timeout_s": 600.0, "keep_fp32_ops": ONNX_FP32_OPS,
    "dynamic_op_types": None, "dynamic_per_channel": False, "keep_work": True,  # None: the mode's
    "calibration": W8A8_CALIBRATION, "static": W8A8_STATIC,
    **{f"coreml_{k}": v for k, v in COREML_OPTIONS.items()},
}


def w8a8_onnx_key(calibration: dict[str, Any] | None = None, static: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an ONNX Runtime ``w8a8`` graph depends on beyond the weights: the calibration (asset,
    files and each file's pinned sha256, windowing) and the ``quantize_static`` options, with
    defaults ``W8A8_CALIBRATION`` / ``W8A8_STATIC``. Torch-free (the sha256 are the pinned assets'
    digests from ``diaropt.assets.ASSETS``, not read from disk); enters the model cache key.

    Raises:
        TypeError: an unknown calibration or static option.
        KeyError: the calibration asset or one of its files is not pinned.
    """
    from diaropt.assets import ASSETS

    calibration = with_defaults(calibration or {}, W8A8_CALIBRATION, "w8a8 calibration")
    static = with_defaults(static or {}, W8A8_STATIC, "w8a8 static options")
    members = {m.relpath: m.sha256 for m in ASSETS[calibration["asset"]][1]}
    files = {name: members[name] for name in calibration["files"]}
    return {"calibration": {**calibration, "files": files},
            "static": {k: list(v) if isinstance(v, tuple) else v for k, v in static.items()}}


def check_mode(mode: str) -> None:
    """Raises ValueError naming the valid modes unless ``mode`` is a value of the quant axis."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {mode!r}; valid modes: {', '.join(QUANT_MODES)}")


def coreml_quant(mode: str) -> CoreMLQuant:
    """How ``mode`` is built as a Core ML package.

    Raises:
        ValueError: ``mode`` is not a quant mode.
        BackendUnavailable: ``mode`` has no Core ML realization (``int8_dynamic``, ``int8_dynamic_lstm``).
    """
    check_mode(mode)
    if mode not in COREML_QUANT:
        raise BackendUnavailable(f"quant={mode} has no Core ML realization (it is ONNX Runtime's dynamic "
                                 "quantization: activations quantized per call by its int8 kernels, which "
                                 "Core ML does not have); use backend=onnxruntime, or a Core ML mode: "
                                 f"{', '.join(sorted(COREML_QUANT))}")
    return COREML_QUANT[mode]


def onnx_quant(mode: str) -> OnnxQuant:
    """How ``mode`` is built as an ONNX graph.

    Raises:
        ValueError: ``mode`` is not a quant mode.
        BackendUnavailable: ``mode`` has no ONNX realization (every quant mode has one today).
    """
    check_mode(mode)
    if mode not in ONNX_QUANT:
        raise BackendUnavailable(f"quant={mode} has no ONNX Runtime realization; ONNX modes: "
                                 f"{', '.join(sorted(ONNX_QUANT))}")
    return ONNX_QUANT[mode]


def realization(mode: str, backend: str) -> str:
    """One line saying how ``mode`` is realized on the resolved ``backend`` (logged as the
    ``quant.realized`` param, so a runs table tells ONNX Runtime's w8a8 from Core ML's), or why it is not."""
    try:
        if backend == "coreml":
            return f"coreml: {coreml_quant(mode).description}"
        if backend == "onnxruntime":
            return f"onnxruntime: {onnx_quant(mode).description}"
    except (ValueError, BackendUnavailable) as error:
        return f"{backend}: none ({getattr(error, 'reason', error)})"
    return f"{backend}: fp32 weights and compute" if mode == "fp32" else f"{backend}: none (torch runs fp32 only)"


def refuse_unbuildable(mode: str, backend: str | None = None) -> None:
    """Raises ``BackendUnavailable`` before any work for a quant mode this host cannot build: Core ML's
    w8a8 calibrates activations with Core ML predictions (macOS only; ONNX Runtime's w8a8 is its own
    static quantization and builds anywhere); with ``backend`` (resolved:
    coreml | onnxruntime | torch) also a mode that backend has no realization of (``coreml_quant`` /
    ``onnx_quant``; torch runs fp32 only).

    Raises:
        ValueError: ``mode`` is not a quant mode (with ``backend``).
        BackendUnavailable: as above; the reason names the mode.
    """
    spec = COREML_QUANT.get(mode)
    if (spec is not None and spec.needs_macos and not is_macos()
            and (backend in (None, "coreml") or mode not in ONNX_QUANT)):  # w8a8 has an ONNX Runtime mode
        other = (f"; ONNX Runtime has its own {mode}, which builds here: backend=onnxruntime"
                 if mode in ONNX_QUANT else "")
        raise BackendUnavailable(f"quant={mode} with Core ML needs macOS: {spec.needs_macos}{other}")
    if backend == "coreml":
        coreml_quant(mode)
    elif backend == "onnxruntime":
        onnx_quant(mode)
    elif backend == "torch" and mode != "fp32":
        check_mode(mode)
        raise BackendUnavailable(f"quant={mode} is not a torch variant: the torch backend is the fp32 reference")


def with_defaults(given: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` updated with ``given``.

    Raises:
        TypeError: ``given`` has keys ``defaults`` lacks (names them and the valid ones).
    """
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"{where}: unknown options {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **given}
