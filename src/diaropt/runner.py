"""Run one configuration end to end: build and load models, diarize a dataset, score, time.

Shared by the CLI (``python -m diaropt diarize``) and the sweep (``experiments/sweep.py``), so both
accept the same configuration overrides and produce the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pyannote.core import Segment, Timeline

from diaropt import progress as progress_bars
from diaropt.data.annotations import DataError, write_rttm
from diaropt.data.datasets import Dataset, DatasetItem
from diaropt.pipeline.audio import SAMPLE_RATE_HZ, load_audio
from diaropt.pipeline.cache import ArrayCache
from diaropt.pipeline.clustering import BaseClustering
from diaropt.pipeline.diarization import DiarizationOutput, DiarizationPipeline, PipelineParams
from diaropt.pipeline.timing import STAGES, StageTimer
from diaropt.variants.build import BuiltModels

log = logging.getLogger(__name__)


#: dataset keys the runner applies itself; every other non-null key goes to the loader (``_target_``)
DATASET_RUNNER_KEYS = ("name", "max_files", "max_duration_s")


def dataset_from_config(cfg: DictConfig, cache_dir: Path | None = None) -> Dataset:
    """The configured dataset: ``hydra.utils.instantiate`` of ``cfg.dataset``'s ``_target_`` (a loader of
    :mod:`diaropt.data.datasets` / :mod:`diaropt.data.synthetic`) with every non-null key but
    :data:`DATASET_RUNNER_KEYS`, so a key the loader does not take is an error, never silently dropped.
    A loader that writes files gets ``cache_dir`` = ``<cache_dir or paths.cache_dir or user cache>/datasets``
    unless ``dataset.cache_dir`` is set; ``max_files`` keeps the first files."""
    import inspect

    from hydra.utils import get_method, instantiate

    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    options = {k: v for k, v in node.items() if k not in DATASET_RUNNER_KEYS and v is not None}
    target = options.get("_target_")
    if not target:
        raise ValueError(f"dataset {node.get('name')!r}: no _target_ (the loader) in its config")
    if "cache_dir" not in options and "cache_dir" in inspect.signature(get_method(target)).parameters:
        options["cache_dir"] = str(Path(cache_dir or _cache_root(cfg)) / "datasets")
    try:
        dataset = instantiate(options, _convert_="all")
    except Exception as error:  # hydra wraps the loader's errors: name the dataset and keep the cause
        cause = error.__cause__ or error
        if isinstance(cause, DataError):
            raise cause
        raise type(cause)(f"dataset {node.get('name')!r} ({target}): {cause}") from error
    if d_max := node.get("max_files"):
        dataset = Dataset(dataset.name, tuple(dataset.items)[:d_max])
    return dataset


def dataset_sha256(dataset: Dataset) -> str:
    """Identity of an evaluation set: sha256 over each file's uri, audio bytes, reference turns and UEM."""
    digest = hashlib.sha256()
    for item in dataset:
        digest.update(item.uri.encode())
        with open(item.audio_path, "rb") as audio:
            for block in iter(lambda: audio.read(1 << 20), b""):
                digest.update(block)
        turns = sorted((round(s.start, 6), round(s.end, 6), str(label)) for s, _, label in item.reference.itertracks(yield_label=True))
        digest.update(repr(turns).encode())
        if item.uem is not None:
            digest.update(repr([(round(s.start, 6), round(s.end, 6)) for s in item.uem]).encode())
    return digest.hexdigest()


