"""The Core ML backend: convert and inspect anywhere; compile, load and predict on macOS only.

On Linux, coremltools converts, compresses, saves and reads ``.mlpackage`` files, but compiling to
``.mlmodelc`` and prediction need Apple's Core ML framework: every such call raises
``BackendUnavailable`` with that reason, after the inputs it would feed have been checked against the
saved spec (so the macOS path is exercised up to the call).
"""

from __future__ import annotations

import collections
import copy
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos

COMPUTE_UNITS = {"cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE", "all": "ALL"}
NEEDS_MACOS = ("Core ML {what} needs macOS: coremltools converts and inspects models on this host, "
               "but compilation and prediction need Apple's Core ML framework")
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}


def convert_coreml(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                   outputs: list[TensorSpec], path: Path, precision: str = "fp32",
                   minimum_deployment_target: str = "macOS13", compute_precision: object | None = None,
                   **convert_kwargs: object):
    """Trace ``module`` and convert it to an ML program saved at ``path`` (fixed shapes).

    ``compute_precision`` (a ``ct.precision`` value or a ``ct.transform.FP16ComputePrecision``
    with an op selector) overrides ``precision`` ("fp32" / "fp16"). Returns the ``MLModel`` (not
    loaded for prediction on Linux).
    """
    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a copy: coremltools' conversion writes into some of the traced tensors in place (seen: the
        # running_mean of a BatchNorm(affine=False) after a conv), which would corrupt ``module``
        traced = torch.jit.trace(copy.deepcopy(module).eval(), example_inputs)
    if compute_precision is None:
        compute_precision = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[precision]
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type) for s in inputs],
        # explicit output dtypes: an fp16 program otherwise declares fp16 outputs, and a pipeline whose
        # next stage reads them as fp32 is refused by Core ML's validator
        outputs=[ct.TensorType(name=s.name, dtype=np.dtype(s.dtype).type) for s in outputs],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, minimum_deployment_target),
        compute_precision=fbank_in_fp32(compute_precision),
        skip_model_load=True,
        **convert_kwargs,
    )
    save_mlpackage(model, path)
    return model


FBANK_MODULE_TYPE = "KaldiFbank"


def in_fbank(op) -> bool:
    """Whether a MIL op was converted from the Kaldi fbank (``models.fbank.KaldiFbank``), by the
    TorchScript module scopes coremltools keeps on every converted op."""
    from coremltools.converters.mil.mil.scope import ScopeSource

    scopes = getattr(op, "scopes", None) or {}
    return FBANK_MODULE_TYPE in (scopes.get(ScopeSource.TORCHSCRIPT_MODULE_TYPE) or ())


#: ops kept fp32 in every fp16 build: the segmentation's log-softmax in fp16 rounds probabilities under
#: 6e-8 to 0 and their log to -inf (37,261 -inf log-probabilities on pyannote's sample, seen by the
#: executor); in fp32 they stay finite
FP32_OUTPUT_OPS = frozenset({"softmax", "log", "reduce_log_sum_exp"})


def fbank_in_fp32(compute_precision):
    """``compute_precision`` with every fbank op (and the log-softmax ops, :data:`FP32_OUTPUT_OPS`) kept in fp32.

    The fbank in fp16 breaks: mel energies of normal speech fall below fp16's normal range, its log
    floor (1.19e-7) is subnormal, a full-scale tone overflows 65504 in the power spectrum, and
    WeSpeaker's front end (waveform x 32768) overflows on ordinary speech. fp32 stays fp32.
    """
    import coremltools as ct

    if compute_precision == ct.precision.FLOAT32:
        return compute_precision
    inner = None
    if isinstance(compute_precision, ct.transform.FP16ComputePrecision):
        inner = compute_precision.op_selector
    elif compute_precision != ct.precision.FLOAT16:
        return compute_precision
    return ct.transform.FP16ComputePrecision(
        op_selector=lambda op: (not in_fbank(op) and op.op_type not in FP32_OUTPUT_OPS
                                and (inner is None or inner(op))))


def save_mlpackage(model, path: Path) -> Path:
    """Save atomically: a half-written package is never left under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except BaseException:  # a failed save (full disk) leaves no temporary package
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_spec(path: Path):
    """The protobuf spec of a saved ``.mlpackage`` (readable on any OS)."""
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def _operations(block) -> list:
    """Every op of a block, nested blocks included, in order: a protobuf ``Block`` or a PyMIL one
    (both have ``operations`` and per-op ``blocks``)."""
    found = []
    for op in block.operations:
        found.append(op)
        for nested in op.blocks:
            found.extend(_operations(nested))
    return found


def mil_operations(program) -> list:
    """Every op of a PyMIL ``Program`` (``load_mil_program``): each function's, nested blocks included."""
    return [op for function in program.functions.values() for op in _operations(function)]


def _program_specs(spec) -> list:
    """The ML program specs of a model: itself, or every model of a pipeline (recursively)."""
    if spec.WhichOneof("Type") == "pipeline":
        return [inner for model in spec.pipeline.models for inner in _program_specs(model)]
    return [spec]


