"""Structured configuration: one dataclass per sweep axis, registered in Hydra's ConfigStore.

The YAML files under ``conf/<axis>/`` pick options; these dataclasses are their schema, so a typo in a
key or an unknown enum value fails before any work, naming the key and the allowed values. Where an
axis's options live:

| axis               | config node          | decided in                         |
|--------------------|----------------------|------------------------------------|
| frame_extraction   | ``frame_extraction`` | ``diaropt.models.fbank``           |
| quant              | ``quant``            | ``diaropt.variants.quant``         |
| fusion             | ``fusion``           | ``diaropt.variants.build``         |
| compute_unit       | ``compute_unit``     | ``diaropt.backends.*``             |
| backend            | ``backend``          | ``diaropt.variants.build``         |
| embedding          | ``embedding``        | ``diaropt.models.embedding``       |
| trunk sharing      | ``embedding.shared_trunk``, ``embedding.tiled_trunk`` | ``diaropt.variants.fusion``, ``diaropt.pipeline.embedding`` |
| clustering         | ``clustering``       | ``diaropt.pipeline.clustering``    |
| speaker tracking   | ``embedding.anchor_every`` | ``diaropt.pipeline.linking``   |
| dataset            | ``dataset``          | ``diaropt.data.datasets``          |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    coreml = "coreml"


class ComputeUnit(str, Enum):
    cpu_only = "cpu_only"
    cpu_and_gpu = "cpu_and_gpu"
    cpu_and_ne = "cpu_and_ne"
    all = "all"


class FrameExtractionMode(str, Enum):
    per_frame = "per_frame"
    batched = "batched"
    strided = "strided"


class QuantMode(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    fp16_selective = "fp16_selective"
    int8 = "int8"
    int4 = "int4"
    palettize4 = "palettize4"
    palettize6 = "palettize6"
    palettize8 = "palettize8"
    w8a8 = "w8a8"
    int8_dynamic = "int8_dynamic"


class EmbeddingName(str, Enum):
    campplus = "campplus"
    wespeaker_resnet34 = "wespeaker_resnet34"


class ClusteringMethod(str, Enum):
    ahc = "ahc"
    vbx = "vbx"
    online_ema = "online_ema"


@dataclass
class BackendConfig:
    name: BackendName = BackendName.auto
    num_threads: int = 0  # 0: the runtime's default (all cores)
    ort_optimization_level: str = "all"  # disable | basic | extended | all
    # ONNX Runtime's CPU arena keeps each session's peak activations allocated after a run. Off, they
    # are freed between runs (lower peak memory) but every run allocates again: the embedding stage
    # took 64 s instead of 38 s on a 5 min file here. Small batches bound the arena instead.
    ort_memory_arena: bool = True


@dataclass
class ComputeUnitConfig:
    name: ComputeUnit = ComputeUnit.cpu_only


@dataclass
class FrameExtractionConfig:
    mode: FrameExtractionMode = FrameExtractionMode.strided
    batch_size: int = 64  # frames per extraction op in ``batched`` mode


@dataclass
class QuantConfig:
    mode: QuantMode = QuantMode.fp32
    int4_block_size: int = 32
    # which models are compressed: the segmentation model is small, the embedding model dominates
    segmentation: bool = True
    embedding: bool = True


@dataclass
class FusionConfig:
    clean_frames_in_graph: bool = False
    segmentation_with_preprocessor: bool = False
    embedding_with_post: bool = False
    coreml_pipeline: bool = False
    fbank_in_embedding_model: bool = True


@dataclass
class SegmentationConfig:
    step_s: float = 1.0
    # chunks per call. With ONNX Runtime's arena, a session keeps its largest batch's activations:
    # 8 segmentation chunks and 4 embedding rows keep a 60 min file under 2 GiB (batches of 32:
    # 3.6 GB) at about the same speed (benchmarks/results/scaling.json)
    batch_size: int = 8
    checkpoint: Optional[str] = None  # local path or hub id; None: pinned segmentation-3.0


@dataclass
class EmbeddingConfig:
    name: EmbeddingName = EmbeddingName.campplus
    # rows per call: (chunk, speaker) pairs; chunks with shared_trunk; tiles and chunks with tiled_trunk
    batch_size: int = 4  # see segmentation.batch_size
    checkpoint: Optional[str] = None  # local path or hub id; None: pinned weights (CAM++)
    min_num_clean_frames: int = 10
    # the network before pooling once per chunk, each speaker's mask applied at the pooling (exact);
    # false: the whole network once per (chunk, speaker), as pyannote and the design note do
    shared_trunk: bool = True
    # with shared_trunk: run the trunk only on chunks that tile the recording and pool every chunk's
    # speakers over its stretch of the tiles' frames (~9x fewer trunk runs at a 1 s step; approximate:
    # DER +0.04 / +0.53 points on the 17 min synthetic / AMI benchmarks, benchmarks/results/SUMMARY.md).
    # Both false: the original per-pair embedding (experiment=seed_baseline)
    tiled_trunk: bool = True
    # speaker tracking: embed every k-th chunk (and the last); link the other chunks' speakers to
    # them by co-activity in the overlap (diaropt.pipeline.linking). 1: embed every active speaker
    anchor_every: int = 1


@dataclass
class ClusteringConfig:
    # the variant's class (diaropt.pipeline.clustering); every key below that is not null is passed to it
    # (hydra.utils.instantiate): a key the variant does not have is an error, never silently dropped
    _target_: str = "diaropt.pipeline.clustering.VBxClustering"
    method: ClusteringMethod = ClusteringMethod.vbx
    threshold: float = 0.6
    min_cluster_size: Optional[int] = None  # ahc, online_ema
    min_active_ratio: float = 0.2
    ema_alpha: Optional[float] = None  # online_ema
    fa: Optional[float] = None  # vbx
    fb: Optional[float] = None  # vbx
    max_iters: Optional[int] = None  # vbx
    phi: Optional[float] = None  # vbx: between-class variance of the cosine PLDA stand-in
    num_speakers: Optional[int] = None
    min_speakers: Optional[int] = None
    max_speakers: Optional[int] = None


@dataclass
class DatasetConfig:
    # the loader (diaropt.data.datasets / .synthetic); every key below that is not null is passed to it
    # (hydra.utils.instantiate), except name / max_files / max_duration_s, which the runner applies
    _target_: str = "diaropt.data.datasets.load_ami_mini"
    name: str = "ami_mini"
    max_files: Optional[int] = None
    max_duration_s: Optional[float] = None  # crop every file (and its reference) to its first N s
    # folder
    audio_dir: Optional[str] = None
    rttm_dir: Optional[str] = None
    uem_dir: Optional[str] = None
    # synthetic, synthetic_dev/test, dev/test
    source_dir: Optional[str] = None
    split: Optional[str] = None
    cache_dir: Optional[str] = None  # null: <paths.cache_dir or the user cache>/datasets
    num_files: Optional[int] = None
    duration_s: Optional[float] = None
    num_speakers: Optional[int] = None
    overlap_ratio: Optional[float] = None
    seed: Optional[int] = None
    # pyannote.database
    protocol: Optional[str] = None
    subset: Optional[str] = None


@dataclass
class PostprocessConfig:
    min_duration_on_s: float = 0.0
    min_duration_off_s: float = 0.0


@dataclass
class ParityConfig:
    enabled: bool = True
    cosine_floor: float = 0.98  # embedding cosine vs the fp32 torch reference below this: flagged


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite under mlruns/
    experiment_name: str = "diaropt"
    log_models: bool = False


@dataclass
class PathsConfig:
    # built models, array caches, synthetic datasets; None: $DIAROPT_CACHE_DIR or the user cache dir
    # (the pinned assets always live there)
    cache_dir: Optional[str] = None
    output_dir: Optional[str] = None  # None: the Hydra job's output dir


@dataclass
class Config:
    backend: BackendConfig = field(default_factory=BackendConfig)
    compute_unit: ComputeUnitConfig = field(default_factory=ComputeUnitConfig)
    frame_extraction: FrameExtractionConfig = field(default_factory=FrameExtractionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    repeats: int = 1
    torch_threads: int = 0  # 0: torch's default
    resume: bool = False
    # reuse segmentation outputs and embeddings per (audio, models): for sweeps over clustering or
    # post-processing parameters. Jobs that hit the cache report network timings of ~0 (tagged).
    cache_arrays: bool = False
    experiment_preset: Optional[str] = None  # set by conf/experiment/* for the record
    # what a job returns to the sweeper (Optuna minimises/maximises these, in order; see
    # conf/experiment/optuna_search.yaml); any metric the job logs, e.g. der_pyannote, rtfx
    objectives: list[str] = field(default_factory=lambda: ["der_pyannote"])


_GROUP_SCHEMAS = {
    "backend": BackendConfig, "compute_unit": ComputeUnitConfig, "frame_extraction": FrameExtractionConfig,
    "quant": QuantConfig, "fusion": FusionConfig, "embedding": EmbeddingConfig, "clustering": ClusteringConfig,
    "dataset": DatasetConfig,
}


def register_configs() -> None:
    """Register ``Config`` as ``config_schema`` and each axis schema as ``<group>/schema``."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, schema in _GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)


