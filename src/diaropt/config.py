"""Structured configuration: one dataclass per sweep axis, registered in Hydra's ConfigStore.

The YAML files under ``conf/<axis>/`` pick options; these dataclasses are their schema, so a typo in a
key or an unknown enum value fails before any work, naming the key and the allowed values. Where an
axis's options live:

| axis               | config node          | decided in                         |
|--------------------|----------------------|------------------------------------|
| frame_extraction   | ``frame_extraction`` | ``diaropt.models.fbank``           |
| quant              | ``quant``            | ``diaropt.variants.quant`` (built by ``quant_coreml``, ``quant_onnx``, ``quant_faithful``) |
| fusion             | ``fusion``           | ``diaropt.variants.build``         |
| compute_unit       | ``compute_unit``     | ``diaropt.backends.*``             |
| backend            | ``backend``          | ``diaropt.variants.build``         |
| embedding          | ``embedding``        | ``diaropt.models.embedding``       |
| trunk sharing      | ``embedding.shared_trunk``, ``embedding.tiled_trunk`` | ``diaropt.variants.fusion``, ``diaropt.pipeline.embedding`` |
| clustering         | ``clustering``       | ``diaropt.pipeline.clustering``    |
| speaker tracking   | ``embedding.anchor_every`` | ``diaropt.pipeline.linking``   |
| sinc sharing       | ``segmentation.sinc_shared`` | ``diaropt.variants.fusion_plan``, ``diaropt.pipeline.segmentation`` |
| dataset            | ``dataset``          | ``diaropt.data.datasets``          |
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
#: what :func:`compose` raises for a bad override or value (Hydra's and OmegaConf's errors, in one line;
#: ``ValueError`` from :func:`validate`): the command lines catch these to refuse before any work
OVERRIDE_ERRORS: tuple[type[Exception], ...] = (HydraException, OmegaConfBaseException, ValueError)

# ``${repo_sibling:shared/data/x}``: a folder beside the checkout (the datasets' default LibriSpeech
# source), the same whatever the working directory (benchmarks/ scripts, notebooks/)
if not OmegaConf.has_resolver("repo_sibling"):
    OmegaConf.register_new_resolver("repo_sibling", lambda relative: str(REPO_ROOT.parent / relative))


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose valid values are recorded in its metadata (read by :func:`validate`).

    ``ge``/``gt``/``le``/``lt``: inclusive/exclusive bounds of a number; ``choices``: the allowed
    strings. ``None`` (an optional field left unset) is always valid. OmegaConf ignores the metadata.
    """
    limits = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    return field(default=default, metadata={key: value for key, value in limits.items() if value is not None})


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    coreml = "coreml"


class ComputeUnit(str, Enum):
    auto = "auto"  # all for a Core ML job (as an app ships), cpu_only for ONNX Runtime / torch
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
    int8_dynamic_lstm = "int8_dynamic_lstm"  # ONNX Runtime: only the segmentation LSTMs in int8 (issue 19)


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
    num_threads: int = bounded(0, ge=0)  # 0: the runtime's default (all cores)
    ort_optimization_level: str = bounded("all", choices=("disable", "basic", "extended", "all"))
    # ONNX Runtime's CPU arena keeps each session's peak activations allocated after a run. Off, they
    # are freed between runs (lower peak memory) but every run allocates again: the embedding stage
    # took 64 s instead of 38 s on a 5 min file here. Small batches bound the arena instead.
    ort_memory_arena: bool = True
    # segmentation in a worker thread, overlapped with the embedding stage (identical outputs;
    # pipeline.diarization: how stage times are attributed). With num_threads 0, every ONNX Runtime
    # session then gets 1 intra-op thread. Off by default: on the idle 2-core VM, off (2 threads per
    # session, stages in turn) was 1.26x [1.10, 1.59] faster than on over 4 interleaved rounds on the
    # dev files of benchmarks/throughput_options.py; on helped only under load (1.52x at load 19-26)
    # (benchmarks/results/issue19_phase3/throughput_options_idle_overlap.json, issue19_phase2/)
    overlap_stages: bool = False
    # ONNX Runtime's session.intra_op.allow_spinning: None keeps its default (spinning on)
    ort_allow_spinning: Optional[bool] = None
    # ONNX Runtime's session.force_spinning_stop: a session's intra-op threads stop spinning when its
    # run returns, so they do not hold the cores the next model needs (every session has its own
    # pool; the pipeline alternates models every batch). Outputs identical; speed:
    # benchmarks/results/issue19_phase5/
    ort_force_spinning_stop: bool = True
    # keep each model's optimized graph beside it (keyed by ONNX Runtime version + CPU flags) and load
    # it with optimizations off: the same graph, ~2x faster session creation (issue 19)
    ort_cache_optimized: bool = True