def clustering_from_config(cfg: DictConfig) -> BaseClustering:
    """``hydra.utils.instantiate`` of ``cfg.clustering``'s ``_target_`` with every non-null key (speaker
    counts included: they become the variant's defaults), so a key the variant does not have is a
    TypeError naming it instead of a logged-but-unused value."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.clustering, resolve=True, enum_to_str=True)
    try:
        return instantiate({k: v for k, v in node.items() if v is not None}, _convert_="all")
    except Exception as error:  # hydra wraps the constructor's error: keep its message and type
        cause = error.__cause__ or error
        raise type(cause)(f"clustering {node.get('method')!r} ({node.get('_target_')}): {cause}") from error


#: PipelineParams field -> config key it is read from (every field has one; tests check both ways)
PIPELINE_PARAM_KEYS = {
    "step_s": "segmentation.step_s", "segmentation_batch_size": "segmentation.batch_size",
    "embedding_batch_size": "embedding.batch_size", "min_num_clean_frames": "embedding.min_num_clean_frames",
    "min_active_frames": None, "anchor_every": "embedding.anchor_every",
    "num_speakers": "clustering.num_speakers", "min_speakers": "clustering.min_speakers",
    "max_speakers": "clustering.max_speakers", "min_duration_on_s": "postprocess.min_duration_on_s",
    "min_duration_off_s": "postprocess.min_duration_off_s", "overlap_stages": "backend.overlap_stages",
}


def params_from_config(cfg: DictConfig) -> PipelineParams:
    """``PipelineParams`` instantiated from the config keys of :data:`PIPELINE_PARAM_KEYS` (``None``: the
    field is not configurable and keeps its default)."""
    from hydra.utils import instantiate

    node = {"_target_": f"{PipelineParams.__module__}.{PipelineParams.__qualname__}"}
    node.update({name: OmegaConf.select(cfg, key, throw_on_missing=True)
                 for name, key in PIPELINE_PARAM_KEYS.items() if key is not None})
    return instantiate(node)


class ChunkProgress:
    """tqdm bars per stage (chunks segmented, speakers embedded), reused across files."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and progress_bars.enabled()  # a terminal, TQDM_DISABLE unset
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None or bar.total != total or bar.n >= bar.total:
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = progress_bars.bar(desc=f"  {stage}", total=total, unit="chunk")
        bar.update(done)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def load_pipeline(cfg: DictConfig, built: BuiltModels, timer: StageTimer,
                  progress: ChunkProgress | None = None, warm_up: bool = True) -> DiarizationPipeline:
    """Load both models (timed as ``compile``: Core ML compilation, session creation) and, with
    ``warm_up``, run one silent chunk through them (timed as ``warmup``). Benchmarks and sweep jobs
    warm up so that first-call allocations stay out of the stage times; the CLI does not (its first
    file is the warm-up: a user waits for one file either way)."""
    with timer.stage("compile"):
        segmentation_model = built.segmentation.load()
        embedding_model = built.embedding.load()
        preprocessor_model = built.preprocessor.load() if getattr(built, "preprocessor", None) else None
        for model in (segmentation_model, embedding_model, preprocessor_model):
            load = getattr(model, "load", None)
            if callable(load):  # Core ML: compile to .mlmodelc (raises off macOS)
                load()
    pipeline = DiarizationPipeline(segmentation_model, embedding_model, built.embedding_dim,
                                   clustering_from_config(cfg), params_from_config(cfg), progress,
                                   preprocessor_model=preprocessor_model)
    if cfg.cache_arrays:
        pipeline.array_cache = ArrayCache(_cache_root(cfg) / "arrays", array_identity(cfg, built))
    if warm_up:
        pipeline.warm_up(timer)
    return pipeline


def _cache_root(cfg: DictConfig) -> Path:
    from diaropt.assets import default_cache_dir

    return Path(cfg.paths.cache_dir or default_cache_dir())


def array_identity(cfg: DictConfig, built: BuiltModels) -> dict[str, Any]:
    """What the cached network outputs depend on: the models and the windowing/mask parameters."""
    models = {m.kind: m.info.get("content_key") or built.weights_sha256[m.kind]
              for m in (built.segmentation, built.embedding)}
    return {"backend": built.backend, "models": models, "step_s": cfg.segmentation.step_s,
            "min_num_clean_frames": cfg.embedding.min_num_clean_frames}


def _crop_item(item: DatasetItem, audio: np.ndarray, max_duration_s: float | None):
    """(audio, reference, uem) cropped to the first ``max_duration_s`` seconds."""
    if max_duration_s is None or audio.shape[0] <= max_duration_s * SAMPLE_RATE_HZ:
        return audio, item.reference, item.uem
    window = Segment(0.0, max_duration_s)
    uem = item.uem.crop(window) if item.uem is not None else Timeline([window], uri=item.uri)
    return audio[: int(max_duration_s * SAMPLE_RATE_HZ)], item.reference.crop(window), uem


