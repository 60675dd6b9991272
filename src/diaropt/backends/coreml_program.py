"""Run a saved Core ML ML program (``.mlpackage``) on any OS: op by op, in the program's own precision.

No library executes an ML program off Apple platforms (coremltools loads MIL and folds constants;
TVM and onnxmltools read only the older NeuralNetwork format), so this module is the project's own
executor of the programs it builds. It is the numerics source of a ``backend=coreml`` job off macOS
(never its timing source: it is not Apple's runtime).

How it runs a program:

- the package is loaded with coremltools' ``milproto`` loader, weights included
  (``backends.coreml.load_mil_program``), and the main function's operations are walked in order;
- ``const`` values are taken as stored; ``constexpr_*`` ops (compressed weights) are decompressed by
  coremltools' own value inference (``op.materialized_val_inference()``), not re-implemented;
- every other op is evaluated with a torch CPU kernel on the whole batch (shapes are fixed), its
  float inputs upcast to float32, and **each output is rounded to the dtype the program declares
  for it** (fp16: IEEE binary16, overflow to inf, subnormals kept; ``cast`` ops cast). One
  elementwise op computed in fp32 and rounded once to fp16 gives the correctly rounded fp16
  result; ops that accumulate (matmul, conv, reductions, lstm) accumulate in fp32 and round their
  output, so an overflow inside an accumulation that the output does not show is not seen;
- an op type outside ``SUPPORTED_OPS`` is refused by name and package path (``UnsupportedOp``).

Limits (what a Mac may still do differently): the Neural Engine and GPU use their own accumulation
order, fused kernels and (on the ANE) fp16 accumulators, so results match the device to about the
rounding of its precision, not bit for bit.

Pipelines (``fusion.coreml_pipeline``) run stage by stage after the checks Core ML's validator
makes: every stage input is a pipeline input or produced by an earlier stage under the same name,
with the same shape and the same dtype (``PipelineTypeError`` otherwise).

Per model the executor counts non-finite output values and fp16 overflows (a finite fp32 value
rounded to inf) and underflows (a non-zero value rounded to zero) over every op: ``stats``.
"""

from __future__ import annotations

import collections
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from diaropt.backends.base import TensorSpec

log = logging.getLogger(__name__)

_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}
_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "int32": torch.int32,
                 "int64": torch.int64, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
                 "uint16": torch.int32, "bool": torch.bool}


class UnsupportedOp(NotImplementedError):
    """The program holds an op type the executor does not implement (named, with the package)."""


class PipelineTypeError(ValueError):
    """A pipeline stage reads a feature that no earlier stage produces with that name, shape and dtype
    (what Core ML's pipeline validator refuses at load)."""


# ----------------------------------------------------------------------------------------------
# Op kernels: (op, args) -> tensor or tuple of tensors. ``args[name]`` is an input's value (a float32
# / int / bool tensor for tensors; numpy / python for const parameters); absent optional inputs are
# missing from ``args``.


def _p(value: Any) -> Any:
    """A const parameter as python (int / float / str / bool / list)."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _binary(fn: Callable) -> Callable:
    return lambda op, a: fn(a["x"], a["y"])


def _unary(fn: Callable) -> Callable:
    return lambda op, a: fn(a["x"])


def _axes(a: dict[str, Any], rank: int) -> list[int] | None:
    axes = _p(a.get("axes"))
    if axes is None:
        return None
    return [int(x) % rank for x in (axes if isinstance(axes, list) else [axes])]


def _reduce(fn: Callable) -> Callable:
    def run(op, a):
        x = a["x"]
        axes = _axes(a, x.dim())
        keep = bool(_p(a.get("keep_dims", False)))
        return fn(x, list(range(x.dim())) if axes is None else axes, keep)
    return run


def _argreduce(fn: Callable) -> Callable:
    def run(op, a):
        x = a["x"]
        axis = int(_p(a.get("axis", -1)))
        return fn(x, dim=axis, keepdim=bool(_p(a.get("keep_dims", False)))).to(torch.int32)
    return run


def _same_padding(sizes: list[int], kernel: list[int], strides: list[int], dilations: list[int],
                  lower: bool) -> list[int]:
    """[begin_0, end_0, begin_1, end_1, ...] of Core ML's ``same`` / ``same_lower`` padding."""
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads += [big, small] if lower else [small, big]
    return pads


