"""Build the runnable models of a configuration: the one place that turns axis values into files.

``build_models(cfg)`` resolves the backend, builds (or reuses from the content-keyed cache) the
segmentation and embedding model files for the configured frame extraction and quantization, and
returns runnable models plus graph statistics. Building never needs the target hardware: Core ML
packages are converted and inspected on any OS; only running them needs macOS, and that refusal
comes from ``backends.coreml`` with its reason.

Cache: ``<cache>/models/<key>/`` where ``key`` hashes the weights' sha256, the variant config and
the tool versions, so a second sweep over the same variants builds nothing. A cache hit builds no
torch module and does not import torch: the weights' sha256 is the pinned asset's (verified by
``diaropt.assets``) or the user checkpoint file's, the shapes come from ``models.constants``, and
the modules are loaded inside a builder only (``fusion_plan.StageSpec.module``). Entries are written to a
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
from typing import TYPE_CHECKING, Any, Callable

from filelock import FileLock
from omegaconf import DictConfig

from diaropt import progress
from diaropt.backends.base import BackendUnavailable, RunnableModel, TensorSpec, is_macos
from diaropt.variants import fusion_plan as fusion  # torch-free: torch loads only when a model is built
from diaropt.variants.quant import refuse_unbuildable, w8a8_onnx_key  # torch-free too

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


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
    """The models a configuration runs. ``segmentation`` is the chain of every stage (kind
    ``pipeline``) under ``fusion.coreml_pipeline``; ``preprocessor`` / ``fbank`` exist only when the
    fusion axis makes them separate models; ``stages`` lists every stage model built, in run order;
    ``fusion`` says which switches the models realize (``variants.fusion.SWITCHES``: 0/1)."""

    backend: str
    segmentation: BuiltModel
    embedding: BuiltModel
    embedding_dim: int
    weights_sha256: dict[str, str] = field(default_factory=dict)
    preprocessor: BuiltModel | None = None
    fbank: BuiltModel | None = None
    stages: list[BuiltModel] = field(default_factory=list)
    fusion: dict[str, int] = field(default_factory=dict)

    def models(self) -> list[BuiltModel]:
        """Every model of the configuration once: the chain or segmentation, each stage, the embedding.

        Keyed by file: in a ``fusion.coreml_pipeline`` build the embedding entry only reports the
        embedding stage's package (it runs inside the chain), so the stage itself is listed."""
        unique: dict[Any, BuiltModel] = {}
        for model in (self.segmentation, *self.stages, self.embedding):
            unique.setdefault(model.path if model.path is not None else id(model), model)
        return list(unique.values())

    def graph_metrics(self) -> dict[str, float]:
        """Flat numeric stats for tracking: ``<kind>_<stat>`` per model, ``fusion_<switch>`` (0/1)."""
        metrics: dict[str, float] = {f"fusion_{name}": float(on) for name, on in self.fusion.items()}
        for model in self.models():
            for key, value in model.info.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{model.kind}_{key}"] = float(value)
        return metrics


def resolve_backend(name: str) -> str:
    """``auto`` -> coreml on macOS, onnxruntime elsewhere; others unchanged."""
    if name == "auto":
        return "coreml" if is_macos() else "onnxruntime"
    return name


def resolve_compute_unit(name: str, backend: str) -> str:
    """``auto`` -> ``all`` for a Core ML job (CPU, GPU and Neural Engine: what an app ships with),
    ``cpu_only`` for ONNX Runtime and torch (their CPU path; other units need the Core ML EP or a
    GPU); other names unchanged. ``backend`` is the resolved backend (:func:`resolve_backend`)."""
    if name == "auto":
        return "all" if backend == "coreml" else "cpu_only"
    return name


def _tool_versions() -> dict[str, str]:
    """Versions that enter every cache key. Read from the installed distributions' metadata (the same
    strings as the modules' ``__version__``): importing coremltools only for its version cost ~1 s of
    every start-up (benchmarks/results/issue19_phase1/issue19_phase1_analysis.md)."""
    from importlib.metadata import version

    from diaropt import __version__

    return {"diaropt": __version__, **{name: version(name) for name in ("torch", "coremltools", "onnx", "onnxruntime")}}


