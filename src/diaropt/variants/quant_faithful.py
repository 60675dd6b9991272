"""The ONNX stand-in of a Core ML weight compression: the package's own weights in the exported graph.

A faithful mode (``int8``, ``int4``, ``palettize*`` on ONNX Runtime) builds the compressed Core ML
package (``variants.quant_coreml``), reads its weights back decompressed (``variants.quant_readback``)
and carries exactly those values in the ONNX graph, which then computes in fp32: a Core ML weight
compression's accuracy cost measured on any OS (a proxy: timings and activations are ONNX Runtime's).

Mapping: weights tied to a torch parameter are loaded into the (BatchNorm-folded) module before the
export. Consts that are not parameters (fbank DFT matrices, constant averaging matrices, weights
computed from parameters such as SincNet's filters) are matched to the ONNX graph's constants or
input-independent computed tensors and substituted there. Whatever cannot be mapped is reported in
``info["unmapped_weights"]``; every mapped weight is then verified bit for bit in the ONNX file.
"""

from __future__ import annotations

import collections
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from diaropt.backends.base import TensorSpec
from diaropt.variants.quant_coreml import build_coreml_for_readback
from diaropt.variants.quant_readback import (LSTM_GATES_COREML_TO_ONNX, gate_reorder, read_compressed_weights,
                                             source_const, to_parameter_layout)


def build_faithful(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                   outputs: list[TensorSpec], path: Path, mode: str, work: Path,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Export ``module`` to ``path`` as an fp32 ONNX graph carrying the weights of the Core ML
    ``mode`` package, which is built under ``work`` (``options``: ``build_onnx``'s, of which the
    ``coreml_<option>`` ones go to the Core ML build); returns the info entries of the faithful build.

    Raises:
        RuntimeError: a mapped Core ML weight is not in the written graph bit for bit.
    """
    from diaropt.backends import onnxruntime as ort_backend

    coreml_options = {k[len("coreml_"):]: v for k, v in options.items() if k.startswith("coreml_")}
    package, coreml_info, build = build_coreml_for_readback(module, example_inputs, inputs, outputs,
                                                            work / f"{mode}.mlpackage", mode, **coreml_options)
    compressed = read_compressed_weights(package)
    by_consumer = build.const_by_consumer()
    parameters = dict(build.module.named_parameters())
    loaded: dict[str, tuple[str, np.ndarray]] = {}  # parameter -> (weight, value)
    remaining: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weight -> (const before compression, dequantized)
    unmapped: dict[str, dict[str, Any]] = {}
    for name, weight in compressed.items():
        const = source_const(weight, by_consumer)
        if const is None:
            unmapped[name] = {"shape": list(weight.value.shape), "reason": "no uncompressed const reads the same way"}
        elif const in build.sources:
            source = build.sources[const]
            value = to_parameter_layout(weight.value, source.transform, tuple(parameters[source.parameter].shape))
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
    substituted, not_found = _substitute_onnx_constants(path, remaining, zero_feeds(inputs, example_inputs))
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


def zero_feeds(inputs: list[TensorSpec], example_inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """{input name: zeros} at the example inputs' shapes, in the specs' dtypes: feeds for evaluating
    the input-independent tensors of a graph."""
    return {s.name: np.zeros(tuple(t.shape), s.dtype) for s, t in zip(inputs, example_inputs)}


def _computed_constants(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        _rewire_to_initializers(model, {name: (f"folded::{name}", value) for name, value in values.items()})
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return sorted(values)


def _rewire_to_initializers(model: onnx.ModelProto, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Readers of each ``name`` read a new initializer ``(new name, value)`` instead; dead nodes pruned."""
    graph = model.graph
    for name, (new_name, value) in tensors.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new_name))
    for node in graph.node:
        node.input[:] = [tensors[n][0] if n in tensors else n for n in node.input]
    _prune(model)


@dataclass
class _OnnxConstant:
    kind: str  # initializer | constant | computed
    name: str  # tensor name
    value: np.ndarray


def _onnx_constants(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[_OnnxConstant]:
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


def _apply_replacements(model: onnx.ModelProto, replacements: dict[str, tuple[_OnnxConstant, np.ndarray]]) -> None:
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
        _rewire_to_initializers(model, computed)


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes no graph output depends on, then unread initializers (onnxruntime's
    ``OnnxModel.prune_graph``; graph inputs are kept even when unread)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)


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
            reordered = gate_reorder(value, LSTM_GATES_COREML_TO_ONNX)
            ok = any(np.array_equal(t, reordered) for t in lstm_slices.get(value.size, []))
        report["verified" if ok else "missing"].append(name)
    return report