def _padding(op, a, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    pad_type = _p(a.get("pad_type", "valid"))
    if pad_type == "valid":
        return [0] * (2 * len(spatial))
    if pad_type == "custom":
        return [int(v) for v in _p(a["pad"])]
    if pad_type in ("same", "same_lower"):
        return _same_padding(spatial, kernel, strides, dilations, pad_type == "same_lower")
    raise UnsupportedOp(f"{op.op_type} pad_type {pad_type!r}")


def _torch_pad(pads: list[int]) -> list[int]:
    """Core ML [b0, e0, b1, e1, ...] (first spatial axis first) -> F.pad order (last axis first)."""
    pairs = [pads[i: i + 2] for i in range(0, len(pads), 2)]
    return [v for pair in reversed(pairs) for v in pair]


def _conv(op, a):
    x, w = a["x"], a["weight"]
    n = x.dim() - 2
    strides = [int(v) for v in _p(a.get("strides", [1] * n))]
    dilations = [int(v) for v in _p(a.get("dilations", [1] * n))]
    pads = _padding(op, a, list(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    if any(pads):
        x = F.pad(x, _torch_pad(pads))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return conv(x, w, a.get("bias"), stride=strides, dilation=dilations, groups=int(_p(a.get("groups", 1))))


def _pool(kind: str) -> Callable:
    def run(op, a):
        x = a["x"]
        n = x.dim() - 2
        kernel = [int(v) for v in _p(a["kernel_sizes"])]
        strides = [int(v) for v in _p(a.get("strides", [1] * n))]
        pads = _padding(op, a, list(x.shape[2:]), kernel, strides, [1] * n)
        ceil_mode = bool(_p(a.get("ceil_mode", False)))
        if kind == "max":
            if any(pads):
                x = F.pad(x, _torch_pad(pads), value=-math.inf)
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n](x, kernel, strides, ceil_mode=ceil_mode)
        exclude = bool(_p(a.get("exclude_padding_from_average", False)))
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        if any(pads):
            x, ones = F.pad(x, _torch_pad(pads)), F.pad(ones, _torch_pad(pads))
        avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        sums = avg(x, kernel, strides, ceil_mode=ceil_mode)
        if exclude:
            return sums / avg(ones, kernel, strides, ceil_mode=ceil_mode)
        return sums
    return run


def _norm_shape(value: torch.Tensor | None, rank: int, axis: int = 1) -> torch.Tensor | None:
    if value is None:
        return None
    shape = [1] * rank
    shape[axis] = -1
    return value.reshape(shape)


def _channel_affine(y, a):
    """``y * gamma + beta`` with per-channel (axis 1) ``gamma`` / ``beta``, each optional."""
    if a.get("gamma") is not None:
        y = y * _norm_shape(a["gamma"], y.dim())
    if a.get("beta") is not None:
        y = y + _norm_shape(a["beta"], y.dim())
    return y


def _batch_norm(op, a):
    x = a["x"]
    eps = float(_p(a.get("epsilon", 1e-5)))
    y = (x - _norm_shape(a["mean"], x.dim())) / torch.sqrt(_norm_shape(a["variance"], x.dim()) + eps)
    return _channel_affine(y, a)


def _instance_norm(op, a):
    x = a["x"]
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(_p(a.get("epsilon", 1e-5))))
    return _channel_affine(y, a)


def _layer_norm(op, a):
    x = a["x"]
    dims = _axes(a, x.dim())
    dims = list(range(x.dim())) if dims is None else dims
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(_p(a.get("epsilon", 1e-5))))
    if a.get("gamma") is not None:
        y = y * a["gamma"]
    if a.get("beta") is not None:
        y = y + a["beta"]
    return y


def _slice_by_index(op, a):
    x = a["x"]
    rank = x.dim()
    begin, end = _p(a["begin"]), _p(a["end"])
    stride = _p(a.get("stride")) or [1] * rank
    begin_mask = _p(a.get("begin_mask")) or [False] * rank
    end_mask = _p(a.get("end_mask")) or [False] * rank
    squeeze = _p(a.get("squeeze_mask")) or [False] * rank
    index = []
    for axis in range(rank):
        step = int(stride[axis])
        start = None if begin_mask[axis] else int(begin[axis])
        stop = None if end_mask[axis] else int(end[axis])
        if squeeze[axis]:
            index.append(int(begin[axis]))
            continue
        if step < 0:  # torch has no negative steps: slice the flipped axis
            raise UnsupportedOp("slice_by_index with a negative stride")
        index.append(slice(start, stop, step))
    return x[tuple(index)]


