"""The complete diarization pipeline: audio -> segmentation -> embedding preprocessor -> embeddings
-> clustering -> reconstruction -> ``Annotation``, each stage timed.

Array contracts (C chunks, F = 589 frames per chunk, L = 3 local speakers, D embedding dim,
T output frames on the 16.875 ms grid of the whole file):

| stage          | output                                   |
|----------------|------------------------------------------|
| audio          | audio (num_samples,), starts (C,)        |
| segmentation   | logprobs (C, F, 7)                       |
| preprocessing  | segmentations (C, F, L), masks (C, F, L), active (C, L) |
| embedding      | embeddings (C, L, D), NaN = skipped      |
| clustering     | hard_clusters (C, L) int8, -2 = skipped  |
| (linking)      | with ``anchor_every > 1``: only anchor chunks and unlinked speakers are embedded; linked slots take their anchor speaker's cluster |
| postprocess    | count (T,), discrete (T, K) -> Annotation |

Fused models (``variants.fusion``) move work between stages without changing these arrays: a
segmentation model may also output ``segmentations``/``masks``/``active`` (preprocessing is then
only a type conversion), a ``preprocessor_model`` may replace the numpy preprocessing, the
embedding model may embed per chunk and add ``unit_embeddings`` (what clustering then consumes)
and ``distances`` (C, L, L), and under ``fusion.coreml_pipeline`` the segmentation model is the
whole chain and outputs the embeddings too (timed as segmentation; embedding is then ~0).

``overlap_stages`` (``backend.overlap_stages``): segmentation runs in a worker thread (ONNX Runtime
releases the GIL) and feeds, through a bounded queue, the main thread, which preprocesses each batch
and runs the embedding stage as soon as the chunks that decide its next batch are known
(``pipeline.embedding``'s ``ready``). The model calls are the same as in the sequential order, so
every output array is identical (``tests/test_overlap.py``). Stage times then cannot be separate
wall-clock intervals; they are attributed so that they still add up to the wall time: of the
overlapped section's wall time, ``preprocessing`` is the main thread's preprocessing,
``segmentation`` the time the main thread waited for segmentation batches (segmentation not
hidden behind the embedding) and ``embedding`` the rest. The worker's own segmentation time and
the section's wall time are in ``DiarizationOutput.overlap`` (and logged at debug level). Used
only where nothing needs the whole segmentation first: no array cache hit, no chained model, no
speaker linking (``anchor_every`` 1); otherwise the stages run one after the other.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pyannote.core import Annotation, Segment

from diaropt.backends.base import RunnableModel
from diaropt.config import BackendConfig, ClusteringConfig, EmbeddingConfig, PostprocessConfig, SegmentationConfig
from diaropt.models.constants import CHUNK_DURATION_S, NUM_FRAMES, NUM_LOCAL_SPEAKERS
from diaropt.pipeline import linking, preprocessing, reconstruction
from diaropt.pipeline.cache import ArrayCache
from diaropt.pipeline.audio import SAMPLE_RATE_HZ, chunk_starts, load_audio
from diaropt.pipeline.clustering import BaseClustering
from diaropt.pipeline.embedding import embed_outputs, mask_inactive
from diaropt.pipeline.segmentation import concatenate_batches, run_batched_all, segment_batches, segment_outputs
from diaropt.pipeline.timing import StageTimer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineParams:
    """Everything but the models: windowing, batching, masks, speaker counts, binarisation.

    Defaults: the configuration schema's (``diaropt.config``; the config key of each field is
    ``diaropt.runner.PIPELINE_PARAM_KEYS``), so ``PipelineParams()`` runs what ``python
    experiments/sweep.py`` runs by default (``tests/test_config_defaults.py`` compares them). Only
    ``min_active_frames`` has no config key.
    """

    step_s: float = SegmentationConfig.step_s
    segmentation_batch_size: int = SegmentationConfig.batch_size
    embedding_batch_size: int = EmbeddingConfig.batch_size
    min_num_clean_frames: int = EmbeddingConfig.min_num_clean_frames
    min_active_frames: int = 1
    anchor_every: int = EmbeddingConfig.anchor_every  # embed every k-th chunk, link the others (pipeline.linking)
    num_speakers: int | None = ClusteringConfig.num_speakers
    min_speakers: int | None = ClusteringConfig.min_speakers
    max_speakers: int | None = ClusteringConfig.max_speakers
    min_duration_on_s: float = PostprocessConfig.min_duration_on_s
    min_duration_off_s: float = PostprocessConfig.min_duration_off_s
    # segmentation in a worker thread, overlapped with the embedding stage
    overlap_stages: bool = BackendConfig.overlap_stages


@dataclass
class DiarizationOutput:
    uri: str
    annotation: Annotation
    audio_duration_s: float
    timer: StageTimer
    num_chunks: int
    num_embedded: int
    num_clusters: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # intermediates, for parity checks
    # overlap_stages: wall_s of the overlapped section, segmentation_busy_s (worker), waited_s (main thread)
    overlap: dict[str, float] = field(default_factory=dict)


class DiarizationPipeline:
    """Runs the stages with any backend's segmentation and embedding models.

    ``progress(stage, completed_increment, total)`` is called as batches finish (for progress bars).
    """

    def __init__(self, segmentation_model: RunnableModel, embedding_model: RunnableModel, embedding_dim: int,
                 clustering: BaseClustering, params: PipelineParams = PipelineParams(),
                 progress: Callable[[str, int, int], None] | None = None,
                 preprocessor_model: RunnableModel | None = None) -> None:
        self.segmentation_model = segmentation_model
        self.embedding_model = embedding_model
        self.preprocessor_model = preprocessor_model  # fusion.clean_frames_in_graph as its own model
        self.embedding_dim = embedding_dim
        self.clustering = clustering
        self.params = params
        self.progress = progress or (lambda stage, done, total: None)
        self.array_cache: ArrayCache | None = None  # set to reuse network outputs across jobs
        self.chunk_samples = int(CHUNK_DURATION_S * SAMPLE_RATE_HZ)
        self.step_samples = int(round(params.step_s * SAMPLE_RATE_HZ))
        if not 0 < self.step_samples <= self.chunk_samples:
            raise ValueError(f"segmentation step {params.step_s} s must be in (0, {CHUNK_DURATION_S}] s")

    def sync(self) -> None:
        for model in (self.segmentation_model, self.embedding_model, self.preprocessor_model):
            if model is not None:
                model.sync()

    @property
    def chained(self) -> bool:
        """True when the segmentation model is the whole chain (it outputs the embeddings)."""
        return any(spec.name == "embeddings" for spec in self.segmentation_model.outputs)

    def warm_up(self, timer: StageTimer) -> None:
        """One silent chunk through every model (first-call allocations, lazy compilation)."""
        with timer.stage("warmup"):
            silence = np.zeros(self.chunk_samples, dtype=np.float32)
            starts = np.zeros(1, dtype=np.int64)
            outputs = self._segment(silence, starts, lambda n: None)
            self._preprocess(outputs)
            if not self.chained:
                embed_outputs(self.embedding_model, silence, starts, self.chunk_samples,
                              np.ones((1, 589, 3), np.float32), np.array([[True, False, False]]), 1,
                              self.embedding_dim)

    def _segment(self, audio: np.ndarray, starts: np.ndarray, on_batch: Callable[[int], None]) -> dict[str, np.ndarray]:
        return segment_outputs(self.segmentation_model, audio, starts, self.chunk_samples,
                               self.params.segmentation_batch_size, on_batch=on_batch)

    def _preprocess(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segmentations (C, F, L) float32, masks (C, F, L) float32, active (C, L) bool) from the
        segmentation outputs: taken from a fused model, run by the preprocessor model, or numpy."""
        params = self.params
        if "masks" not in outputs and self.preprocessor_model is not None:
            logprobs = outputs["logprobs"]
            batch = params.segmentation_batch_size
            parts = [run_batched_all(self.preprocessor_model, {"logprobs": logprobs[i: i + batch]})
                     for i in range(0, len(logprobs), batch)]
            outputs = {**outputs, **{name: np.concatenate([p[name] for p in parts])
                                     for name in ("segmentations", "masks", "active")}}
        if "masks" in outputs:
            return (outputs["segmentations"].astype(np.float32, copy=False),
                    outputs["masks"].astype(np.float32, copy=False), outputs["active"] > 0.5)
        if "segmentations" in outputs:
            segmentations = outputs["segmentations"].astype(np.float32, copy=False)
        else:
            segmentations = preprocessing.powerset_to_multilabel(outputs["logprobs"])  # (C, F, L)
        masks = preprocessing.embedding_masks(segmentations, params.min_num_clean_frames)
        active = preprocessing.active_local_speakers(segmentations, params.min_active_frames)  # (C, L)
        return segmentations, masks, active

    def _sequential(self, audio: np.ndarray, starts: np.ndarray, starts_s: np.ndarray, timer: StageTimer,
                    cached: dict[str, np.ndarray] | None, embedding_names: tuple[str, ...]) -> tuple:
        """Segmentation, preprocessing (and linking), embedding one after the other, each timed.
        Returns (segmentation outputs, (segmentations, masks, active, links, to_embed, num_to_embed),
        embedded outputs)."""
        params = self.params
        num_chunks = len(starts)
        with timer.stage("segmentation"):
            if cached is not None:
                outputs = {k: v for k, v in cached.items() if k not in embedding_names or self.chained}
            else:
                outputs = self._segment(audio, starts, lambda n: self.progress("segmentation", n, num_chunks))

        with timer.stage("preprocessing"):
            segmentations, masks, active = self._preprocess(outputs)
            links = None
            if params.anchor_every > 1:
                offsets = preprocessing.chunk_frame_offsets(starts_s, preprocessing.SEGMENTATION_FRAMES)
                links = linking.link_to_anchors(segmentations, offsets, active, params.anchor_every)
        to_embed = active if links is None else links.embed  # (C, L) slots the embedding stage computes
        num_to_embed = int(to_embed.sum())

        with timer.stage("embedding"):
            if self.chained:  # computed for every slot by the chain (fixed shapes): inactive ones -> NaN
                embedded = mask_inactive({k: np.array(outputs[k], dtype=np.float32) for k in embedding_names
                                          if k in outputs}, to_embed)
            elif cached is not None:  # every active slot was embedded: keep the ones this job embeds
                embedded = mask_inactive({k: np.array(cached[k]) for k in embedding_names if k in cached}, to_embed)
            else:
                embedded = embed_outputs(self.embedding_model, audio, starts, self.chunk_samples, masks, to_embed,
                                         params.embedding_batch_size, self.embedding_dim,
                                         on_batch=lambda n: self.progress("embedding", n, num_to_embed))
        return outputs, (segmentations, masks, active, links, to_embed, num_to_embed), embedded

    def _overlapped(self, audio: np.ndarray, starts: np.ndarray, timer: StageTimer) -> tuple:
        """Segmentation in a worker thread, preprocessing and embedding in this one as batches arrive
        (module docstring: how the stage times are attributed). Returns (segmentation outputs,
        (segmentations, masks, active), embedded outputs, overlap timings)."""
        params = self.params
        num_chunks = len(starts)
        shape = (num_chunks, NUM_FRAMES, NUM_LOCAL_SPEAKERS)
        segmentations, masks = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        active = np.zeros(shape[::2], bool)
        batches: dict[str, list[np.ndarray]] = {}
        handoff: queue.Queue = queue.Queue(maxsize=4)  # bounded: the worker runs at most 4 batches ahead
        stop = threading.Event()
        seconds = {"segmentation_busy_s": 0.0, "waited_s": 0.0, "preprocessing_s": 0.0}
        known = [0]

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    handoff.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            try:
                batches_run = segment_batches(self.segmentation_model, audio, starts, self.chunk_samples,
                                              params.segmentation_batch_size)
                while not stop.is_set():
                    start = time.perf_counter()
                    item = next(batches_run, None)
                    seconds["segmentation_busy_s"] += time.perf_counter() - start
                    put(item)
                    if item is None:
                        return
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                put(error)

        def ready(count: int) -> None:
            """Blocks until chunks [0, count) are segmented and preprocessed."""
            while known[0] < count:
                start = time.perf_counter()
                item = handoff.get()
                seconds["waited_s"] += time.perf_counter() - start
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    raise RuntimeError(f"segmentation stopped after {known[0]} of {num_chunks} chunks")
                start = time.perf_counter()
                first, outputs = item
                rows = slice(first, first + len(next(iter(outputs.values()))))
                segmentations[rows], masks[rows], active[rows] = self._preprocess(outputs)
                for name, value in outputs.items():
                    batches.setdefault(name, []).append(value)
                known[0] = rows.stop
                seconds["preprocessing_s"] += time.perf_counter() - start
                self.progress("segmentation", rows.stop - rows.start, num_chunks)

        worker = threading.Thread(target=work, name="diaropt-segmentation", daemon=True)
        self.sync()
        start = time.perf_counter()
        worker.start()
        try:
            embedded = embed_outputs(self.embedding_model, audio, starts, self.chunk_samples, masks, active,
                                     params.embedding_batch_size, self.embedding_dim, ready=ready)
            ready(num_chunks)
            end = handoff.get()  # the worker's end marker (or its error)
            if isinstance(end, BaseException):
                raise end
        finally:
            stop.set()
            worker.join()
        self.sync()
        wall_s = time.perf_counter() - start
        num_embedded = int(active.sum())
        self.progress("embedding", num_embedded, num_embedded)
        waited_s, preprocessing_s = seconds["waited_s"], seconds["preprocessing_s"]
        timer.seconds["segmentation"] += waited_s
        timer.seconds["preprocessing"] += preprocessing_s
        timer.seconds["embedding"] += wall_s - waited_s - preprocessing_s
        overlap = {"wall_s": wall_s, "segmentation_busy_s": seconds["segmentation_busy_s"], "waited_s": waited_s}
        log.debug("overlapped segmentation + embedding: %.3f s wall, segmentation %.3f s in its thread, "
                  "%.3f s waited for it", wall_s, overlap["segmentation_busy_s"], waited_s)
        return concatenate_batches(batches), (segmentations, masks, active), embedded, overlap

    def __call__(self, audio: str | Path | np.ndarray, uri: str | None = None, keep_arrays: bool = False,
                 timer: StageTimer | None = None) -> DiarizationOutput:
        timer = timer or StageTimer(self.sync)
        params = self.params
        with timer.stage("audio"):
            if not isinstance(audio, np.ndarray):
                uri = uri or Path(audio).stem
                audio = load_audio(audio)
            uri = uri or "audio"
            duration_s = audio.shape[0] / SAMPLE_RATE_HZ
            starts = chunk_starts(audio.shape[0], self.chunk_samples, self.step_samples)
            starts_s = starts / SAMPLE_RATE_HZ
        num_chunks = len(starts)

        cache_key = self.array_cache.key(audio) if self.array_cache is not None else None
        cached = self.array_cache.load(cache_key) if cache_key is not None else None
        if cached is not None and self.chained and "embeddings" not in cached:
            cached = None  # saved by an unchained job: the chain computes everything at once
        embedding_names = ("embeddings", "unit_embeddings", "distances")
        overlap: dict[str, float] = {}
        if params.overlap_stages and cached is None and not self.chained and params.anchor_every == 1:
            outputs, (segmentations, masks, active), embedded, overlap = self._overlapped(audio, starts, timer)
            links, to_embed, num_to_embed = None, active, int(active.sum())
        else:
            outputs, (segmentations, masks, active, links, to_embed, num_to_embed), embedded = self._sequential(
                audio, starts, starts_s, timer, cached, embedding_names)
        logprobs = outputs["logprobs"]
        embeddings = embedded["embeddings"]
        if cache_key is not None and cached is None and links is None:  # the cache holds every active slot
            self.array_cache.save(cache_key, {**outputs, **embedded})

        with timer.stage("clustering"):
            # embedding_with_post: the model's L2-normalized embeddings (clustering normalizes anyway)
            result = self.clustering(embedded.get("unit_embeddings", embeddings), segmentations,
                                     num_speakers=params.num_speakers, min_speakers=params.min_speakers,
                                     max_speakers=params.max_speakers, uri=uri)
            hard_clusters = result.hard_clusters if links is None else linking.propagate_clusters(
                result.hard_clusters, links)

        with timer.stage("postprocess"):
            frames = preprocessing.SEGMENTATION_FRAMES
            count = preprocessing.speaker_count(segmentations, starts_s, frames)
            # pyannote's rule: the top-count clusters per frame, even where a cluster's activation is 0
            discrete = reconstruction.reconstruct(segmentations, hard_clusters, count, starts_s, frames,
                                                  num_clusters=result.num_clusters,
                                                  require_positive_activation=False)
            annotation = reconstruction.to_annotation(discrete, frames, uri, params.min_duration_on_s,
                                                      params.min_duration_off_s)
            annotation = annotation.crop(Segment(0.0, duration_s))
        arrays = {}
        if keep_arrays:
            arrays = dict(logprobs=logprobs, segmentations=segmentations, embeddings=embeddings,
                          hard_clusters=hard_clusters, count=count, masks=masks, active=active)
            arrays.update({k: v for k, v in embedded.items() if k != "embeddings"})
        return DiarizationOutput(uri, annotation, duration_s, timer, num_chunks, num_to_embed, result.num_clusters,
                                 arrays, overlap)
