"""Build the runnable models of a configuration: the one place that turns axis values into files.

``build_models(cfg)`` resolves the backend, builds (or reuses from the content-keyed cache) the
segmentation and embedding model files for the configured frame extraction and quantization, and
returns runnable models plus graph statistics. Building never needs the target hardware: Core ML
packages are converted and inspected on any OS; only running them needs macOS, and that refusal
comes from ``backends.coreml`` with its reason.

Cache: ``<cache>/models/<key>/`` where ``key`` hashes the weights' sha256, the variant config and
the tool versions, so a second sweep over the same variants builds nothing. Entries are written to a
temporary folder and renamed into place under a file lock (no partial entry is ever visible).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock
from omegaconf import DictConfig

from diaropt.backends.base import BackendUnavailable, RunnableModel, TensorSpec, is_macos
from diaropt.models.segmentation import CHUNK_DURATION_S, NUM_POWERSET_CLASSES, SAMPLE_RATE_HZ, PyanNet

log = logging.getLogger(__name__)

CHUNK_SAMPLES = int(CHUNK_DURATION_S * SAMPLE_RATE_HZ)
NUM_FRAMES = PyanNet.num_output_frames(CHUNK_SAMPLES)
MODEL_KINDS = ("segmentation", "embedding")


class ConfigurationNotImplemented(RuntimeError):
    """A configuration value whose variant is not implemented: the job fails, naming it."""


@dataclass
class BuiltModel:
    """One model of a configuration: where its file is, what it is, how to run it."""

    kind: str
    backend: str
    path: Path | None
    info: dict[str, Any]
    load: Callable[[], RunnableModel]


@dataclass
class BuiltModels:
    backend: str
    segmentation: BuiltModel
    embedding: BuiltModel
    embedding_dim: int
    weights_sha256: dict[str, str] = field(default_factory=dict)

    def graph_metrics(self) -> dict[str, float]:
        """Flat numeric stats for tracking: ``<kind>_<stat>``."""
        metrics: dict[str, float] = {}
        for model in (self.segmentation, self.embedding):
            for key, value in model.info.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{model.kind}_{key}"] = float(value)
        return metrics


def resolve_backend(name: str) -> str:
    """``auto`` -> coreml on macOS, onnxruntime elsewhere; others unchanged."""
    if name == "auto":
        return "coreml" if is_macos() else "onnxruntime"
    return name


def io_specs(kind: str, batch_size: int, embedding_dim: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if kind == "segmentation":
        return ([TensorSpec("waveforms", (batch_size, 1, CHUNK_SAMPLES))],
                [TensorSpec("logprobs", (batch_size, NUM_FRAMES, NUM_POWERSET_CLASSES))])
    return ([TensorSpec("waveforms", (batch_size, CHUNK_SAMPLES)), TensorSpec("masks", (batch_size, NUM_FRAMES))],
            [TensorSpec("embeddings", (batch_size, embedding_dim))])


def _tool_versions() -> dict[str, str]:
    import coremltools
    import onnx
    import onnxruntime

    from diaropt import __version__

    return {"diaropt": __version__, "torch": torch.__version__, "coremltools": coremltools.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def content_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_build(cache_root: Path, payload: dict[str, Any], filename: str,
                 build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """``(path of filename, info)`` from the cache, building it with ``build(path) -> info`` if absent.

    An entry without its ``info.json`` (written last) is partial and rebuilt.
    """
    key = content_key(payload)
    entry = cache_root / key
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root / f".{key}.lock")):
        info_file = entry / "info.json"
        if info_file.is_file() and (entry / filename).exists():
            info = json.loads(info_file.read_text())
            info["cache_hit"] = 1
            return entry / filename, info
        shutil.rmtree(entry, ignore_errors=True)
        tmp = cache_root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        info = build(tmp / filename)
        info["build_s"] = time.perf_counter() - start
        info["content_key"] = key
        (tmp / "payload.json").write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
        (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        tmp.rename(entry)
    info["cache_hit"] = 0
    return entry / filename, info


def _torch_modules(cfg: DictConfig) -> tuple[dict[str, torch.nn.Module], dict[str, str], int]:
    from diaropt.models.embedding import load_embedding_model, load_segmentation_model

    segmentation, segmentation_sha = load_segmentation_model(cfg.segmentation.checkpoint)
    embedding, embedding_sha = load_embedding_model(
        _value(cfg.embedding.name), cfg.embedding.checkpoint, frame_extraction=_value(cfg.frame_extraction.mode),
        frame_batch_size=cfg.frame_extraction.batch_size)
    return ({"segmentation": segmentation, "embedding": embedding},
            {"segmentation": segmentation_sha, "embedding": embedding_sha}, embedding.embedding_dim)


def _value(item: Any) -> Any:
    return item.value if hasattr(item, "value") else item


def check_implemented(cfg: DictConfig) -> None:
    """Fail clearly on axis values whose variants are not built yet (never run something else)."""
    fusion = cfg.fusion
    pending = [f"fusion.{name}" for name in ("clean_frames_in_graph", "segmentation_with_preprocessor",
                                              "embedding_with_post", "coreml_pipeline") if fusion[name]]
    if not fusion.fbank_in_embedding_model:
        pending.append("fusion.fbank_in_embedding_model=false")
    if cfg.embedding.shared_trunk:
        pending.append("embedding.shared_trunk")
    if pending:
        raise ConfigurationNotImplemented(f"not implemented yet: {', '.join(pending)} (see the variants issue)")


def quant_mode_for(cfg: DictConfig, kind: str) -> str:
    mode = _value(cfg.quant.mode)
    return mode if cfg.quant[kind] else "fp32"


def build_models(cfg: DictConfig, cache_dir: Path | None = None) -> BuiltModels:
    """Build (or reuse) both models of ``cfg`` for its backend; nothing is run here."""
    from diaropt.assets import default_cache_dir

    check_implemented(cfg)
    backend = resolve_backend(_value(cfg.backend.name))
    compute_unit = _value(cfg.compute_unit.name)
    modules, weights_sha, embedding_dim = _torch_modules(cfg)
    cache_root = Path(cache_dir or cfg.paths.cache_dir or default_cache_dir()) / "models"
    built = {}
    for kind in MODEL_KINDS:
        batch_size = cfg.segmentation.batch_size if kind == "segmentation" else cfg.embedding.batch_size
        inputs, outputs = io_specs(kind, batch_size, embedding_dim)
        mode = quant_mode_for(cfg, kind)
        module = modules[kind]
        variant = {"kind": kind, "weights_sha256": weights_sha[kind], "quant": mode, "backend": backend,
                   "tools": _tool_versions()}
        if kind == "embedding":
            variant.update(embedding=_value(cfg.embedding.name), frame_extraction=_value(cfg.frame_extraction.mode),
                           frame_batch_size=cfg.frame_extraction.batch_size)
        if backend == "torch":
            built[kind] = _torch_model(kind, module, inputs, outputs, mode, compute_unit)
        elif backend == "onnxruntime":
            built[kind] = _onnx_model(kind, module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant)
        elif backend == "coreml":
            variant["batch_size"] = batch_size  # Core ML shapes are fixed
            built[kind] = _coreml_model(kind, module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant)
        else:
            raise ValueError(f"unknown backend {backend!r}")
    return BuiltModels(backend, built["segmentation"], built["embedding"], embedding_dim, weights_sha)


def _torch_model(kind, module, inputs, outputs, mode, compute_unit) -> BuiltModel:
    from diaropt.backends.torch import TorchModel

    if mode != "fp32":
        raise BackendUnavailable(f"quant={mode} is not a torch variant: the torch backend is the fp32 reference")
    device = {"cpu_only": "cpu", "cpu_and_gpu": "mps" if is_macos() else "cuda"}.get(compute_unit)
    if device is None:
        raise BackendUnavailable(f"torch has no compute unit {compute_unit}: use cpu_only or cpu_and_gpu")
    dynamic = [TensorSpec(s.name, (-1, *s.shape[1:]), s.dtype) for s in inputs]
    info = {"num_parameters": sum(p.numel() for p in module.parameters())}
    return BuiltModel(kind, "torch", None, info, lambda: TorchModel(module, dynamic, outputs, device))


def _onnx_model(kind, module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant) -> BuiltModel:
    from diaropt.backends import onnxruntime as ort_backend

    ort_backend.providers_for(compute_unit)  # refuse early: no build for a run that cannot happen

    def build(path: Path) -> dict[str, Any]:
        example = tuple(torch.zeros(s.shape) for s in inputs)
        if mode == "fp32":
            ort_backend.export_onnx(module, example, inputs, outputs, path)
            info: dict[str, Any] = {"onnx_quant_kind": "native"}
        else:
            from diaropt.variants import quant

            path, info = quant.build_onnx(module, example, inputs, outputs, path, mode, work_dir=path.parent)
        histogram = ort_backend.op_histogram(path)
        (path.parent / "op_histogram.json").write_text(json.dumps(histogram, indent=1))
        info.update(onnx_slice_ops=ort_backend.data_slice_count(path), onnx_ops=sum(histogram.values()),
                    model_size_bytes=sum(f.stat().st_size for f in path.parent.glob("*.onnx*")))
        return info

    path, info = cached_build(cache_root, variant, "model.onnx", build)
    threads = cfg.backend.num_threads
    level = cfg.backend.ort_optimization_level
    return BuiltModel(kind, "onnxruntime", path, info,
                      lambda: ort_backend.OnnxRuntimeModel(path, compute_unit, threads, info.get("ort_level", level)))


def _coreml_model(kind, module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant) -> BuiltModel:
    from diaropt.backends import coreml

    def build(path: Path) -> dict[str, Any]:
        example = tuple(torch.zeros(s.shape) for s in inputs)
        if mode in ("fp32", "fp16"):
            start = time.perf_counter()
            coreml.convert_coreml(module, example, inputs, outputs, path, precision=mode)
            info: dict[str, Any] = {"convert_s": time.perf_counter() - start, "deployment_target": "macOS13"}
        else:
            from diaropt.variants import quant

            path, info = quant.build_coreml(module, example, inputs, outputs, path, mode)
        histogram = coreml.op_histogram(path)
        (path.parent / "op_histogram.json").write_text(json.dumps(histogram, indent=1))
        info.update(coreml_slice_by_index_ops=histogram.get("slice_by_index", 0),
                    coreml_ops=sum(histogram.values()), model_size_bytes=coreml.package_size_bytes(path))
        return info

    path, info = cached_build(cache_root, variant, "model.mlpackage", build)
    return BuiltModel(kind, "coreml", path, info, lambda: coreml.CoreMLModel(path, compute_unit))
