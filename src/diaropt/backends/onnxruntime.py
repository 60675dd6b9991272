"""The ONNX Runtime backend: export from torch, run on CPU / CUDA / the Core ML execution provider.

Running a cached model needs neither torch nor the ``onnx`` package: both are imported inside the
functions that export or inspect graphs (a start-up cost of seconds otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from diaropt.files import atomic_path, sha256_of
from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

OPSET = 17
# Core ML EP compute units, by diaropt's compute_unit names.
COREML_EP_UNITS = {"cpu_only": "CPUOnly", "cpu_and_gpu": "CPUAndGPU", "cpu_and_ne": "CPUAndNeuralEngine", "all": "ALL"}


# diaropt's optimization level names -> ort.GraphOptimizationLevel members, highest first.
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                       "disable": "ORT_DISABLE_ALL"}


def export_onnx(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                outputs: list[TensorSpec], path: Path, dynamic_batch: bool = True) -> Path:
    """Export ``module`` (traced with the TorchScript exporter) to ``path``; batch axis dynamic."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [spec.name for spec in inputs + outputs]
    dynamic_axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about static shapes are intended
        torch.onnx.export(module.eval(), example_inputs, str(path), input_names=[s.name for s in inputs],
                          output_names=[s.name for s in outputs], dynamic_axes=dynamic_axes, opset_version=OPSET,
                          dynamo=False)
    onnx.checker.check_model(str(path))
    return path


def op_histogram(path: Path) -> dict[str, int]:
    """Count of each ONNX node type in the main graph."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def data_slice_count(path: Path) -> int:
    """Slice nodes that cut tensors, leaving out shape arithmetic (Slice of a Shape output) that the
    exporter emits for dynamic batch sizes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shape_outputs = {out for node in graph.node if node.op_type == "Shape" for out in node.output}
    return sum(1 for node in graph.node if node.op_type == "Slice" and node.input[0] not in shape_outputs)


def providers_for(compute_unit: str) -> list:
    """Execution providers for a compute unit, or ``BackendUnavailable`` if this host lacks them.

    cpu_only -> CPU; cpu_and_gpu -> CUDA (or the Core ML EP on macOS); cpu_and_ne / all -> the Core
    ML EP (macOS only). Never a silent fallback to CPU.
    """
    available = ort.get_available_providers()
    if compute_unit == "cpu_only":
        return ["CPUExecutionProvider"]
    if compute_unit not in COREML_EP_UNITS:
        raise ValueError(f"unknown compute_unit {compute_unit!r}; expected one of {sorted(COREML_EP_UNITS)}")
    if is_macos() and "CoreMLExecutionProvider" in available:
        options = {"MLComputeUnits": COREML_EP_UNITS[compute_unit], "ModelFormat": "MLProgram"}
        return [("CoreMLExecutionProvider", options), "CPUExecutionProvider"]
    if compute_unit == "cpu_and_gpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BackendUnavailable(
        f"onnxruntime compute_unit {compute_unit} needs the Core ML execution provider (macOS) "
        f"or, for cpu_and_gpu, CUDA; this host offers {available}")


class OnnxRuntimeModel:
    """An ``InferenceSession`` with named numpy inputs/outputs.

    ``num_threads`` fixes intra-op threads (0: ONNX Runtime's default), since thread count is part of
    every measurement. ``allow_spinning``: ``session.intra_op.allow_spinning`` (None: ONNX Runtime's
    default, on; spinning threads cost time when other processes hold the cores).
    ``force_spinning_stop``: ``session.force_spinning_stop``, the session's threads stop spinning as
    soon as its ``run`` returns (they still spin within a run). Each session has its own intra-op
    pool, so without it the pool of the model that just ran keeps spinning on the cores the next
    model needs (segmentation front/rest, trunk/pooling alternate every batch).
    """

    def __init__(self, path: Path, compute_unit: str = "cpu_only", num_threads: int = 0,
                 optimization_level: str = "all", memory_arena: bool = True,
                 allow_spinning: bool | None = None, cache_optimized: bool = True,
                 force_spinning_stop: bool = False) -> None:
        self.path = Path(path)
        providers = providers_for(compute_unit)

        def session_options() -> ort.SessionOptions:
            options = ort.SessionOptions()
            options.enable_cpu_mem_arena = memory_arena
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
            if allow_spinning is not None:
                options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
            if force_spinning_stop:
                options.add_session_config_entry("session.force_spinning_stop", "1")
            return options

        cached = (optimized_graph_path(self.path, optimization_level)
                  if cache_optimized and providers == ["CPUExecutionProvider"] and optimization_level != "disable"
                  else None)
        #: "cached" (optimized graph loaded, optimizations off), "saved" (optimized now and saved), "online"
        self.optimized_graph = "online"
        self.session = _load_optimized(cached, session_options(), providers) if cached is not None else None
        if self.session is not None:
            self.optimized_graph = "cached"
        else:
            options = session_options()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                       OPTIMIZATION_LEVELS[optimization_level])
            tmp = None
            if cached is not None and os.access(cached.parent, os.W_OK):
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
                options.optimized_model_filepath = str(tmp)
                options.log_severity_level = 3  # the "hardware specific" warning: the file is keyed by CPU flags
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
            if tmp is not None:
                self.optimized_graph = "saved" if _publish_optimized(tmp, cached) else "online"
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _dtype(i.type)) for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _dtype(o.type)) for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {spec.name: np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype) for spec in self.inputs}
        values = self.session.run(None, feeds)
        return {spec.name: value for spec, value in zip(self.outputs, values)}

    def sync(self) -> None:
        """``run`` is synchronous."""