def _slice_by_size(op, a):
    x = a["x"]
    begin, size = _p(a["begin"]), _p(a["size"])
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[index]


def _gather(op, a):
    x, indices = a["x"], a["indices"].long()
    axis = int(_p(a.get("axis", 0))) % x.dim()
    batch_dims = int(_p(a.get("batch_dims", 0)))
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    if batch_dims == 0:
        flat = torch.index_select(x, axis, indices.reshape(-1))
        return flat.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])
    raise UnsupportedOp("gather with batch_dims > 0")


def _gather_along_axis(op, a):
    x, indices = a["x"], a["indices"].long()
    axis = int(_p(a.get("axis", 0))) % x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return torch.gather(x, axis, indices)


def _split(op, a):
    x = a["x"]
    axis = int(_p(a["axis"])) % x.dim()
    sizes = _p(a.get("split_sizes"))
    if sizes is None:
        count = int(_p(a["num_splits"]))
        sizes = [x.shape[axis] // count] * count
    return tuple(torch.split(x, [int(s) for s in sizes], dim=axis))


def _concat(op, a):
    values, axis = a["values"], int(_p(a["axis"]))
    if bool(_p(a.get("interleave", False))):
        raise UnsupportedOp("concat with interleave=True")
    return torch.cat(list(values), dim=axis)


def _pad(op, a):
    x = a["x"]
    pads = [int(v) for v in _p(a["pad"])]
    mode = _p(a.get("mode", "constant"))
    value = float(_p(a.get("constant_val", 0.0)))
    # Core ML pads the last len(pad) / 2 axes; F.pad takes them last axis first
    if mode == "constant":
        return F.pad(x, _torch_pad(pads), value=value)
    spatial = len(pads) // 2
    shaped = x.reshape(-1, *x.shape[x.dim() - spatial:]).unsqueeze(0) if x.dim() - spatial != 2 else x
    out = F.pad(shaped, _torch_pad(pads), mode={"reflect": "reflect", "replicate": "replicate"}[mode])
    return out.reshape(*x.shape[: x.dim() - spatial], *out.shape[-spatial:])


_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "linear": lambda v: v,
                "hard_sigmoid": lambda v: torch.clamp(0.2 * v + 0.5, 0, 1), "scaled_tanh": torch.tanh}


def _lstm(op, a):
    """Core ML lstm: x (S, B, I); weights in gate order i, f, o, g; outputs (seq, h, c)."""
    x = a["x"]
    direction = _p(a.get("direction", "forward"))
    if a.get("peephole") is not None or a.get("clip") is not None:
        raise UnsupportedOp("lstm with peephole or clip")
    acts = [_p(a.get(k, d)) for k, d in (("recurrent_activation", "sigmoid"), ("cell_activation", "tanh"),
                                         ("activation", "tanh"))]
    if acts != ["sigmoid", "tanh", "tanh"]:
        raise UnsupportedOp(f"lstm activations {acts}")
    hidden = a["weight_hh"].shape[1]
    directions = [("", False)] if direction == "forward" else [("", True)] if direction == "reverse" else \
        [("", False), ("_back", True)]
    h0, c0 = a["initial_h"], a["initial_c"]
    outputs, hs, cs = [], [], []
    for number, (suffix, reverse) in enumerate(directions):
        w_ih, w_hh = a[f"weight_ih{suffix}"], a[f"weight_hh{suffix}"]
        bias = a.get(f"bias{suffix}")
        # Core ML i, f, o, g -> torch i, f, g, o
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                           torch.arange(2 * hidden, 3 * hidden)])
        weights = [w_ih[order], w_hh[order]]
        if bias is not None:
            weights += [bias[order], torch.zeros_like(bias)]
        seq = torch.flip(x, [0]) if reverse else x
        h = h0[:, number * hidden: (number + 1) * hidden].unsqueeze(0).contiguous()
        c = c0[:, number * hidden: (number + 1) * hidden].unsqueeze(0).contiguous()
        out, hn, cn = torch._VF.lstm(seq, (h, c), weights, bias is not None, 1, 0.0, False, False, False)
        outputs.append(torch.flip(out, [0]) if reverse else out)
        hs.append(hn[0])
        cs.append(cn[0])
    sequence = torch.cat(outputs, dim=-1)
    if not bool(_p(a.get("output_sequence", False))):
        sequence = torch.cat([o[-1:] if not rev else o[:1] for o, (_, rev) in zip(outputs, directions)], dim=-1)
    return sequence, torch.cat(hs, dim=-1), torch.cat(cs, dim=-1)