@dataclass
class ComputeUnitConfig:
    # resolved per backend by ``diaropt.variants.build.resolve_compute_unit``; logged as
    # ``compute_unit.resolved`` and in the ``diaropt.axis.compute_unit`` tag
    name: ComputeUnit = ComputeUnit.auto


@dataclass
class FrameExtractionConfig:
    mode: FrameExtractionMode = FrameExtractionMode.strided
    batch_size: int = bounded(64, ge=1)  # frames per extraction op in ``batched`` mode


@dataclass
class QuantConfig:
    mode: QuantMode = QuantMode.fp32
    int4_block_size: int = bounded(32, ge=1)
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
    # chunk step: 1.5 s chosen on dataset=dev (the largest of 1.0 / 1.5 / 2.0 whose dev DER is within +0.5
    # points of 1.0's; README "Evaluation data"): 2/3 of the chunks of a 1 s step
    step_s: float = bounded(1.5, gt=0, le=10.0)
    # chunks per call. With ONNX Runtime's arena, a session keeps its largest batch's activations:
    # 8 segmentation chunks and 4 embedding rows keep a 60 min file under 2 GiB (batches of 32:
    # 3.6 GB) at about the same speed (benchmarks/results/scaling.json)
    batch_size: int = bounded(8, ge=1)
    checkpoint: Optional[str] = None  # local path or hub id; None: pinned segmentation-3.0
    # the model split after its first max-pool: the sinc convolution (~25 % of its FLOPs) and that pool
    # run once per ~1 s row of the recording, shared by the overlapping chunks (each chunk's input
    # normalization applied after it: exact up to float32 rounding; pipeline.segmentation.SharedSinc).
    # Not with fusion.segmentation_with_preprocessor / coreml_pipeline. null (auto): on for ONNX
    # Runtime unless one of those is on, off for Core ML and torch (not measured there); resolved in
    # variants.fusion_plan.resolve_sinc_shared, realized value logged as metric fusion_sinc_shared.
    # Chosen for ONNX Runtime on the dev files with ort_force_spinning_stop (without it the two
    # models' thread pools spun against each other: 0.90x): benchmarks/results/issue19_phase5/
    sinc_shared: Optional[bool] = None


@dataclass
class EmbeddingConfig:
    name: EmbeddingName = EmbeddingName.campplus
    # rows per call: (chunk, speaker) pairs; chunks with shared_trunk; tiles and chunks with tiled_trunk
    batch_size: int = bounded(4, ge=1)  # see segmentation.batch_size
    checkpoint: Optional[str] = None  # local path or hub id; None: pinned weights (CAM++)
    min_num_clean_frames: int = bounded(10, ge=0)
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
    anchor_every: int = bounded(1, ge=1)


@dataclass
class ClusteringConfig:
    # the variant's class (diaropt.pipeline.clustering); every key below that is not null is passed to it
    # (hydra.utils.instantiate): a key the variant does not have is an error, never silently dropped
    _target_: str = "diaropt.pipeline.clustering.VBxClustering"
    method: ClusteringMethod = ClusteringMethod.vbx
    # online_ema: a cosine distance; ahc / vbx: a euclidean distance between unit vectors. Both in [0, 2]
    threshold: float = bounded(0.6, ge=0, le=2)
    min_cluster_size: Optional[int] = bounded(None, ge=1)  # ahc, online_ema
    min_active_ratio: float = bounded(0.2, ge=0, le=1)
    ema_alpha: Optional[float] = bounded(None, gt=0, le=1)  # online_ema
    fa: Optional[float] = bounded(None, gt=0)  # vbx
    fb: Optional[float] = bounded(None, gt=0)  # vbx
    max_iters: Optional[int] = bounded(None, ge=1)  # vbx
    phi: Optional[float] = bounded(None, gt=0)  # vbx: between-class variance of the cosine PLDA stand-in
    chunk_step_s: Optional[float] = bounded(None, gt=0)  # vbx: ${segmentation.step_s}; Fa used = fa * chunk_step_s
    num_speakers: Optional[int] = bounded(None, ge=1)
    min_speakers: Optional[int] = bounded(None, ge=1)
    max_speakers: Optional[int] = bounded(None, ge=1)
    # every variant: at least as many clusters as local speakers the segmentation has active at once for >= this
    # many seconds without interruption in one chunk (issue 15, ami_mini analysis); null: off
    min_clusters_overlap_s: Optional[float] = bounded(None, gt=0)


