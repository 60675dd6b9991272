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
| postprocess    | count (T,), discrete (T, K) -> Annotation |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pyannote.core import Annotation, Segment

from diaropt.backends.base import RunnableModel
from diaropt.models.segmentation import CHUNK_DURATION_S
from diaropt.pipeline import preprocessing, reconstruction
from diaropt.pipeline.cache import ArrayCache
from diaropt.pipeline.audio import SAMPLE_RATE_HZ, chunk_starts, load_audio
from diaropt.pipeline.clustering import BaseClustering
from diaropt.pipeline.embedding import embed
from diaropt.pipeline.segmentation import segment
from diaropt.pipeline.timing import StageTimer


@dataclass(frozen=True)
class PipelineParams:
    """Everything but the models: windowing, batching, masks, speaker counts, binarisation."""

    step_s: float = 1.0
    segmentation_batch_size: int = 32
    embedding_batch_size: int = 32
    min_num_clean_frames: int = 10
    min_active_frames: int = 1
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None
    min_duration_on_s: float = 0.0
    min_duration_off_s: float = 0.0


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


class DiarizationPipeline:
    """Runs the stages with any backend's segmentation and embedding models.

    ``progress(stage, completed_increment, total)`` is called as batches finish (for progress bars).
    """

    def __init__(self, segmentation_model: RunnableModel, embedding_model: RunnableModel, embedding_dim: int,
                 clustering: BaseClustering, params: PipelineParams = PipelineParams(),
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.segmentation_model = segmentation_model
        self.embedding_model = embedding_model
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
        self.segmentation_model.sync()
        self.embedding_model.sync()

    def warm_up(self, timer: StageTimer) -> None:
        """One silent chunk through both models (first-call allocations, lazy compilation)."""
        with timer.stage("warmup"):
            silence = np.zeros(self.chunk_samples, dtype=np.float32)
            starts = np.zeros(1, dtype=np.int64)
            segment(self.segmentation_model, silence, starts, self.chunk_samples, 1)
            embed(self.embedding_model, silence, starts, self.chunk_samples, np.ones((1, 589, 3), np.float32),
                  np.array([[True, False, False]]), 1, self.embedding_dim)

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

        with timer.stage("segmentation"):
            if cached is not None:
                logprobs = cached["logprobs"]
            else:
                logprobs = segment(self.segmentation_model, audio, starts, self.chunk_samples,
                                   params.segmentation_batch_size,
                                   on_batch=lambda n: self.progress("segmentation", n, num_chunks))

        with timer.stage("preprocessing"):
            segmentations = preprocessing.powerset_to_multilabel(logprobs)  # (C, F, L)
            masks = preprocessing.embedding_masks(segmentations, params.min_num_clean_frames)
            active = preprocessing.active_local_speakers(segmentations, params.min_active_frames)  # (C, L)
        num_active = int(active.sum())

        with timer.stage("embedding"):
            if cached is not None:
                embeddings = cached["embeddings"]
            else:
                embeddings = embed(self.embedding_model, audio, starts, self.chunk_samples, masks, active,
                                   params.embedding_batch_size, self.embedding_dim,
                                   on_batch=lambda n: self.progress("embedding", n, num_active))
        if cache_key is not None and cached is None:
            self.array_cache.save(cache_key, {"logprobs": logprobs, "embeddings": embeddings})

        with timer.stage("clustering"):
            result = self.clustering(embeddings, segmentations, num_speakers=params.num_speakers,
                                     min_speakers=params.min_speakers, max_speakers=params.max_speakers)

        with timer.stage("postprocess"):
            frames = preprocessing.SEGMENTATION_FRAMES
            count = preprocessing.speaker_count(segmentations, starts_s, frames)
            # pyannote's rule: the top-count clusters per frame, even where a cluster's activation is 0
            discrete = reconstruction.reconstruct(segmentations, result.hard_clusters, count, starts_s, frames,
                                                  num_clusters=result.num_clusters,
                                                  require_positive_activation=False)
            annotation = reconstruction.to_annotation(discrete, frames, uri, params.min_duration_on_s,
                                                      params.min_duration_off_s)
            annotation = annotation.crop(Segment(0.0, duration_s))
        arrays = {}
        if keep_arrays:
            arrays = dict(logprobs=logprobs, segmentations=segmentations, embeddings=embeddings,
                          hard_clusters=result.hard_clusters, count=count)
        return DiarizationOutput(uri, annotation, duration_s, timer, num_chunks, num_active, result.num_clusters,
                                 arrays)