def _softmax(op, a):
    return torch.softmax(a["x"], dim=int(_p(a.get("axis", -1))))


def _clip(op, a):
    return torch.minimum(torch.maximum(a["x"], _as_tensor(a["alpha"])), _as_tensor(a["beta"]))


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)


def _reshape_to_output(op, a):
    return a["x"].reshape(tuple(int(d) for d in op.outputs[0].shape))


def _transpose(op, a):
    return a["x"].permute(*[int(v) for v in _p(a["perm"])])


def _tile(op, a):
    return a["x"].repeat(*[int(v) for v in _p(a["reps"])])


def _stack(op, a):
    return torch.stack(list(a["values"]), dim=int(_p(a["axis"])))


def _select(op, a):
    return torch.where(a["cond"].bool(), a["a"], a["b"])


def _cast(op, a):
    return a["x"]  # the rounding to the declared output dtype is the cast


def _fill(op, a):
    return torch.full(tuple(int(d) for d in op.outputs[0].shape), float(_p(a.get("value", 0.0))))


def _matmul(op, a):
    x, y = a["x"], a["y"]
    if bool(_p(a.get("transpose_x", False))):
        x = x.transpose(-1, -2)
    if bool(_p(a.get("transpose_y", False))):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def _linear(op, a):
    return F.linear(a["x"], a["weight"], a.get("bias"))


def _leaky_relu(op, a):
    return F.leaky_relu(a["x"], float(_p(a.get("alpha", 0.01))))


def _log(op, a):
    eps = float(_p(a.get("epsilon", 0.0)))
    return torch.log(a["x"] + eps) if eps else torch.log(a["x"])


def _rsqrt(op, a):
    return torch.rsqrt(a["x"] + float(_p(a.get("epsilon", 1e-12))))


def _inverse(op, a):
    return 1.0 / (a["x"] + float(_p(a.get("epsilon", 1e-4))))


def _real_div(x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="floor")
    return x / y


def _l2_norm(op, a):
    x = a["x"]
    dims = list(range(max(x.dim() - 3, 0), x.dim()))
    norm = torch.sqrt(torch.clamp((x * x).sum(dim=dims, keepdim=True), min=float(_p(a.get("epsilon", 1e-6)))))
    return x / norm