@dataclass
class DatasetConfig:
    # the loader (diaropt.data.datasets / .synthetic); every key below that is not null is passed to it
    # (hydra.utils.instantiate), except name / max_files / max_duration_s, which the runner applies
    _target_: str = "diaropt.data.datasets.load_ami_mini"
    name: str = "ami_mini"
    max_files: Optional[int] = bounded(None, ge=1)  # the first N files; null: all
    max_duration_s: Optional[float] = bounded(None, gt=0)  # crop every file (and its reference) to its first N s
    # folder
    audio_dir: Optional[str] = None
    rttm_dir: Optional[str] = None
    uem_dir: Optional[str] = None
    # synthetic, synthetic_dev/test, dev/test
    source_dir: Optional[str] = None
    split: Optional[str] = None
    cache_dir: Optional[str] = None  # null: <paths.cache_dir or the user cache>/datasets
    num_files: Optional[int] = bounded(None, ge=1)
    duration_s: Optional[float] = bounded(None, gt=0)
    num_speakers: Optional[int] = bounded(None, ge=1)
    overlap_ratio: Optional[float] = bounded(None, ge=0, lt=1)
    seed: Optional[int] = None
    # pyannote.database
    protocol: Optional[str] = None
    subset: Optional[str] = bounded(None, choices=("train", "development", "test"))
    # folder: an audio file whose RTTM has no turn (or no RTTM line) gets an empty reference (a file
    # known to contain no speech) instead of an error; null: false
    allow_empty_references: Optional[bool] = None


@dataclass
class PostprocessConfig:
    min_duration_on_s: float = bounded(0.0, ge=0)
    min_duration_off_s: float = bounded(0.0, ge=0)


@dataclass
class ParityConfig:
    enabled: bool = True
    cosine_floor: float = bounded(0.98, ge=-1, le=1)  # embedding cosine vs the fp32 torch reference below this: flagged


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


_DEFAULT_OBJECTIVES = ["der_pyannote"]


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
    # timed passes over the dataset per job; null: 3 for a job whose timings are measured (timing source
    # target or proxy), 1 otherwise (diaropt.provenance.effective_repeats, logged as metric `repeats`)
    repeats: Optional[int] = bounded(None, ge=1)
    torch_threads: int = bounded(0, ge=0)  # 0: torch's default
    resume: bool = False
    # reuse segmentation outputs and embeddings per (audio, models): for sweeps over clustering or
    # post-processing parameters. Jobs that hit the cache report network timings of ~0 (tagged).
    cache_arrays: bool = False
    experiment_preset: Optional[str] = None  # set by conf/experiment/* for the record
    # what a job returns to the sweeper (Optuna minimises/maximises these, in order; see
    # conf/experiment/optuna_search.yaml); any metric the job logs, e.g. der_pyannote, rtfx
    objectives: list[str] = field(default_factory=lambda: list(_DEFAULT_OBJECTIVES))


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


def _range_text(limits: Mapping[str, Any], unit: str) -> str:
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = (limits["le"], "]") if "le" in limits else (limits["lt"], ")") if "lt" in limits else None
    if low and high:
        text = f"must be in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    elif low:
        text = f"must be {'>=' if low[0] == '[' else '>'} {low[1]:g}"
    else:
        assert high is not None
        text = f"must be {'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return text + unit


def _field_problems(schema: type, node: Any, prefix: str = "") -> list[str]:
    """Range/choice problems of ``node`` against the ``bounded`` metadata of ``schema``, recursively."""
    problems: list[str] = []
    hints = get_type_hints(schema)
    for spec in fields(schema):
        key = f"{prefix}{spec.name}"
        if node is None or spec.name not in node:  # a node another schema version lacks: Hydra's concern
            continue
        value = node[spec.name]
        if is_dataclass(hints.get(spec.name)):
            problems += _field_problems(hints[spec.name], value, f"{key}.")
            continue
        limits = spec.metadata
        if value is None or not limits:
            continue
        if "choices" in limits:
            if value not in limits["choices"]:
                problems.append(f"{key} = {value!r}: must be one of {', '.join(limits['choices'])}")
            continue
        number = value.value if isinstance(value, Enum) else value
        ok = (("ge" not in limits or number >= limits["ge"]) and ("gt" not in limits or number > limits["gt"])
              and ("le" not in limits or number <= limits["le"]) and ("lt" not in limits or number < limits["lt"]))
        if not ok:
            problems.append(f"{key} = {value!r}: {_range_text(limits, ' s' if spec.name.endswith('_s') else '')}")
    return problems