def _cpu_flags() -> str:
    """The CPU's feature flags (what an ``ORT_ENABLE_ALL`` graph's NCHWc layout depends on)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def optimized_graph_path(path: Path, optimization_level: str) -> Path:
    """Where the optimized graph of ``path`` is kept: beside it, keyed by ONNX Runtime's version, the CPU
    flags, the level and the model file (size, mtime), so an upgrade, another CPU or a rebuilt model
    never loads a stale graph (ONNX Runtime's offline optimization; its graphs are hardware specific)."""
    stat = path.stat()
    key = hashlib.sha256(json.dumps([ort.__version__, _cpu_flags(), optimization_level, stat.st_size,
                                     stat.st_mtime_ns]).encode()).hexdigest()[:16]
    return path.with_name(f"{path.stem}.ort-{optimization_level}-{key}.onnx")


def _load_optimized(cached: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession | None:
    """A session from a saved optimized graph (optimizations off: they are in the file), or None when
    it is absent, does not match its sha256 sidecar, or does not load (then it is removed)."""
    sidecar = cached.with_name(cached.name + ".sha256")
    if not (cached.is_file() and sidecar.is_file()):
        return None
    try:
        if sha256_of(cached) != sidecar.read_text().strip():
            raise ValueError("sha256 mismatch")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(cached), options, providers=providers)
    except Exception as error:  # noqa: BLE001 - corrupt or stale: optimize again
        log.warning("%s: cached optimized graph unusable (%s); optimizing the model again", cached, error)
        for stale in (cached, sidecar):
            stale.unlink(missing_ok=True)
        return None


def _publish_optimized(tmp: Path, cached: Path) -> bool:
    """Move a just-saved optimized graph into place (sidecar first, then an atomic rename)."""
    try:
        if not tmp.is_file():
            return False
        # the sidecar is itself written atomically: a torn one would only force a re-optimization,
        # but a half-written file in the cache is what this project promises never to leave
        with atomic_path(cached.with_name(cached.name + ".sha256")) as sidecar:
            sidecar.write_text(sha256_of(tmp))
        os.replace(tmp, cached)
        return True
    except OSError as error:  # read-only or full cache: run without it
        log.debug("could not keep the optimized graph %s: %s", cached, error)
        tmp.unlink(missing_ok=True)
        return False


def _dtype(onnx_type: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32"}.get(onnx_type, onnx_type)


_PROBE_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
path, level, feeds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
options = ort.SessionOptions()
options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
values = {name: (0.1 * rng.standard_normal(shape)).astype(dtype) for name, (shape, dtype) in feeds.items()}
session.run(None, values)
"""


def probe_session(path: Path, feeds: dict[str, tuple[tuple[int, ...], str]], optimization_level: str = "all",
                  timeout_s: float = 600.0) -> str | None:
    """Build a CPU session for ``path`` at ``optimization_level`` and run it once on small random
    inputs ``{name: (shape, dtype)}``, in a child process so that a native crash cannot take the
    caller down. Returns None if that worked, else what went wrong (exit signal / error tail)."""
    args = [sys.executable, "-c", _PROBE_SCRIPT, str(path), OPTIMIZATION_LEVELS[optimization_level],
            json.dumps({name: [list(shape), dtype] for name, (shape, dtype) in feeds.items()})]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    # the last line that is not one of onnxruntime's own log lines (warnings go to stderr too)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in done.stderr.splitlines()]
    message = next((line for line in reversed(lines) if line and not re.match(r"^\d{4}-\d\d-\d\d .*\[[WIV]:onnxruntime", line)), "")
    if done.returncode < 0:
        return (f"was ended by {signal.Signals(-done.returncode).name} inside ONNX Runtime"
                + (f": {message}" if message else ""))
    return f"failed (exit {done.returncode}): {message}"


def usable_optimization_level(path: Path, feeds: dict[str, tuple[tuple[int, ...], str]], requested: str = "all",
                              timeout_s: float = 600.0) -> tuple[str, dict[str, str]]:
    """The highest optimization level, from ``requested`` down, at which ``path`` builds and runs on
    CPU (see ``probe_session``), and the outcome per level tried. Raises RuntimeError if none works."""
    levels = list(OPTIMIZATION_LEVELS)
    outcomes: dict[str, str] = {}
    for level in levels[levels.index(requested):]:
        problem = probe_session(path, feeds, level, timeout_s)
        outcomes[level] = problem or "ok"
        if problem is None:
            if level != requested:  # once per build: the level is kept in the model cache (info ort_level)
                log.info("ONNX Runtime graph optimization level %r fails on %s on this host (checked in a separate "
                         "probe process, which %s); this model runs at %r instead (logged as "
                         "ort_optimization_level.<model>, cached with the model)", requested, path.name,
                         outcomes[requested], level)
            return level, outcomes
    raise RuntimeError(f"{path}: no onnxruntime optimization level works on CPU: {outcomes}")