KERNELS: dict[str, Callable] = {
    # elementwise binary (numpy broadcasting)
    "add": _binary(torch.add), "sub": _binary(torch.sub), "mul": _binary(torch.mul), "real_div": _binary(_real_div),
    "pow": _binary(torch.pow), "maximum": _binary(torch.maximum), "minimum": _binary(torch.minimum),
    "floor_div": _binary(lambda x, y: torch.div(x, y, rounding_mode="floor")),
    "mod": _binary(torch.remainder),
    "greater": _binary(torch.gt), "greater_equal": _binary(torch.ge), "less": _binary(torch.lt),
    "less_equal": _binary(torch.le), "equal": _binary(torch.eq), "not_equal": _binary(torch.ne),
    "logical_and": _binary(torch.logical_and), "logical_or": _binary(torch.logical_or),
    "logical_xor": _binary(torch.logical_xor),
    # elementwise unary
    "abs": _unary(torch.abs), "sqrt": _unary(torch.sqrt), "exp": _unary(torch.exp), "log": _log,
    "relu": _unary(torch.relu), "sigmoid": _unary(torch.sigmoid), "tanh": _unary(torch.tanh),
    "sin": _unary(torch.sin), "cos": _unary(torch.cos), "floor": _unary(torch.floor), "ceil": _unary(torch.ceil),
    "round": _unary(torch.round), "sign": _unary(torch.sign), "square": _unary(torch.square),
    "logical_not": _unary(torch.logical_not), "rsqrt": _rsqrt, "inverse": _inverse,
    "leaky_relu": _leaky_relu, "clip": _clip, "cast": _cast, "identity": lambda op, a: a["x"],
    # linear algebra, convolution, normalization, pooling, recurrence
    "matmul": _matmul, "linear": _linear, "conv": _conv, "batch_norm": _batch_norm,
    "instance_norm": _instance_norm, "layer_norm": _layer_norm, "l2_norm": _l2_norm,
    "max_pool": _pool("max"), "avg_pool": _pool("avg"), "lstm": _lstm, "softmax": _softmax,
    # reductions
    "reduce_sum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "reduce_mean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "reduce_max": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "reduce_min": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "reduce_prod": _reduce(lambda x, d, k: _prod(x, d, k)),
    "reduce_log_sum_exp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "reduce_sum_square": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k)),
    "reduce_l2_norm": _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k))),
    "reduce_l1_norm": _reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k)),
    "reduce_argmax": _argreduce(torch.argmax), "reduce_argmin": _argreduce(torch.argmin),
    # layout
    "reshape": _reshape_to_output, "expand_dims": _reshape_to_output, "squeeze": _reshape_to_output,
    "flatten2d": _reshape_to_output, "transpose": _transpose, "tile": _tile, "concat": _concat,
    "stack": _stack, "split": _split, "slice_by_index": _slice_by_index, "slice_by_size": _slice_by_size,
    "gather": _gather, "gather_along_axis": _gather_along_axis, "pad": _pad, "select": _select,
    "fill": _fill,
}


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = x.prod(dim=dim, keepdim=keep)
    return x


#: Ops whose value is fixed at load: stored (``const``) or decompressed by coremltools.
CONSTANT_OPS = frozenset({"const", "constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_cast",
                          "constexpr_sparse_to_dense", "constexpr_blockwise_shift_scale",
                          "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale",
                          "constexpr_cpalettizer_to_lut"})
SUPPORTED_OPS: frozenset[str] = frozenset(KERNELS) | CONSTANT_OPS


# ----------------------------------------------------------------------------------------------
# One program


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _constant_value(op) -> np.ndarray:
    """The value of a const / constexpr op's (first) output, via coremltools (decompressed)."""
    if op.op_type == "const":
        return op.outputs[0].val
    if hasattr(op, "materialized_val_inference"):
        return op.materialized_val_inference()
    return op.value_inference()


def _to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype != object:
        if value.dtype == np.uint16:
            value = value.astype(np.int32)
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return torch.from_numpy(np.asarray(value))
    return value


class _Step:
    __slots__ = ("op", "kernel", "inputs", "outputs", "dtypes")

    def __init__(self, op, kernel, inputs, outputs, dtypes) -> None:
        self.op, self.kernel, self.inputs, self.outputs, self.dtypes = op, kernel, inputs, outputs, dtypes


