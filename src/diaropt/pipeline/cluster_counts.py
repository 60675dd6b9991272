"""Speaker-count constraints shared by the clustering variants (:mod:`diaropt.pipeline.clustering`):
resolving ``num_speakers`` / ``min_speakers`` / ``max_speakers`` into bounds, splitting clusters up to a
minimum count, and the warning naming the file when a bound is not met."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from diaropt.pipeline.clustering import ClusteringResult

log = logging.getLogger("diaropt.pipeline.clustering")  # the clustering's logger: one place to filter

__all__ = ["ClusterBounds", "resolve_cluster_bounds", "split_clusters", "sustained_speaker_count", "unit_rows",
           "warn_unmet"]


@dataclass(frozen=True)
class ClusterBounds:
    """Resolved speaker-count constraints.

    ``num_clusters`` is the forced count (``None`` = free); ``min_clusters <= max_clusters``
    bound a free count. All are already clipped to the number of fitting embeddings.
    """

    num_clusters: int | None
    min_clusters: int
    max_clusters: int


def _check_count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def resolve_cluster_bounds(
    num_embeddings: int,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> ClusterBounds:
    """Turn user speaker-count hints into :class:`ClusterBounds`.

    ``min_speakers == max_speakers`` is treated as a forced count. Every bound is clipped to
    ``num_embeddings`` (there cannot be more clusters than fitted embeddings).
    """
    num_speakers = _check_count("num_speakers", num_speakers)
    min_speakers = _check_count("min_speakers", min_speakers)
    max_speakers = _check_count("max_speakers", max_speakers)
    if min_speakers is not None and max_speakers is not None and min_speakers > max_speakers:
        raise ValueError(f"min_speakers={min_speakers} > max_speakers={max_speakers}")
    if num_speakers is not None and not (
        (min_speakers or 1) <= num_speakers <= (max_speakers or num_speakers)
    ):
        raise ValueError(
            f"num_speakers={num_speakers} outside [min_speakers, max_speakers]="
            f"[{min_speakers}, {max_speakers}]"
        )
    if num_speakers is None and min_speakers is not None and min_speakers == max_speakers:
        num_speakers = min_speakers
    cap = max(num_embeddings, 1)
    max_clusters = min(max_speakers or cap, cap)
    min_clusters = min(min_speakers or 1, max_clusters)
    num_clusters = None if num_speakers is None else min(num_speakers, cap)
    return ClusterBounds(num_clusters, min_clusters, max_clusters)


def sustained_speaker_count(segmentations: np.ndarray, min_duration_s: float, frame_step_s: float) -> int:
    """Largest number of local speakers the segmentation has active *at once* for at least
    ``min_duration_s`` without interruption in one chunk.

    ``segmentations (num_chunks, num_frames, L)`` hard ``{0, 1}`` activations (any value ``> 0`` is
    active); ``frame_step_s``: the chunk frame step (16.875 ms for segmentation-3.0). A run of
    ``ceil(min_duration_s / frame_step_s - 1e-9)`` (at least 1) consecutive frames with ``>= k`` active
    local speakers counts for ``k``. Returns an int in ``[0, L]`` (0: no frame is active).

    Raises:
        ValueError: ``segmentations`` not 3-D, or ``min_duration_s`` / ``frame_step_s`` not > 0.
    """
    segmentations = np.asarray(segmentations)
    if segmentations.ndim != 3:
        raise ValueError(f"segmentations must be (num_chunks, num_frames, L), got shape {segmentations.shape}")
    if not min_duration_s > 0 or not frame_step_s > 0:
        raise ValueError(f"min_duration_s and frame_step_s must be > 0, got {min_duration_s}, {frame_step_s}")
    min_frames = max(1, int(np.ceil(min_duration_s / frame_step_s - 1e-9)))
    counts = np.sum(segmentations > 0, axis=-1)  # (C, F)
    best = 0
    for k in range(1, segmentations.shape[2] + 1):
        active = (counts >= k).astype(np.int64)
        if active.shape[1] < min_frames or not active.any():
            break
        # a window of min_frames frames all active <=> its sum equals min_frames
        window = np.cumsum(np.pad(active, ((0, 0), (1, 0))), axis=1)
        if not np.any(window[:, min_frames:] - window[:, :-min_frames] == min_frames):
            break
        best = k
    return best


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norms


def warn_unmet(uri: str | None, result: ClusteringResult, num_fitting: int, num_speakers: int | None,
                min_speakers: int | None, max_speakers: int | None) -> None:
    """Log a warning naming the file when the output speaker count misses a requested bound."""
    if num_speakers is None and min_speakers is None and max_speakers is None:
        return
    hard = result.hard_clusters
    found = int(np.unique(hard[hard >= 0]).size)
    wanted = (f"num_speakers={num_speakers}" if num_speakers is not None
              else f"min_speakers={min_speakers}, max_speakers={max_speakers}")
    low = num_speakers if num_speakers is not None else (min_speakers or 1)
    high = num_speakers if num_speakers is not None else max_speakers
    if found < low or (high is not None and found > high):
        reason = (f"only {num_fitting} embeddings were usable" if num_fitting < low
                  else f"{result.num_clusters} clusters were fitted, {found} took a speaker slot")
        log.warning("%s: %s could not be met: %d speakers (%s)", uri or "<unnamed file>", wanted, found, reason)


def split_clusters(embeddings: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
              target: int) -> tuple[np.ndarray, np.ndarray]:
    """Split clusters until ``target`` are used by ``labels (num_chunks, L)``.

    ``embeddings (num_chunks, L, D)`` unit rows; ``centroids (K, D)``. Each round splits the
    cluster with the largest summed cosine distance of its members to their mean direction by a
    2-means on cosine similarity (seeds: the member farthest from the mean and the member farthest
    from that one); stops early when no cluster has two distinct members. Returns new arrays
    (new clusters get ids ``K, K + 1, ...``).
    """
    centroids = centroids.copy()
    labels = labels.copy()
    while np.unique(labels[labels >= 0]).size < target:
        best: tuple[float, int, np.ndarray, np.ndarray] | None = None
        for k in np.unique(labels[labels >= 0]):
            where = np.argwhere(labels == k)
            x = embeddings[where[:, 0], where[:, 1]]
            if len(x) < 2:
                continue
            spread = float(np.sum(1.0 - x @ unit_rows(x.mean(axis=0))))
            if spread > 1e-9 and (best is None or spread > best[0]):
                best = (spread, int(k), where, x)
        if best is None:
            break
        _, k, where, x = best
        first = x[np.argmin(x @ unit_rows(x.mean(axis=0)))]
        seeds = np.stack([first, x[np.argmin(x @ first)]])
        side = np.argmax(x @ seeds.T, axis=1)
        for _ in range(50):
            if side.min() == side.max():
                break
            seeds = unit_rows(np.stack([x[side == j].mean(axis=0) for j in range(2)]))
            new_side = np.argmax(x @ seeds.T, axis=1)
            if np.array_equal(new_side, side):
                break
            side = new_side
        if side.min() == side.max():
            break
        moved = where[side == 1]
        labels[moved[:, 0], moved[:, 1]] = centroids.shape[0]
        centroids[k] = seeds[0]
        centroids = np.vstack([centroids, seeds[1]])
    return centroids, labels