def validate(cfg: DictConfig) -> None:
    """Range checks the types cannot express; raises ValueError naming the key."""
    checks: list[tuple[str, bool, str]] = [
        ("segmentation.step_s", 0 < cfg.segmentation.step_s <= 10.0, "must be in (0, 10] s"),
        ("segmentation.batch_size", cfg.segmentation.batch_size >= 1, "must be >= 1"),
        ("embedding.batch_size", cfg.embedding.batch_size >= 1, "must be >= 1"),
        ("embedding.anchor_every", cfg.embedding.anchor_every >= 1, "must be >= 1"),
        ("frame_extraction.batch_size", cfg.frame_extraction.batch_size >= 1, "must be >= 1"),
        ("clustering.threshold", cfg.clustering.threshold > 0, "must be > 0"),
        ("clustering.ema_alpha", cfg.clustering.ema_alpha is None or 0 < cfg.clustering.ema_alpha <= 1,
         "must be in (0, 1]"),
        ("clustering.min_active_ratio", 0 <= cfg.clustering.min_active_ratio <= 1, "must be in [0, 1]"),
        ("repeats", cfg.repeats >= 1, "must be >= 1"),
        ("parity.cosine_floor", -1 <= cfg.parity.cosine_floor <= 1, "must be in [-1, 1]"),
        ("quant.int4_block_size", cfg.quant.int4_block_size >= 1, "must be >= 1"),
        ("backend.ort_optimization_level", cfg.backend.ort_optimization_level in ("disable", "basic", "extended", "all"),
         "must be one of disable, basic, extended, all"),
    ]
    for key in ("num_speakers", "min_speakers", "max_speakers"):
        value = cfg.clustering[key]
        checks.append((f"clustering.{key}", value is None or value >= 1, "must be >= 1 or null"))
    if cfg.dataset.max_duration_s is not None:
        checks.append(("dataset.max_duration_s", cfg.dataset.max_duration_s > 0, "must be > 0"))
    bad = [f"{key} = {OmegaConf.select(cfg, key)!r}: {reason}" for key, ok, reason in checks if not ok]
    if bad:
        raise ValueError("invalid configuration: " + "; ".join(bad))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The resolved config for ``overrides`` (Hydra syntax), outside ``@hydra.main`` (CLI, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"config folder {CONF_DIR} not found: diaropt must be installed from its "
                                "repository with `pip install -e .`")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node, enums as their names."""
    without_hydra = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(without_hydra, resolve=True, enum_to_str=True)