class ProgramStats:
    """Counts over every call of one model: values rounded to fp16 that overflowed to inf or
    underflowed to zero (in any op), and non-finite values in the model's outputs."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_nonfinite_op: str | None = None

    def as_metrics(self, prefix: str) -> dict[str, float]:
        keys = ("calls", "fp16_overflows", "fp16_underflows", "nonfinite_intermediates", "nonfinite_outputs")
        return {f"{prefix}_{key}": float(self.counts[key]) for key in keys}


class ProgramExecutor:
    """One ML program (the main function of a saved ``.mlpackage``, or one pipeline stage's spec).

    ``__call__(**inputs)`` takes numpy arrays by input name (cast to the declared dtype; shape must
    match) and returns every declared output as float32 numpy (as ``CoreMLModel`` does).

    Raises:
        UnsupportedOp: an op type outside ``SUPPORTED_OPS`` (named, with the package path).
    """

    def __init__(self, program, where: str, stats: ProgramStats | None = None, trace_nonfinite: bool = False) -> None:
        self.where = where
        self.trace_nonfinite = trace_nonfinite  # check every op's output, not only fp16 ones (slower)
        self.stats = stats or ProgramStats()
        function = program.functions["main"]
        self.input_names = list(function.inputs)
        self.input_dtypes = {name: _TORCH_DTYPES[_dtype_name(var)] for name, var in function.inputs.items()}
        self.input_vars = dict(function.inputs)
        self.output_vars = list(function.outputs)
        unknown = sorted({op.op_type for op in function.operations} - SUPPORTED_OPS)
        if unknown:
            raise UnsupportedOp(f"{where}: op type(s) {', '.join(unknown)} are not supported by the Core ML program "
                                f"executor (diaropt.backends.coreml_program; supported: {len(SUPPORTED_OPS)} types)")
        self.constants: dict[int, Any] = {}
        self.steps: list[_Step] = []
        for op in function.operations:
            if op.op_type in CONSTANT_OPS:
                value = _constant_value(op)
                self.constants[id(op.outputs[0])] = _to_torch(value)
                continue
            if op.blocks:
                raise UnsupportedOp(f"{where}: op {op.name} ({op.op_type}) has nested blocks")
            inputs = []
            for name, var in op.inputs.items():
                inputs.append((name, tuple(var) if isinstance(var, (list, tuple)) else var))
            dtypes = [_TORCH_DTYPES[_dtype_name(v)] if v.dtype is not None else None for v in op.outputs]
            self.steps.append(_Step(op, KERNELS[op.op_type], inputs, list(op.outputs), dtypes))

    def _value(self, var, env: dict[int, Any]) -> Any:
        key = id(var)
        if key in env:
            return env[key]
        if key in self.constants:
            return self.constants[key]
        if var.val is not None:  # a const folded into the var (scalars, strings)
            value = _to_torch(var.val)
            self.constants[key] = value
            return value
        raise KeyError(f"{self.where}: {var.name} is read before it is computed")

    def _count_fp16(self, value: torch.Tensor, rounded: torch.Tensor) -> None:
        """fp16 overflows (finite -> inf) and underflows (non-zero -> 0) of one rounding."""
        if not value.is_floating_point():
            return
        counts = self.stats.counts
        if bool(torch.isinf(rounded).any()):
            counts["fp16_overflows"] += int((torch.isfinite(value) & torch.isinf(rounded)).sum())
        lost = int(torch.count_nonzero(value)) - int(torch.count_nonzero(rounded))
        if lost > 0:
            counts["fp16_underflows"] += lost

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        env: dict[int, Any] = {}
        for name in self.input_names:
            var = self.input_vars[name]
            value = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.input_dtypes[name])
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{self.where}: input {name!r} has shape {tuple(value.shape)}, the program declares "
                                 f"{tuple(var.shape)}")
            env[id(var)] = value
        counts = self.stats.counts
        with torch.no_grad():
            for step in self.steps:
                args = {}
                for name, var in step.inputs:
                    if isinstance(var, tuple):
                        args[name] = tuple(_compute(self._value(v, env)) for v in var)
                    else:
                        args[name] = _compute(self._value(var, env))
                try:
                    result = step.kernel(step.op, args)
                except UnsupportedOp as error:
                    raise UnsupportedOp(f"{self.where}: op {step.op.name}: {error}") from None
                results = result if isinstance(result, tuple) else (result,)
                for var, dtype, value in zip(step.outputs, step.dtypes, results):
                    value = _as_tensor(value)
                    if dtype is not None and value.dtype != dtype:
                        rounded = value.to(dtype)
                        if dtype == torch.float16:
                            self._count_fp16(value, rounded)
                        value = rounded
                    if (self.trace_nonfinite or value.dtype == torch.float16) and value.is_floating_point() \
                            and not _all_finite(value):
                        counts["nonfinite_intermediates"] += int((~torch.isfinite(value)).sum())
                        if self.stats.first_nonfinite_op is None:
                            self.stats.first_nonfinite_op = f"{step.op.op_type} {step.op.name}"
                    env[id(var)] = value
        outputs = {}
        for var in self.output_vars:
            value = self._value(var, env)
            array = value.float().numpy() if value.is_floating_point() else value.numpy().astype(np.float32)
            counts["nonfinite_outputs"] += int((~np.isfinite(array)).sum())
            outputs[var.name] = array
        counts["calls"] += 1
        return outputs


def _all_finite(value: torch.Tensor) -> bool:
    """Every element finite. The sum is a fast first test (an inf or NaN makes it non-finite); only a
    non-finite sum (which finite values can also give) is checked element by element."""
    if value.numel() == 0 or bool(torch.isfinite(value.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(value).all())


def _compute(value: Any) -> Any:
    """Float tensors computed in float32 (each op's result is rounded back to its declared dtype)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return value


# ----------------------------------------------------------------------------------------------
# A saved package: one program or a pipeline of them


def _feature_specs(features) -> list[TensorSpec]:
    return [TensorSpec(f.name, tuple(f.type.multiArrayType.shape),
                       _ARRAY_DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)))
            for f in features]