def op_histogram(path: Path, include_const: bool = False) -> dict[str, int]:
    """Op type -> count for a saved ``.mlpackage`` (from its spec) or a compiled ``.mlmodelc``
    (from its ``model.mil`` text); a pipeline counts the ops of all its models. Consts are left out
    unless asked for."""
    path = Path(path)
    counts: collections.Counter[str] = collections.Counter()
    if path.suffix == ".mlmodelc":
        text = (path / "model.mil").read_text()
        counts.update(re.findall(r"=\s*([a-z_0-9]+)\s*\(", text))
    else:
        for spec in _program_specs(load_spec(path)):
            for function in spec.mlProgram.functions.values():
                for block in function.block_specializations.values():
                    counts.update(op.type for op in _operations(block))
    if not include_const:
        counts.pop("const", None)
    return dict(sorted(counts.items()))


def io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) declared by a saved ``.mlpackage``: names, shapes, dtypes."""
    description = load_spec(path).description

    def specs(features) -> list[TensorSpec]:
        return [TensorSpec(f.name, tuple(f.type.multiArrayType.shape),
                           _ARRAY_DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)))
                for f in features]

    return specs(description.input), specs(description.output)


def package_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# specificationVersion -> the deployment targets it first shipped with
SPEC_VERSION_TARGETS = {7: "iOS16/macOS13", 8: "iOS17/macOS14", 9: "iOS18/macOS15"}


def deployment_target(path: Path) -> str:
    """The minimum deployment target a saved package declares, e.g. "iOS18/macOS15"."""
    version = load_spec(path).specificationVersion
    return SPEC_VERSION_TARGETS.get(version, f"specificationVersion {version}")


def op_dtype_histogram(path: Path) -> dict[str, dict[str, int]]:
    """Op type -> {dtype of its first output: count} for a saved ``.mlpackage`` (consts left out).

    Shows which ops compute in fp16 and which stay fp32 (e.g. under a selective fp16 precision).
    """
    from coremltools.proto import MIL_pb2

    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for function in load_spec(path).mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in _operations(block):
                if op.type != "const" and op.outputs:
                    counts[op.type][MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType).lower()] += 1
    return {op_type: dict(sorted(dtypes.items())) for op_type, dtypes in sorted(counts.items())}


def load_mil_program(path: Path):
    """The MIL program (``coremltools`` PyMIL ``Program``) of a saved ``.mlpackage``, weights included."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path}: not an ML program (type {spec.WhichOneof('Type')})")
    return load_milproto(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=model.weights_dir)


class CoreMLModel:
    """A saved ``.mlpackage``, compiled and loaded with a compute unit on macOS.

    ``compile_s`` holds the measured compilation + load time (the design note's "Model Compilation":
    ``compile_model`` and the load with the compute unit, where the device-specific compilation
    happens); ``compiled_s`` the ``compile_model`` part alone.
    """

    def __init__(self, path: Path, compute_unit: str = "all") -> None:
        if compute_unit not in COMPUTE_UNITS:
            raise ValueError(f"unknown compute_unit {compute_unit!r}; expected one of {sorted(COMPUTE_UNITS)}")
        self.path = Path(path)
        self.compute_unit = compute_unit
        self.inputs, self.outputs = io_specs(self.path)
        self.compile_s: float | None = None
        self._model = None

    def load(self) -> None:
        """Compile to ``.mlmodelc`` (timed) and load with the compute unit; macOS only."""
        if not is_macos():
            raise BackendUnavailable(NEEDS_MACOS.format(what="compilation"))
        import coremltools as ct

        # compile + load with the compute unit: the load is where the device-specific compilation happens
        start = time.perf_counter()
        compiled = ct.models.utils.compile_model(str(self.path))
        self.compiled_s = time.perf_counter() - start
        self._model = ct.models.CompiledMLModel(compiled, getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_unit]))
        self.compile_s = time.perf_counter() - start

    def prepare_feeds(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs as Core ML takes them; a name, shape or dtype the spec does not declare fails here."""
        feeds = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                raise ValueError(f"{self.path.name}: missing input {spec.name!r}; expects {[s.name for s in self.inputs]}")
            value = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
            if value.shape != spec.shape:
                raise ValueError(f"{self.path.name}: input {spec.name!r} has shape {value.shape}, "
                                 f"the model declares {spec.shape}")
            feeds[spec.name] = value
        extra = set(inputs) - {spec.name for spec in self.inputs}
        if extra:
            raise ValueError(f"{self.path.name}: unexpected inputs {sorted(extra)}")
        return feeds

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = self.prepare_feeds(**inputs)
        if not is_macos():
            raise BackendUnavailable(NEEDS_MACOS.format(what="prediction"))
        if self._model is None:
            self.load()
        result = self._model.predict(feeds)
        return {spec.name: np.asarray(result[spec.name], dtype=np.float32) for spec in self.outputs}

    def sync(self) -> None:
        """``predict`` is synchronous."""