@dataclass
class DatasetResult:
    rows: list[dict[str, Any]]  # one per file: uri, DER components, timings
    aggregate: dict[str, float]  # DER over the dataset + timing statistics over repeats
    outputs: dict[str, DiarizationOutput] = field(default_factory=dict)


def run_dataset(pipeline: DiarizationPipeline, dataset: Dataset, rttm_dir: Path | None, compile_timer: StageTimer,
                repeats: int = 1, max_duration_s: float | None = None, show_progress: bool = True,
                keep_arrays: bool = False, desc: str = "files") -> DatasetResult:
    """Diarize every file ``repeats`` times; score the last repeat; timing stats over repeats.

    Per repeat, ``time_total_s`` = compile (once per job, counted in every repeat) + every stage of
    every file; ``rtfx`` = audio seconds / that total. Median, min and max over repeats are reported
    as ``<metric>`` (median), ``<metric>_min`` and ``<metric>_max``. With ``show_progress`` (and stderr a
    terminal: ``diaropt.progress``) a per-file bar ``desc`` shows the file being diarized.
    """
    from diaropt.metrics import DiarizationScorer  # pyannote.metrics (scipy.stats, pandas): only when scoring

    scorer = DiarizationScorer()
    rows: list[dict[str, Any]] = []
    outputs: dict[str, DiarizationOutput] = {}
    per_repeat: list[dict[str, float]] = []
    for repeat in range(repeats):
        timer = StageTimer(pipeline.sync)
        timer.merge(compile_timer)
        audio_duration_s = 0.0
        title = f"{desc} (repeat {repeat + 1}/{repeats})" if repeats > 1 else desc
        for item in progress_bars.iterate(dataset, desc=title, unit="file", label=lambda item: item.uri,
                                          disable=None if show_progress else True):
            file_timer = StageTimer(pipeline.sync)
            with file_timer.stage("audio"):  # decoding is part of the work
                audio, reference, uem = _crop_item(item, load_audio(item.audio_path), max_duration_s)
            output = pipeline(audio, item.uri, keep_arrays=keep_arrays, timer=file_timer)
            timer.merge(file_timer)
            audio_duration_s += output.audio_duration_s
            if repeat == repeats - 1:
                outputs[item.uri] = output
                scores = scorer.add(item.uri, reference, output.annotation, uem)
                rows.append({"uri": item.uri, "audio_duration_s": output.audio_duration_s,
                             "num_chunks": output.num_chunks, "num_embedded": output.num_embedded,
                             "num_speakers_hypothesis": output.num_clusters,
                             "num_speakers_reference": len(reference.labels()),
                             **scores, **file_timer.metrics(output.audio_duration_s)})
                if rttm_dir is not None:
                    rttm_dir.mkdir(parents=True, exist_ok=True)
                    write_rttm(output.annotation, rttm_dir / f"{item.uri}.rttm", uri=item.uri)
        per_repeat.append(timer.metrics(audio_duration_s))
    aggregate: dict[str, float] = {k: float(v) for k, v in scorer.aggregate().items()}
    for key in per_repeat[0]:
        values = [metrics[key] for metrics in per_repeat]
        aggregate[key] = float(statistics.median(values))
        if key.startswith("time_") or key == "rtfx":
            aggregate[f"{key}_min"] = float(min(values))
            aggregate[f"{key}_max"] = float(max(values))
    total = aggregate["time_total_s"]
    for stage in STAGES:
        aggregate[f"share_{stage}"] = aggregate[f"time_{stage}_s"] / total if total > 0 else float("nan")
    aggregate["repeats"] = float(repeats)
    if pipeline.array_cache is not None:
        aggregate["array_cache_hits"] = float(pipeline.array_cache.hits)
    aggregate["num_files"] = float(len(rows))
    return DatasetResult(rows, aggregate, outputs)