def check_pipeline(spec, where: str) -> None:
    """Core ML's pipeline validator, as far as data flows: every stage input is a pipeline input or
    an earlier stage's output with the same name, shape and dtype.

    Raises:
        PipelineTypeError: naming the stage, the feature and both declarations.
    """
    available = {s.name: (s, "the pipeline input") for s in _feature_specs(spec.description.input)}
    for number, model in enumerate(spec.pipeline.models):
        for wanted in _feature_specs(model.description.input):
            if wanted.name not in available:
                raise PipelineTypeError(f"{where}: stage {number} reads {wanted.name!r}, which no earlier stage "
                                        "produces and the pipeline does not take as input")
            have, source = available[wanted.name]
            if (have.shape, have.dtype) != (wanted.shape, wanted.dtype):
                raise PipelineTypeError(
                    f"{where}: stage {number} reads {wanted.name!r} as {wanted.dtype} {wanted.shape}, but "
                    f"{source} declares it {have.dtype} {have.shape} (Core ML refuses this pipeline at load)")
        for produced in _feature_specs(model.description.output):
            available[produced.name] = (produced, f"stage {number}")


def _load_program(spec, weights_dir: str):
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    return load_milproto(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=weights_dir)


#: Stats of the executors loaded since the last ``reset_stats()``, by label (e.g. the model kind).
_REGISTRY: dict[str, ProgramStats] = {}


def reset_stats() -> None:
    _REGISTRY.clear()


def collected_stats() -> dict[str, ProgramStats]:
    return dict(_REGISTRY)


class CoreMLProgramModel:
    """A saved ``.mlpackage`` (ML program or pipeline of ML programs) run by the executor.

    Same surface as ``backends.coreml.CoreMLModel``: ``inputs`` / ``outputs`` specs from the saved
    description, ``__call__(**arrays) -> {name: float32 array}``, ``load()``, ``sync()``.
    ``label`` names the model in ``collected_stats()``.
    """

    def __init__(self, path: Path, label: str | None = None) -> None:
        from diaropt.backends import coreml

        self.path = Path(path)
        self.label = label or self.path.stem
        self.inputs, self.outputs = coreml.io_specs(self.path)
        self.stats = ProgramStats()
        self._stages: list[ProgramExecutor] | None = None

    def load(self) -> None:
        """Read the package (weights included), decompress constants, check a pipeline's types."""
        if self._stages is not None:
            return
        import coremltools as ct

        model = ct.models.MLModel(str(self.path), skip_model_load=True)
        spec = model.get_spec()
        kind = spec.WhichOneof("Type")
        if kind == "mlProgram":
            specs = [spec]
        elif kind == "pipeline":
            check_pipeline(spec, str(self.path))
            specs = list(spec.pipeline.models)
            if any(s.WhichOneof("Type") != "mlProgram" for s in specs):
                raise UnsupportedOp(f"{self.path}: a pipeline stage is not an ML program")
        else:
            raise UnsupportedOp(f"{self.path}: model type {kind!r} is not an ML program")
        self._stages = [ProgramExecutor(_load_program(s, model.weights_dir), str(self.path), self.stats)
                        for s in specs]
        _REGISTRY[self.label] = self.stats

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.load()
        expected = {s.name for s in self.inputs}
        if set(inputs) != expected:
            raise ValueError(f"{self.path.name}: inputs {sorted(inputs)}, the model declares {sorted(expected)}")
        values = {s.name: np.asarray(inputs[s.name], dtype=s.dtype) for s in self.inputs}
        for stage in self._stages:
            values.update(stage(**{name: values[name] for name in stage.input_names}))
        return {s.name: values[s.name] for s in self.outputs}

    def sync(self) -> None:
        """Runs synchronously."""


def op_types(path: Path) -> set[str]:
    """Every op type of a saved package (pipelines: all stages), consts included."""
    from diaropt.backends import coreml

    return set(coreml.op_histogram(path, include_const=True))