def _unknown_keys(schema: type, node: Any, prefix: str = "") -> list[str]:
    """Keys of ``node`` that ``schema`` does not have, recursively (Hydra's ``+key=value`` appends one
    to a structured config; nothing reads it). ``hydra`` at the top is Hydra's own node."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return []
    hints = get_type_hints(schema)
    names = {spec.name for spec in fields(schema)}
    unknown: list[str] = []
    for key in node:
        if not prefix and key == "hydra":
            continue
        if key not in names:
            unknown.append(f"{prefix}{key}")
        elif is_dataclass(hints.get(key)):
            unknown += _unknown_keys(hints[key], node._get_node(key), f"{prefix}{key}.")
    return unknown


def job_metric_names(parity_enabled: bool = True, cache_arrays: bool = False) -> set[str]:
    """The metrics a sweep job returns (what ``objectives`` may name): DER/JER and their components in
    every scoring convention, per-stage times with their min/max over repeats, shares, RTFx,
    ``peak_rss_bytes``, and the ``parity_*`` metrics when parity is on. Derived from the code that
    produces them (scorer conventions, timer stages, parity aggregation), not from a list."""
    from pyannote.core import Annotation, Segment, Timeline

    from diaropt.metrics import DiarizationScorer
    from diaropt.parity import parity_metrics
    from diaropt.pipeline.timing import STAGES, StageTimer

    reference = Annotation(uri="x")
    reference[Segment(0, 1)] = "A"
    scorer = DiarizationScorer()
    scorer.add("x", reference, reference, Timeline([Segment(0, 1)], uri="x"))
    names = set(scorer.aggregate())
    for key in StageTimer().metrics(1.0):
        names.add(key)
        if key.startswith("time_") or key == "rtfx":
            names |= {f"{key}_min", f"{key}_max"}
    names |= {f"share_{stage}" for stage in STAGES} | {"repeats", "num_files", "peak_rss_bytes"}
    if cache_arrays:
        names.add("array_cache_hits")
    if parity_enabled:
        names |= set(parity_metrics([], 0.0, 0.0, 0.98))
    return names


def _cross_field_problems(cfg: DictConfig) -> list[str]:
    """Rules between fields: speaker-count bounds, per-method ranges, dataset options, objectives."""
    problems: list[str] = []
    c = cfg.clustering
    if c.min_speakers is not None and c.max_speakers is not None and c.min_speakers > c.max_speakers:
        problems.append(f"clustering.min_speakers = {c.min_speakers} > clustering.max_speakers = "
                        f"{c.max_speakers}: min_speakers must be <= max_speakers")
    if c.num_speakers is not None and not ((c.min_speakers or 1) <= c.num_speakers
                                           <= (c.max_speakers or c.num_speakers)):
        problems.append(f"clustering.num_speakers = {c.num_speakers}: must be within [min_speakers, "
                        f"max_speakers] = [{c.min_speakers}, {c.max_speakers}]")
    method = c.method.value if isinstance(c.method, Enum) else c.method
    if method == "ahc" and c.threshold <= 0:
        problems.append(f"clustering.threshold = {c.threshold!r}: must be > 0 with clustering.method=ahc")
    from diaropt.data.datasets import DATASET_NAMES

    d = cfg.dataset
    if d.name not in DATASET_NAMES:
        problems.append(f"dataset.name = {d.name!r}: must be one of {', '.join(DATASET_NAMES)}")
    elif d.name == "protocol" and not d.protocol:
        problems.append("dataset.protocol = None: dataset=protocol needs a pyannote.database protocol name")
    objectives = list(cfg.objectives)
    if not objectives:
        problems.append("objectives = []: name at least one metric (e.g. der_pyannote)")
    # the default objective needs no check (tests/test_startup.py: it is a job metric); the check
    # imports pyannote.metrics (scipy.stats, pandas: ~1-2 s of every CLI start-up)
    known = set(_DEFAULT_OBJECTIVES) if objectives == _DEFAULT_OBJECTIVES else job_metric_names(
        bool(cfg.parity.enabled), bool(cfg.cache_arrays))
    for name in objectives:
        if name not in known:
            off = " (parity.enabled=false: no parity_* metric)" if str(name).startswith("parity_") else ""
            problems.append(f"objectives: {name!r} is not a metric a job returns{off}"
                            + _did_you_mean(str(name), sorted(known)))
    return problems


def _did_you_mean(name: str, choices: list[str]) -> str:
    """``"; did you mean a, b?"`` with up to 3 of ``choices`` close to ``name`` (difflib), ``""`` if none."""
    close = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def validate(cfg: DictConfig) -> None:
    """Check every value against the schema's ranges and choice sets (:func:`bounded` metadata of
    :class:`Config`, walked recursively), keys the schema lacks (a ``+key=value`` append) and the
    cross-field rules (``min_speakers <= max_speakers``, objectives a job returns, ...), before any work.

    Raises:
        ValueError: ``invalid configuration: <key> = <value>: <rule>; ...`` naming every bad key.
    """
    bad = [f"{key}: not a configuration key (appended with '+'; nothing would read it)"
           + _did_you_mean(key, _schema_keys()) for key in _unknown_keys(Config, cfg)]
    bad += _field_problems(Config, cfg) + _cross_field_problems(cfg)
    if bad:
        raise ValueError("invalid configuration: " + "; ".join(bad))


def _allowed_values(full_key: str) -> str:
    """``"; allowed: true, false, null"`` for a bool key of :class:`Config` (``""`` otherwise: OmegaConf
    already lists an enum's values)."""
    hint: Any = Config
    for part in full_key.split("."):
        hints = get_type_hints(hint) if is_dataclass(hint) else {}
        if part not in hints:
            return ""
        hint = hints[part]
    args = get_args(hint) if get_origin(hint) is Union else (hint,)
    base = [a for a in args if a is not type(None)]
    if base != [bool]:
        return ""
    return "; allowed: true, false" + (", null" if type(None) in args else "")


def _schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every public dotted leaf key of ``schema`` (``segmentation.step_s``, ...), recursively."""
    keys: list[str] = []
    for name, hint in get_type_hints(schema).items():
        if not name.startswith("_"):
            keys += _schema_keys(hint, f"{prefix}{name}.") if is_dataclass(hint) else [f"{prefix}{name}"]
    return keys


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one line (its lines joined with ``; ``)."""
    return "; ".join(line.strip().rstrip(".") for line in text.splitlines() if line.strip())


def _override_reason(error: Exception) -> str:
    """A Hydra composition error in one line, with OmegaConf's reason (Hydra's own text names only the
    override): a bad value says what is allowed; a key the schema lacks says so and suggests close keys
    (not Hydra's ``+key=value`` hint: an appended key is read by nothing); a missing group option lists
    the group's options (not Hydra's config search path)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause, lines = error.__cause__, str(error).splitlines() or [""]
    if isinstance(cause, ValidationError):
        return f"{lines[0]}: {str(cause).splitlines()[0]}{_allowed_values(str(getattr(cause, 'full_key', '')))}"
    unknown = re.match(r"Could not override '(.+)'\.$", lines[0])
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and unknown:
        key = unknown.group(1)
        return (f"Could not override {key!r}: {str(cause).splitlines()[0]}"
                + ("" if key.startswith("hydra.") else _did_you_mean(key, _schema_keys())))
    if isinstance(error, MissingConfigException):
        options: list[str] = []
        heading = ""
        for line in lines[1:]:
            if line.startswith("Config search path"):
                break
            if line.startswith("Available options in"):
                heading = line.rstrip(":").lower()
            elif heading and line.strip():
                options.append(line.strip())
        return lines[0] + (f"; {heading}: {', '.join(options)}" if options else "")
    return _one_line(str(error))


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
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
        except ConfigCompositionException as error:  # one line: why, and what is allowed
            reason = _override_reason(error)
            if reason == str(error):
                raise
            if isinstance(error, MissingConfigException):  # keeps its type (an OSError too) for callers
                raise MissingConfigException(reason, error.missing_cfg_file, error.options) from error
            raise ConfigCompositionException(reason) from error
        except OverrideParseException as error:  # not key=value: Hydra's three lines as one
            raise OverrideParseException(error.override, _one_line(str(error))) from error
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node, enums as their names."""
    without_hydra = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(without_hydra, resolve=True, enum_to_str=True)
