"""Reading a compressed Core ML package's weights back, and finding the torch parameters they came from.

Decompression is coremltools' own: each ``constexpr_*`` op's ``materialized_val_inference()``
(``constexpr_affine_dequantize``, ``constexpr_blockwise_shift_scale``, ``constexpr_lut_to_dense``,
``constexpr_cast``, ..., chains included), as the project's ML-program executor does
(``backends.coreml_program``). A weight keeps its identity through compression by the ops that read
it (the const is replaced, its consumers are not renamed), which is how a compressed weight is tied
to the const it replaced and that const to a torch parameter (``match_parameters``: exact value under
identity, transpose, or the LSTM gate reorder i,f,g,o -> i,f,o,g).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

LSTM_GATES_TORCH_TO_COREML = (0, 1, 3, 2)  # torch i,f,g,o -> Core ML i,f,o,g (self-inverse)
LSTM_GATES_COREML_TO_ONNX = (0, 2, 1, 3)  # Core ML i,f,o,g -> ONNX i,o,f,c

Consumers = frozenset[tuple[str, str]]


def op_consumers(var) -> Consumers:
    """(consumer op name, input argument) pairs reading the PyMIL ``var``: a weight's identity that
    survives compression."""
    keys = set()
    for op in var.child_ops:
        for arg, value in op.inputs.items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            if any(v is var for v in values):
                keys.add((op.name, arg))
    return frozenset(keys)


@dataclass
class CompressedWeight:
    """One weight as a Core ML package stores it compressed: its dense value and where it is read."""

    name: str
    value: np.ndarray  # float32, the dequantized weight, in Core ML's layout
    dtype: str  # dtype Core ML materializes it in (float16 / float32)
    op_types: tuple[str, ...]  # the constexpr chain, outermost last
    consumers: Consumers


def read_compressed_weights(mlpackage_path: Path) -> dict[str, CompressedWeight]:
    """Every weight of a saved ``.mlpackage`` that is stored compressed, by constexpr output name.

    A weight is the output of a ``constexpr_*`` op read by a compute op; its value is coremltools'
    ``materialized_val_inference()`` (in the dtype Core ML materializes it in, recorded in
    ``dtype``), widened exactly to float32.

    Raises:
        ValueError: the file is not an ML program (``backends.coreml.load_mil_program``).
    """
    from diaropt.backends.coreml import load_mil_program, mil_operations

    chains: dict[int, tuple[str, ...]] = {}
    weights: dict[str, CompressedWeight] = {}
    for op in mil_operations(load_mil_program(mlpackage_path)):
        if not op.op_type.startswith("constexpr_"):
            continue
        out = op.outputs[0]
        chains[id(out)] = sum((chains.get(id(v), ()) for v in op.inputs.values() if not isinstance(v, (list, tuple))),
                              ()) + (op.op_type,)
        if any(not child.op_type.startswith("constexpr_") for child in out.child_ops):
            value = np.asarray(op.materialized_val_inference())
            weights[out.name] = CompressedWeight(out.name, value.astype(np.float32), str(value.dtype),
                                                 chains[id(out)], op_consumers(out))
    return weights


def read_dequantized_weights(mlpackage_path: Path) -> dict[str, np.ndarray]:
    """{constexpr output name: float32 array in Core ML's layout} for every weight a saved
    ``.mlpackage`` stores compressed (see ``read_compressed_weights``)."""
    return {name: weight.value for name, weight in read_compressed_weights(mlpackage_path).items()}


def gate_reorder(array: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """The four gate blocks of an LSTM weight ``(4 * hidden, ...)`` along axis 0, in ``order``."""
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
        return gate_reorder(parameter, LSTM_GATES_TORCH_TO_COREML)
    return parameter


def to_parameter_layout(value: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """A Core ML weight ``value`` in the layout of the torch parameter of ``shape`` it came from."""
    if transform == "transpose":
        return np.ascontiguousarray(value.T)
    if transform == "lstm_gates":
        return gate_reorder(value, LSTM_GATES_TORCH_TO_COREML)
    return value.reshape(shape)


def match_parameters(consts: dict[str, np.ndarray], module: nn.Module) -> tuple[dict[str, WeightSource], dict[str, str]]:
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


def source_const(weight: CompressedWeight, by_consumer: dict[tuple[str, str], str]) -> str | None:
    """The uncompressed const ``weight`` replaced: the one const read by exactly the same
    (op, argument) pairs (``by_consumer``), or None."""
    names = {by_consumer.get(key) for key in weight.consumers}
    if len(names) != 1 or None in names:
        return None
    return names.pop()