def content_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_build(cache_root: Path, payload: dict[str, Any], filename: str,
                 build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """``(path of filename, info)`` from the cache, building it with ``build(path) -> info`` if absent.

    An entry whose files do not match its ``manifest.json`` (sha256 of every file, written last) is
    partial or corrupt and rebuilt.
    """
    from diaropt.pipeline.cache import verify_manifest, write_manifest

    key = content_key(payload)
    entry = cache_root / key
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root / f".{key}.lock")):
        info_file = entry / "info.json"
        if entry.exists():
            bad = verify_manifest(entry)
            if not bad and info_file.is_file() and (entry / filename).exists():
                info = json.loads(info_file.read_text())
                info["cache_hit"] = 1
                return entry / filename, info
            log.warning("model cache entry %s is partial or corrupt (%s); rebuilding", entry, ", ".join(bad[:5]))
        shutil.rmtree(entry, ignore_errors=True)
        for stale in cache_root.glob(f".tmp-{key}-*"):  # left by a killed build of this key (we hold its lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_root / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            start = time.perf_counter()
            what = " ".join(str(payload[k]) for k in ("kind", "backend", "quant") if k in payload)
            log.info("building %s (cache entry %s)", what, key)
            with progress.step(f"building {what}"):
                info = build(tmp / filename)
            info["build_s"] = time.perf_counter() - start
            info["content_key"] = key
            (tmp / "payload.json").write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
            (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
            write_manifest(tmp)
            tmp.rename(entry)
        except BaseException:  # a failed build (full disk, refusal, Ctrl-C) leaves no temporary folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    info["cache_hit"] = 0
    return entry / filename, info


COREML_BUILD_REVISION = 3  # 3: log-softmax kept fp32 in fp16 builds
ONNX_BUILD_REVISION = 2  # 2: fp16 / fp16_selective graphs from onnxruntime's float16 converter


def sweep_stale_builds(cache_root: Path) -> list[Path]:
    """Remove the ``.tmp-<key>-<pid>`` folders of builds that were killed (SIGKILL, power loss); returns them.

    A folder is stale when its key's lock can be taken at once: no process is building that key now
    (works across processes and hosts sharing the cache, unlike a pid check).
    """
    from filelock import Timeout

    removed = []
    for tmp in sorted(Path(cache_root).glob(".tmp-*")):
        key = tmp.name[len(".tmp-"):].rsplit("-", 1)[0]
        try:
            with FileLock(str(Path(cache_root) / f".{key}.lock"), timeout=0):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        except Timeout:  # being built right now
            continue
    if removed:
        log.warning("removed %d temporary build folder(s) left by killed builds in %s", len(removed), cache_root)
    return removed


def _torch_modules(cfg: DictConfig) -> tuple[dict[str, torch.nn.Module], dict[str, str], int]:
    """Both torch modules with their weights (imports torch; only a build needs them)."""
    from diaropt.models.embedding import load_embedding_model, load_segmentation_model

    segmentation, segmentation_sha = load_segmentation_model(cfg.segmentation.checkpoint)
    embedding, embedding_sha = load_embedding_model(
        _value(cfg.embedding.name), cfg.embedding.checkpoint, frame_extraction=_value(cfg.frame_extraction.mode),
        frame_batch_size=cfg.frame_extraction.batch_size)
    return ({"segmentation": segmentation, "embedding": embedding},
            {"segmentation": segmentation_sha, "embedding": embedding_sha}, embedding.embedding_dim)


def _checkpoint_sha256(checkpoint: str | None, asset_key: str | None, what: str) -> str:
    """The sha256 of the weights file a model loads, without loading it: a pinned asset's (verified
    against ``diaropt.assets`` by ``asset_path``) or the user checkpoint file's (the digest
    ``models.loading.load_into`` returns for the same file)."""
    from diaropt.assets import ASSETS, asset_path, sha256_of

    if checkpoint is None:
        if asset_key is None:
            from diaropt.models.loading import CheckpointError

            raise CheckpointError(f"{what} has no pinned weights: set its checkpoint (a local path or a hub id)")
        asset_path(asset_key)  # fetched and verified
        (member,) = ASSETS[asset_key][1]
        return member.sha256
    local = Path(checkpoint).expanduser()
    if local.is_file():
        return sha256_of(local)
    from diaropt.models.loading import resolve_checkpoint  # a hub id: downloaded by huggingface_hub

    return sha256_of(resolve_checkpoint(checkpoint))


def _model_sources(cfg: DictConfig) -> tuple[fusion.ModelSource, fusion.ModelSource, dict[str, str], int]:
    """(segmentation, embedding) as lazily loaded ``ModelSource`` s, the weights' sha256 and the
    embedding size, without torch. The modules load together on first use (``_torch_modules``); a
    checkpoint whose digest differs from the one the cache key was made with is refused."""
    from diaropt.models.constants import EMBEDDING_GEOMETRY

    name = _value(cfg.embedding.name)
    if name not in EMBEDDING_GEOMETRY:
        raise ValueError(f"unknown embedding model {name!r}; expected one of {sorted(EMBEDDING_GEOMETRY)}")
    geometry = EMBEDDING_GEOMETRY[name]
    weights_sha = {"segmentation": _checkpoint_sha256(cfg.segmentation.checkpoint, "segmentation_3_0",
                                                      "the segmentation model"),
                   "embedding": _checkpoint_sha256(cfg.embedding.checkpoint, geometry.asset_key,
                                                   f"embedding model {name!r}")}

    @fusion.memoized
    def modules() -> dict[str, Any]:
        loaded, digests, _ = _torch_modules(cfg)
        if digests != weights_sha:
            raise RuntimeError(f"checkpoint changed while building: sha256 {digests} != {weights_sha}")
        return loaded

    return (fusion.ModelSource(lambda: modules()["segmentation"]),
            fusion.ModelSource(lambda: modules()["embedding"], geometry), weights_sha, geometry.embedding_dim)


def _value(item: Any) -> Any:
    return item.value if hasattr(item, "value") else item


def quant_mode_for(cfg: DictConfig, kind: str) -> str:
    mode = _value(cfg.quant.mode)
    return mode if cfg.quant[kind] else "fp32"


def build_models(cfg: DictConfig, cache_dir: Path | None = None) -> BuiltModels:
    """Build (or reuse) every model of ``cfg`` for its backend; nothing is run here.

    The fusion axis (``variants.fusion``) decides which models: segmentation (+ preprocessor),
    a standalone preprocessor, a separate fbank model, the embedding model, and for
    ``fusion.coreml_pipeline`` their chain (``BuiltModels.segmentation`` is then the chain).
    """
    from diaropt.assets import default_cache_dir

    backend = resolve_backend(_value(cfg.backend.name))
    compute_unit = resolve_compute_unit(_value(cfg.compute_unit.name), backend)
    plan = fusion.FusionPlan.from_config(cfg, backend)
    plan.check()
    for kind in ("segmentation", "embedding"):  # before any work: a mode the backend or host cannot build
        refuse_unbuildable(quant_mode_for(cfg, kind), backend)
    segmentation_source, embedding_source, weights_sha, embedding_dim = _model_sources(cfg)
    cache_root = Path(cache_dir or cfg.paths.cache_dir or default_cache_dir()) / "models"
    if cache_root.is_dir():
        sweep_stale_builds(cache_root)
    stages = fusion.stage_specs(plan, segmentation_source, embedding_source, cfg.segmentation.batch_size,
                                cfg.embedding.batch_size)
    built: dict[str, BuiltModel] = {}
    for stage in stages:
        mode = quant_mode_for(cfg, stage.quant_kind) if stage.quant_kind else "fp32"  # no weights / exact: fp32
        weights = weights_sha["segmentation" if stage.kind in ("segmentation", "segmentation_sinc", "preprocessor")
                              else "embedding"]
        variant = {"kind": stage.kind, "weights_sha256": weights, "quant": mode, "backend": backend,
                   "tools": _tool_versions(), **stage.variant}
        if mode == "int4":  # the block size changes the weights (Core ML, and the faithful ONNX graph)
            variant["int4_block_size"] = int(cfg.quant.int4_block_size)
        if mode == "w8a8" and backend == "onnxruntime":  # the calibration data and quantizer options
            variant["w8a8_onnx"] = w8a8_onnx_key()
        if stage.kind in ("embedding", "fbank"):  # not embedding_pool: it never sees the fbank
            variant.update(embedding=_value(cfg.embedding.name), frame_extraction=_value(cfg.frame_extraction.mode),
                           frame_batch_size=cfg.frame_extraction.batch_size)
        # which switches this model realizes (info.json; numeric flags reach the tracked graph metrics)
        extra: dict[str, Any] = {"fusion": list(stage.switches), **{f"fusion_{n}": 1 for n in stage.switches}}
        args = (stage.kind, stage.make_module, stage.inputs, stage.outputs, mode, compute_unit)
        # fused graphs are traced on one row (their ops never read the batch size): a per-chunk embedding
        # traced at the full batch holds L x the activations (OOM at 32 chunks on a 24 GB host)
        example_batch = 1 if stage.variant else None
        if backend == "torch":  # nothing to cache, but the same content key names what the model computes
            built[stage.kind] = _torch_model(*args, extra={**extra, "content_key": content_key(variant)})
        elif backend == "onnxruntime":
            variant["onnx_build_revision"] = ONNX_BUILD_REVISION
            built[stage.kind] = _onnx_model(*args, cfg, cache_root, variant, extra=extra, example_batch=example_batch)
        elif backend == "coreml":
            variant["batch_size"] = stage.inputs[0].shape[0]  # Core ML shapes are fixed
            # 2: explicit fp32 output dtypes and the fbank kept in fp32 in fp16/compressed builds
            variant["coreml_build_revision"] = COREML_BUILD_REVISION
            built[stage.kind] = _coreml_model(*args, cfg, cache_root, variant, extra=extra,
                                              example_batch=example_batch)
        else:
            raise ValueError(f"unknown backend {backend!r}")
    realized = plan.realized()
    stage_models = list(built.values())
    if plan.coreml_pipeline:
        chain = _chain_model(backend, stage_models, cache_root, compute_unit)
        # the pipeline runs every stage; the embedding entry only reports its model
        embedding, spec = built["embedding"], stages[-1]
        embedding_entry = BuiltModel("embedding", backend, embedding.path, embedding.info,
                                     lambda: fusion.InChain(spec.inputs, spec.outputs))
        return BuiltModels(backend, chain, embedding_entry, embedding_dim, weights_sha, stages=stage_models,
                           fusion=realized)
    embedding = built["embedding"]
    if "fbank" in built:  # two models in sequence in the embedding stage: fp32 fbank, then the network
        fbank_load, network_load = built["fbank"].load, embedding.load
        embedding = BuiltModel("embedding", backend, embedding.path, embedding.info,
                               lambda: fusion.ChainedModel([fbank_load(), network_load()]))
    if "embedding_pool" in built:
        embedding = _tiled_embedding(cfg, embedding_source.geometry, embedding, built["embedding_pool"])
    segmentation = built["segmentation"]
    if "segmentation_sinc" in built:
        segmentation = _shared_sinc_segmentation(built["segmentation_sinc"], segmentation)
    return BuiltModels(backend, segmentation, embedding, embedding_dim, weights_sha,
                       preprocessor=built.get("preprocessor"), fbank=built.get("fbank"), stages=stage_models,
                       fusion=realized)


def _tiled_embedding(cfg: DictConfig, geometry: Any, trunk: BuiltModel, pool: BuiltModel) -> BuiltModel:
    """``embedding.tiled_trunk``: the trunk and the pooling model as one embedding-stage model
    (``pipeline.embedding.TiledTrunk``). The chunk step must be a whole number of trunk frames
    (``geometry``: the network's ``models.constants.EmbeddingGeometry``)."""
    from diaropt.models.constants import SAMPLE_RATE_HZ
    from diaropt.pipeline.embedding import TiledTrunk

    frame_hop_samples = int(geometry.frame_hop_samples)
    step_samples = cfg.segmentation.step_s * SAMPLE_RATE_HZ
    if abs(step_samples / frame_hop_samples - round(step_samples / frame_hop_samples)) > 1e-6:
        raise BackendUnavailable(
            f"embedding.tiled_trunk: segmentation.step_s={cfg.segmentation.step_s} is not a whole number of "
            f"{_value(cfg.embedding.name)}'s trunk frames ({1000 * frame_hop_samples / SAMPLE_RATE_HZ:g} ms each), "
            "so a chunk's frames would not line up with its tiles'")
    info = {**trunk.info, "content_key": content_key({"trunk": trunk.info.get("content_key"),
                                                      "pool": pool.info.get("content_key")})}
    return BuiltModel("embedding", trunk.backend, trunk.path, info,
                      lambda: TiledTrunk(trunk.load(), pool.load(), frame_hop_samples))


def _shared_sinc_segmentation(front: BuiltModel, rest: BuiltModel) -> BuiltModel:
    """``segmentation.sinc_shared``: the sinc convolution and the rest of the segmentation model as one
    segmentation-stage model (``pipeline.segmentation.SharedSinc``), reported as the rest's file with
    a content key of both."""
    from diaropt.pipeline.segmentation import SharedSinc

    info = {**rest.info, "content_key": content_key({"front": front.info.get("content_key"),
                                                     "rest": rest.info.get("content_key")})}
    return BuiltModel("segmentation", rest.backend, rest.path, info, lambda: SharedSinc(front.load(), rest.load()))


def _chain_model(backend: str, stages: list[BuiltModel], cache_root: Path, compute_unit: str) -> BuiltModel:
    """The stages as one model: a Core ML pipeline package, or a ``ChainedModel`` of the loaded stages."""

    info: dict[str, Any] = {"stages": [s.kind for s in stages], "fusion_coreml_pipeline": 1,
                            "fusion": ["coreml_pipeline"]}
    if backend != "coreml":
        loads = [fusion.memoized(s.load) for s in stages]
        for stage, load in zip(stages, loads):
            stage.load = load  # the chain and each stage's entry share the loaded model
        info["chain"] = f"{backend}: the stage models run back to back in one call (no pipeline container)"
        return BuiltModel("pipeline", backend, None, info, lambda: fusion.ChainedModel([load() for load in loads]))
    from diaropt.backends import coreml

    payload = {"kind": "pipeline", "stages": [s.info["content_key"] for s in stages], "tools": _tool_versions()}

    def build(path: Path) -> dict[str, Any]:
        from diaropt.variants.fusion import make_coreml_pipeline  # coremltools; not in the torch-free plan

        make_coreml_pipeline([s.path for s in stages], path)
        histogram = coreml.op_histogram(path)
        (path.parent / "op_histogram.json").write_text(json.dumps(histogram, indent=1))
        return {**info, "coreml_ops": sum(histogram.values()),
                "coreml_slice_by_index_ops": histogram.get("slice_by_index", 0),
                "model_size_bytes": coreml.package_size_bytes(path),
                "stage_content_keys": payload["stages"]}

    path, built_info = cached_build(cache_root, payload, "model.mlpackage", build)
    return BuiltModel("pipeline", "coreml", path, built_info, lambda: coreml_runnable(path, compute_unit, "pipeline"))


def _torch_model(kind, make_module, inputs, outputs, mode, compute_unit,
                 extra: dict[str, Any] | None = None) -> BuiltModel:
    from diaropt.backends.torch import TorchModel

    if mode != "fp32":
        raise BackendUnavailable(f"quant={mode} is not a torch variant: the torch backend is the fp32 reference")
    device = {"cpu_only": "cpu", "cpu_and_gpu": "mps" if is_macos() else "cuda"}.get(compute_unit)
    if device is None:
        raise BackendUnavailable(f"torch has no compute unit {compute_unit}: use cpu_only or cpu_and_gpu")
    dynamic = [TensorSpec(s.name, (-1, *s.shape[1:]), s.dtype) for s in inputs]
    module = make_module()
    info = {"num_parameters": sum(p.numel() for p in module.parameters()), **(extra or {})}
    return BuiltModel(kind, "torch", None, info, lambda: TorchModel(module, dynamic, outputs, device))


def _examples(inputs: list[TensorSpec], batch: int | None) -> tuple[torch.Tensor, ...]:
    """Zero example inputs at the specs' shapes, or with ``batch`` rows (the converted/exported model
    keeps the specs' shapes: ONNX a dynamic batch axis, Core ML the declared fixed shape)."""
    import torch

    return tuple(torch.zeros(s.shape if batch is None else (batch, *s.shape[1:])) for s in inputs)


def _onnx_model(kind, make_module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant,
                extra: dict[str, Any] | None = None, example_batch: int | None = None) -> BuiltModel:
    from diaropt.backends import onnxruntime as ort_backend

    ort_backend.providers_for(compute_unit)  # refuse early: no build for a run that cannot happen

    def build(path: Path) -> dict[str, Any]:
        module = make_module()  # the torch module: only on a cache miss
        example = _examples(inputs, example_batch)
        if mode == "fp32":
            ort_backend.export_onnx(module, example, inputs, outputs, path)
            info: dict[str, Any] = {"onnx_quant_kind": "native"}
        else:
            from diaropt.variants.quant_onnx import build_onnx

            options = {"coreml_block_size": variant["int4_block_size"]} if "int4_block_size" in variant else {}
            path, info = build_onnx(module, example, inputs, outputs, path, mode, work_dir=path.parent, **options)
        histogram = ort_backend.op_histogram(path)
        (path.parent / "op_histogram.json").write_text(json.dumps(histogram, indent=1))
        info.update(onnx_slice_ops=ort_backend.data_slice_count(path), onnx_ops=sum(histogram.values()),
                    model_size_bytes=sum(f.stat().st_size for f in path.parent.glob("*.onnx*")), **(extra or {}))
        return info

    path, info = cached_build(cache_root, variant, "model.onnx", build)
    # overlapped stages: one intra-op thread per session (segmentation and embedding run side by side)
    threads = cfg.backend.num_threads or (1 if cfg.backend.get("overlap_stages", False) else 0)
    level = cfg.backend.ort_optimization_level
    arena = cfg.backend.ort_memory_arena
    spinning = cfg.backend.get("ort_allow_spinning", None)
    keep_optimized = bool(cfg.backend.get("ort_cache_optimized", True))
    spin_stop = bool(cfg.backend.get("ort_force_spinning_stop", True))
    return BuiltModel(kind, "onnxruntime", path, info,
                      lambda: ort_backend.OnnxRuntimeModel(path, compute_unit, threads, info.get("ort_level", level),
                                                           arena, allow_spinning=spinning,
                                                           cache_optimized=keep_optimized,
                                                           force_spinning_stop=spin_stop))


def _coreml_model(kind, make_module, inputs, outputs, mode, compute_unit, cfg, cache_root, variant,
                  extra: dict[str, Any] | None = None, example_batch: int | None = None) -> BuiltModel:
    from diaropt.backends import coreml

    def build(path: Path) -> dict[str, Any]:
        module = make_module()  # the torch module: only on a cache miss
        example = _examples(inputs, example_batch)
        if mode in ("fp32", "fp16"):
            start = time.perf_counter()
            coreml.convert_coreml(module, example, inputs, outputs, path, precision=mode)
            info: dict[str, Any] = {"convert_s": time.perf_counter() - start, "deployment_target": "macOS13"}
        else:
            from diaropt.variants.quant_coreml import build_coreml

            options = {"block_size": variant["int4_block_size"]} if "int4_block_size" in variant else {}
            path, info = build_coreml(module, example, inputs, outputs, path, mode, **options)
        histogram = coreml.op_histogram(path)
        (path.parent / "op_histogram.json").write_text(json.dumps(histogram, indent=1))
        info.update(coreml_slice_by_index_ops=histogram.get("slice_by_index", 0),
                    coreml_ops=sum(histogram.values()), model_size_bytes=coreml.package_size_bytes(path),
                    **(extra or {}))
        return info

    path, info = cached_build(cache_root, variant, "model.mlpackage", build)
    return BuiltModel(kind, "coreml", path, info, lambda: coreml_runnable(path, compute_unit, kind))


def coreml_runnable(path: Path, compute_unit: str, label: str) -> RunnableModel:
    """A saved package as a runnable model: Apple's Core ML on macOS (compiled and loaded with the
    compute unit); elsewhere the project's ML-program executor (``backends.coreml_program``), whose
    numerics a job tags ``coreml_program`` and whose timings are never logged (``diaropt.provenance``)."""
    if is_macos():
        from diaropt.backends import coreml

        return coreml.CoreMLModel(path, compute_unit)
    from diaropt.backends.coreml_program import CoreMLProgramModel

    return CoreMLProgramModel(path, label)
