"""Clustering stage: local-speaker embeddings -> global speaker (cluster) per chunk slot.

Input contract (all variants):

* ``embeddings``: ``(num_chunks, num_local_speakers, dimension)`` float (3 local slots for
  segmentation-3.0). A row containing any NaN (or of zero norm) is *unusable*: the slot was
  skipped by the embedding stage (inactive, too short, ...).
* ``segmentations`` (optional): ``(num_chunks, num_frames, num_local_speakers)`` hard
  ``{0, 1}`` activations. When given, all-silent slots are forced to ``-2`` and only slots
  with enough clean (single-speaker) frames are used to *fit* the clusters (pyannote's
  ``min_active_ratio`` filter); the others are still assigned afterwards.

Output contract (:class:`ClusteringResult`):

* ``hard_clusters``: ``(num_chunks, num_local_speakers)`` int8, cluster index in
  ``[0, num_clusters)`` or ``-2`` for skipped / unassignable slots. Two slots of one chunk
  never share a cluster (constrained assignment).
* ``centroids``: ``(num_clusters, dimension)`` float32, L2-normalised.

Every variant runs the same three steps (:class:`BaseClustering`):
filter (which slots are assignable / used for fitting) -> cluster (fit centroids) ->
constrained assignment (per-chunk Hungarian matching on cosine similarity).

Variants (``clustering=<name>``): ``ahc`` (pyannote.audio's agglomerative clustering), ``vbx``
(AHC refined by VBx, as pyannote.audio 4's community-1 pipeline, with a stand-in for its PLDA) and
``online_ema`` (the design note's speaker tracking). Speaker counts (``num_speakers``,
``min_speakers``, ``max_speakers``) are honoured by every variant: a forced count gives exactly that
many clusters whenever there are at least as many fitting embeddings; when a bound cannot be met
(too few embeddings, or a cluster that no slot takes in the constrained assignment) a warning
naming the file is logged (:mod:`diaropt.pipeline.cluster_counts`).

Constructor defaults are the configuration's, so a variant built without Hydra (``VBxClustering()``)
is the one ``clustering=<name>`` builds: ``min_active_ratio`` and VBx's ``chunk_step_s`` are read from
the schema (``diaropt.config``: ``clustering.min_active_ratio``, ``segmentation.step_s``); the
per-variant values are those of ``conf/clustering/<name>.yaml``, which documents why they were chosen
(``tests/test_config_defaults.py`` requires every key of each file to equal the default).

Deliberate difference from pyannote.audio 4.0.7: its ``AgglomerativeClustering`` assigns slots by a
plain argmax (two slots of one chunk may land in one cluster; the reconstruction then takes their max);
every variant here uses the constrained assignment, as pyannote's ``VBxClustering`` does.
Clusters are numbered by order of first appearance among the fitting slots (chunk-major,
then slot), so ``SPEAKER_00`` is (normally) the first speaker heard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

# scipy (cluster, optimize, special) is imported inside the functions that use it: ~0.5 s of every
# CLI start-up (benchmarks/startup_profile.py), and clustering runs only after the networks.
from diaropt.config import ClusteringConfig, SegmentationConfig
from diaropt.models.constants import SEGMENTATION_FRAMES
from diaropt.pipeline.cluster_counts import (
    ClusterBounds,
    resolve_cluster_bounds,
    log,
    split_clusters,
    sustained_speaker_count,
    warn_unmet,
)
from diaropt.pipeline.cluster_counts import unit_rows as _unit_rows

__all__ = [
    "UNASSIGNED",
    "ClusteringResult",
    "ClusterFit",
    "ClusterBounds",
    "BaseClustering",
    "AgglomerativeClustering",
    "OnlineEMAClustering",
    "VBxClustering",
    "vbx_refine",
    "CLUSTERING",
    "get_clustering",
    "constrained_assignment",
    "resolve_cluster_bounds",
]

#: Label of skipped / unassigned local speakers in ``hard_clusters`` (pyannote convention).
UNASSIGNED = -2
_MAX_INT8_CLUSTERS = int(np.iinfo(np.int8).max) + 1


@dataclass(frozen=True)
class ClusteringResult:
    """Output: ``hard_clusters (num_chunks, L) int8``, ``centroids (K, D) float32``."""

    hard_clusters: np.ndarray
    centroids: np.ndarray

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


@dataclass(frozen=True)
class ClusterFit:
    """Result of the fitting step.

    ``centroids (K, D)`` unit-norm float64; ``labels (num_chunks, L)`` int64 cluster of each
    slot used for fitting (``-2`` elsewhere). Labels of one chunk may collide (e.g. after a
    merge); the assignment step resolves that.
    """

    centroids: np.ndarray
    labels: np.ndarray


def _first_appearance_order(labels: np.ndarray) -> np.ndarray:
    """Map ``old label -> new label`` so that labels are numbered by first appearance.

    ``labels`` is any int array (``< 0`` ignored); returns ``(max_label + 1,)`` int64 with -1
    for labels that do not occur.
    """
    flat = labels.reshape(-1)
    flat = flat[flat >= 0]
    mapping = np.full(int(flat.max()) + 1 if flat.size else 0, -1, dtype=np.int64)
    _, first_index = np.unique(flat, return_index=True)
    for new, old in enumerate(flat[np.sort(first_index)]):
        mapping[old] = new
    return mapping


def _relabel(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    out = labels.copy()
    valid = labels >= 0
    out[valid] = mapping[labels[valid]]
    return out


def constrained_assignment(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    assignable: np.ndarray | None = None,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Assign local speakers to clusters, at most one slot per cluster within a chunk.

    ``embeddings (num_chunks, L, D)``, ``centroids (K, D)``, ``assignable (num_chunks, L)``
    bool (default: finite, non-zero rows) -> ``(num_chunks, L)`` int8 with ``-2`` for
    unassigned slots. Per chunk, a Hungarian matching (``linear_sum_assignment``) maximises
    the summed cosine similarity. Slots with a label ``>= 0`` in ``initial (num_chunks, L)``
    keep it (their clusters are then unavailable to the other slots of that chunk; labels in
    ``initial`` must not collide within a chunk). If a chunk has more assignable slots than
    free clusters, the least similar slots stay ``-2``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    num_chunks, num_slots, _ = embeddings.shape
    centroids = np.asarray(centroids, dtype=np.float64)
    num_clusters = centroids.shape[0]
    if num_clusters > _MAX_INT8_CLUSTERS:
        raise ValueError(f"{num_clusters} clusters do not fit in int8 hard_clusters")
    unit = _unit_rows(embeddings)
    if assignable is None:
        assignable = np.all(np.isfinite(unit), axis=-1)
    hard = np.full((num_chunks, num_slots), UNASSIGNED, dtype=np.int8)
    if initial is not None:
        keep = (np.asarray(initial) >= 0) & assignable
        hard[keep] = np.asarray(initial)[keep]
    if num_clusters == 0:
        return hard
    from scipy.optimize import linear_sum_assignment  # lazily: see the module's imports

    similarity = np.einsum("csd,kd->csk", np.nan_to_num(unit), _unit_rows(centroids))
    for c in range(num_chunks):
        todo = np.flatnonzero(assignable[c] & (hard[c] < 0))
        if todo.size == 0:
            continue
        free = np.setdiff1d(np.arange(num_clusters), hard[c][hard[c] >= 0])
        if free.size == 0:
            continue
        rows, cols = linear_sum_assignment(similarity[c][np.ix_(todo, free)], maximize=True)
        hard[c, todo[rows]] = free[cols]
    return hard


class BaseClustering(ABC):
    """Template: filter -> cluster -> constrained assignment (see module docstring).

    ``min_active_ratio``: when ``segmentations`` are given, a slot is used for *fitting* only
    if it has at least ``min_active_ratio * num_frames`` single-speaker frames (if no slot
    qualifies, all assignable slots are used). ``num_speakers`` / ``min_speakers`` /
    ``max_speakers``: default speaker counts of every call (a call's own values win).
    ``method``: the variant's config name, checked against the class (``clustering.method``
    and ``clustering._target_`` cannot disagree).

    ``min_clusters_overlap_s`` (``clustering.min_clusters_overlap_s``; ``None``, the default: off): when
    ``segmentations`` are given and no ``num_speakers`` is, at least as many clusters as the largest
    number of local speakers the segmentation has active at once for ``>= min_clusters_overlap_s``
    seconds without interruption in one chunk
    (:func:`~diaropt.pipeline.cluster_counts.sustained_speaker_count`; capped by ``max_speakers``). The
    segmentation itself then says that many people speak at once, and a clustering with fewer clusters
    can only output the extra ones as a zero-activation column in the reconstruction (as pyannote pads).
    The raised minimum is logged (info) naming the file; the warning for unmet bounds still refers to
    the user's own ``min_speakers``.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        min_active_ratio: float = ClusteringConfig.min_active_ratio,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        method: str | None = None,
        min_clusters_overlap_s: float | None = ClusteringConfig.min_clusters_overlap_s,
    ) -> None:
        if method is not None and str(method) != self.name:
            raise ValueError(f"{type(self).__name__} is clustering method {self.name!r}, got method={method!r}")
        if not 0.0 <= min_active_ratio <= 1.0:
            raise ValueError(f"min_active_ratio must be in [0, 1], got {min_active_ratio}")
        self.min_active_ratio = float(min_active_ratio)
        if min_clusters_overlap_s is not None and not min_clusters_overlap_s > 0:
            raise ValueError(f"min_clusters_overlap_s must be > 0 or None, got {min_clusters_overlap_s}")
        self.min_clusters_overlap_s = None if min_clusters_overlap_s is None else float(min_clusters_overlap_s)
        resolve_cluster_bounds(1 << 20, num_speakers, min_speakers, max_speakers)  # checks values
        self.num_speakers, self.min_speakers, self.max_speakers = num_speakers, min_speakers, max_speakers

    def __call__(
        self,
        embeddings: np.ndarray,
        segmentations: np.ndarray | None = None,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        uri: str | None = None,
    ) -> ClusteringResult:
        """Cluster ``embeddings (num_chunks, L, D)``; see the module docstring for contracts.

        ``uri`` names the file in the warning logged when a speaker-count bound is not met.
        """
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 3:
            raise ValueError(
                "embeddings must be (num_chunks, num_local_speakers, dimension), "
                f"got shape {embeddings.shape}"
            )
        num_speakers = self.num_speakers if num_speakers is None else num_speakers
        min_speakers = self.min_speakers if min_speakers is None else min_speakers
        max_speakers = self.max_speakers if max_speakers is None else max_speakers
        num_chunks, num_slots, dimension = embeddings.shape
        assignable, fitting = self.filter_embeddings(embeddings, segmentations)
        unit = _unit_rows(embeddings)
        unit[~assignable] = np.nan
        bounds = resolve_cluster_bounds(
            int(fitting.sum()), num_speakers,
            self._overlap_min_speakers(segmentations, num_speakers, min_speakers, max_speakers, uri), max_speakers
        )
        if not fitting.any():
            result = ClusteringResult(
                np.full((num_chunks, num_slots), UNASSIGNED, dtype=np.int8),
                np.zeros((0, dimension), dtype=np.float32),
            )
        else:
            fit = self.cluster(unit, fitting, bounds)
            if fit.centroids.shape[0] > _MAX_INT8_CLUSTERS:
                raise ValueError(
                    f"{fit.centroids.shape[0]} clusters exceed the int8 hard_clusters range; "
                    "raise the threshold or set max_speakers"
                )
            hard = self.assign(unit, assignable, fit)
            result = ClusteringResult(hard, _unit_rows(fit.centroids).astype(np.float32))
        warn_unmet(uri, result, int(fitting.sum()), num_speakers, min_speakers, max_speakers)
        return result

    def _overlap_min_speakers(self, segmentations: np.ndarray | None, num_speakers: int | None,
                              min_speakers: int | None, max_speakers: int | None, uri: str | None) -> int | None:
        """``min_speakers`` raised to the sustained instantaneous speaker count when
        ``min_clusters_overlap_s`` is set (class docstring); unchanged otherwise."""
        if self.min_clusters_overlap_s is None or segmentations is None or num_speakers is not None:
            return min_speakers
        sustained = sustained_speaker_count(segmentations, self.min_clusters_overlap_s, SEGMENTATION_FRAMES.step_s)
        if max_speakers is not None:
            sustained = min(sustained, max_speakers)
        if sustained <= (min_speakers or 1):
            return min_speakers
        log.info("%s: %d local speakers active at once for >= %g s in one chunk: at least %d clusters",
                 uri or "<unnamed file>", sustained, self.min_clusters_overlap_s, sustained)
        return sustained

    def filter_embeddings(
        self, embeddings: np.ndarray, segmentations: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(assignable, fitting)``, both ``(num_chunks, L)`` bool, ``fitting ⊆ assignable``."""
        finite = np.all(np.isfinite(embeddings), axis=-1)
        with np.errstate(invalid="ignore"):
            assignable = finite & (np.linalg.norm(np.nan_to_num(embeddings), axis=-1) > 0)
        fitting = assignable.copy()
        if segmentations is not None:
            segmentations = np.asarray(segmentations)
            if segmentations.ndim != 3 or (
                segmentations.shape[0],
                segmentations.shape[2],
            ) != embeddings.shape[:2]:
                raise ValueError(
                    f"segmentations {segmentations.shape} do not match embeddings "
                    f"{embeddings.shape} (expected (num_chunks, num_frames, L))"
                )
            active = segmentations > 0
            assignable &= np.any(active, axis=1)
            single = np.sum(active, axis=-1, keepdims=True) == 1
            num_clean_frames = np.sum(active & single, axis=1)
            fitting = assignable & (
                num_clean_frames >= self.min_active_ratio * segmentations.shape[1]
            )
            if not fitting.any():
                fitting = assignable.copy()
        return assignable, fitting

    @abstractmethod
    def cluster(
        self, embeddings: np.ndarray, fitting: np.ndarray, bounds: ClusterBounds
    ) -> ClusterFit:
        """Fit clusters on the unit-norm ``embeddings (num_chunks, L, D)`` where ``fitting``."""

    def assign(
        self, embeddings: np.ndarray, assignable: np.ndarray, fit: ClusterFit
    ) -> np.ndarray:
        """Constrained assignment of every assignable slot to ``fit.centroids`` (int8)."""
        return constrained_assignment(embeddings, fit.centroids, assignable)


class AgglomerativeClustering(BaseClustering):
    """Offline AHC with centroid linkage on L2-normalised embeddings (pyannote-style).

    ``threshold`` is a *euclidean* distance between (means of) unit vectors. For two unit
    vectors ``d = sqrt(2 - 2 cos)``, i.e. ``cos = 1 - d**2 / 2``: the default 0.7045654963945799
    (pyannote 3.1) corresponds to cosine similarity ~0.752 (cosine distance ~0.248) between
    singletons. Centroid linkage compares cluster *means*, whose norm shrinks below 1 as a
    cluster spreads, so for merged clusters the threshold is looser than that cosine value.

    Without a forced count, the dendrogram is cut at ``threshold``; clusters with fewer than
    ``min_cluster_size`` members (reduced to ``max(1, round(0.1 * num_embeddings))`` on small
    inputs, like pyannote) are "small"; if the number of *large* clusters falls outside
    ``[min_speakers, max_speakers]`` the count is clipped and treated as forced. A forced count
    ``k`` cuts the dendrogram after a prefix of its merges chosen so that exactly ``k`` large
    clusters remain (closest such cut to the threshold cut; if no prefix gives ``k`` large
    clusters, exactly ``k`` clusters counting every cluster as large). Small clusters are then
    merged into the large cluster with the most similar centroid. Result: exactly ``k``
    clusters whenever ``k <= num_embeddings``.

    Source: pyannote.audio 4.0.7 ``pipelines/clustering.py`` (``AgglomerativeClustering``, with
    ``method="centroid"``, ``metric="cosine"``). Deliberate difference: where pyannote searches
    the dendrogram for a cut with ``k`` large clusters and, failing that, keeps the closest count
    (printing a hint), this searches every prefix of merges and falls back to exactly ``k``
    clusters with ``min_cluster_size = 1``, so a forced count is always met.
    """

    name: ClassVar[str] = "ahc"

    def __init__(
        self,
        threshold: float = 0.7045654963945799,
        min_cluster_size: int = 12,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if min_cluster_size < 1:
            raise ValueError(f"min_cluster_size must be >= 1, got {min_cluster_size}")
        self.threshold = float(threshold)
        self.min_cluster_size = int(min_cluster_size)

    def cluster(
        self, embeddings: np.ndarray, fitting: np.ndarray, bounds: ClusterBounds
    ) -> ClusterFit:
        chunk_index, slot_index = np.nonzero(fitting)
        x = embeddings[chunk_index, slot_index]  # (num_embeddings, D), unit norm
        flat = self.cluster_vectors(x, bounds)
        mapping = _first_appearance_order(flat)
        flat = mapping[flat]
        num_clusters = int(flat.max()) + 1
        centroids = np.stack([x[flat == k].mean(axis=0) for k in range(num_clusters)])
        labels = np.full(fitting.shape, UNASSIGNED, dtype=np.int64)
        labels[chunk_index, slot_index] = flat
        return ClusterFit(_unit_rows(centroids), labels)

    def cluster_vectors(self, x: np.ndarray, bounds: ClusterBounds) -> np.ndarray:
        """Flat AHC labels ``(num_embeddings,)`` int64 of unit vectors ``x (num_embeddings, D)``."""
        num_embeddings = x.shape[0]
        if num_embeddings == 1:
            return np.zeros(1, dtype=np.int64)
        from scipy.cluster.hierarchy import fcluster, linkage  # lazily: see the module's imports

        min_size = min(self.min_cluster_size, max(1, int(round(0.1 * num_embeddings))))
        dendrogram = linkage(x, method="centroid", metric="euclidean")

        labels = fcluster(dendrogram, self.threshold, criterion="distance") - 1
        target = bounds.num_clusters
        if target is None:
            num_large = int(np.sum(np.bincount(labels) >= min_size))
            if num_large < bounds.min_clusters:
                target = bounds.min_clusters
            elif num_large > bounds.max_clusters:
                target = bounds.max_clusters
        if target is not None:
            labels, min_size = self._cut_to_num_large(dendrogram, target, min_size)
        return self._absorb_small_clusters(x, labels, min_size)

    def _cut_to_num_large(
        self, dendrogram: np.ndarray, target: int, min_size: int
    ) -> tuple[np.ndarray, int]:
        """Labels after the best prefix of merges for ``target`` large clusters.

        Returns ``(labels (num_embeddings,), min_size actually used)``.
        """
        num_embeddings = dendrogram.shape[0] + 1
        sizes = np.concatenate([np.ones(num_embeddings), dendrogram[:, 3]])
        # num_large[m]: number of large clusters after applying the first m merges.
        is_large = sizes >= min_size
        children = dendrogram[:, :2].astype(np.int64)
        delta = is_large[num_embeddings:].astype(np.int64) - is_large[children].sum(axis=1)
        num_large = np.concatenate([[int(is_large[:num_embeddings].sum())], delta]).cumsum()
        # number of merges of the threshold cut (exact when the dendrogram is monotonic)
        threshold_merges = int(np.sum(dendrogram[:, 2] <= self.threshold))
        candidates = np.flatnonzero(num_large == target)
        if candidates.size == 0:
            # target unreachable with this min_size: every cluster counts as large.
            min_size = 1
            num_merges = num_embeddings - target
        else:
            distance = np.abs(candidates - threshold_merges)
            # closest to the threshold cut; ties -> more merges (fewer small clusters)
            num_merges = int(candidates[np.lexsort((-candidates, distance))[0]])
        return _apply_merges(dendrogram, num_merges), min_size

    @staticmethod
    def _absorb_small_clusters(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
        """Merge clusters smaller than ``min_size`` into the most similar large cluster."""
        unique, labels = np.unique(labels, return_inverse=True)
        counts = np.bincount(labels)
        large = np.flatnonzero(counts >= min_size)
        small = np.flatnonzero(counts < min_size)
        if small.size == 0:
            return labels
        if large.size == 0:
            return np.zeros_like(labels)
        centroids = _unit_rows(np.stack([x[labels == k].mean(axis=0) for k in range(unique.size)]))
        similarity = centroids[small] @ centroids[large].T
        target = large[np.argmax(similarity, axis=1)]
        remap = np.arange(unique.size)
        remap[small] = target
        _, labels = np.unique(remap[labels], return_inverse=True)
        return labels


def _apply_merges(dendrogram: np.ndarray, num_merges: int) -> np.ndarray:
    """Flat labels ``(num_embeddings,)`` after the first ``num_merges`` rows of a linkage."""
    num_embeddings = dendrogram.shape[0] + 1
    parent = np.full(2 * num_embeddings - 1, -1, dtype=np.int64)
    for i in range(num_merges):
        a, b = int(dendrogram[i, 0]), int(dendrogram[i, 1])
        parent[a] = parent[b] = num_embeddings + i
    root = np.arange(2 * num_embeddings - 1)
    # parents always have larger ids than their children: resolve top-down
    for node in range(2 * num_embeddings - 2, -1, -1):
        if parent[node] >= 0:
            root[node] = root[parent[node]]
    _, labels = np.unique(root[:num_embeddings], return_inverse=True)
    return labels


def vbx_refine(
    initial_labels: np.ndarray,
    features: np.ndarray,
    phi: np.ndarray,
    fa: float,
    fb: float,
    max_iters: int = 20,
    init_smoothing: float = 7.0,
    epsilon: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Variational Bayes refinement of a clustering (VBx without the HMM, as pyannote.audio 4 uses it).

    Model (Landini et al., "Bayesian HMM clustering of x-vector sequences (VBx) in speaker
    diarization", 2022, eqs. 16-25; GMM variant: no speaker-turn HMM): features of speaker ``s``
    are ``N(V y_s, I)`` with ``y_s ~ N(0, I)`` and ``V = diag(sqrt(phi))`` (identity within-class,
    diagonal between-class covariance ``phi``); ``fa`` scales the statistics, ``fb`` regularises the
    speaker models (larger ``fb``: fewer speakers); speaker priors are re-estimated, so redundant
    speakers' priors fall to ~0.

    Args:
        initial_labels: (N,) int, clusters ``0..K-1`` that initialise the responsibilities
            (one-hot sharpened by ``softmax(init_smoothing * onehot)``).
        features: (N, d) float, embeddings in the model's space.
        phi: (d,) between-class variances.

    Returns:
        responsibilities (N, K) and speaker priors (K,), float64.
    """
    from scipy.special import logsumexp, softmax  # lazily: see the module's imports

    features = np.asarray(features, dtype=np.float64)
    num_clusters = int(initial_labels.max()) + 1
    onehot = np.zeros((len(initial_labels), num_clusters))
    onehot[np.arange(len(initial_labels)), initial_labels] = 1.0
    gamma = softmax(init_smoothing * onehot, axis=1)
    prior = np.full(num_clusters, 1.0 / num_clusters)
    dimension = features.shape[1]
    constant = -0.5 * (np.sum(features**2, axis=1) + dimension * np.log(2 * np.pi))  # (N,)
    rho = features * np.sqrt(phi)
    previous_elbo = -np.inf
    for iteration in range(max_iters):
        precision_inv = 1.0 / (1.0 + fa / fb * gamma.sum(axis=0)[:, None] * phi)  # (K, d)
        alpha = fa / fb * precision_inv * (gamma.T @ rho)  # (K, d) speaker model means
        log_likelihood = fa * (rho @ alpha.T - 0.5 * (precision_inv + alpha**2) @ phi + constant[:, None])
        log_joint = log_likelihood + np.log(prior + 1e-8)
        log_marginal = logsumexp(log_joint, axis=1)
        gamma = np.exp(log_joint - log_marginal[:, None])
        prior = gamma.sum(axis=0) / gamma.sum()
        elbo = log_marginal.sum() + fb * 0.5 * np.sum(np.log(precision_inv) - precision_inv - alpha**2 + 1.0)
        if iteration > 0 and elbo - previous_elbo < epsilon:
            break
        previous_elbo = elbo
    return gamma, prior


class VBxClustering(AgglomerativeClustering):
    """AHC (centroid linkage, no small-cluster step) refined by VBx, as pyannote.audio 4's
    community-1 pipeline (``VBxClustering`` in its ``pipelines/clustering.py``).

    Steps: AHC of the unit fitting embeddings cut at ``threshold`` -> features in a two-covariance
    (PLDA-like) space -> :func:`vbx_refine` with ``fa``, ``fb`` -> speakers whose prior stays above
    ``1e-7`` are kept, their centroids the responsibility-weighted means of the embeddings ->
    constrained assignment.

    Stand-in for the PLDA: pyannote loads an x-vector transform and a PLDA trained on many
    speakers from the model hub; there is none for CAM++ here. Instead a *cosine PLDA*: the unit
    embeddings, centred on the file's mean and scaled by ``sqrt(D)`` (pyannote's transform also
    length-normalises to ``sqrt(dim)``), with identity within-class covariance and the same
    between-class variance ``phi`` in every dimension, so the VBx likelihoods depend on cosine
    geometry only; ``phi``, ``fa`` and ``fb`` are hyper-parameters (chosen on the dev set). A
    per-file LDA of the AHC clusters was tried first and rejected: it only confirms the initial
    clusters (dev DER 24.7 % at best vs 22.5 % for AHC, over-splitting 5-speaker conversations
    into 13).

    ``fa`` is VBx's acoustic scaling factor Fa at a 1 s chunk step; the model uses
    ``fa * chunk_step_s`` (``chunk_step_s``: the segmentation step, ``${segmentation.step_s}`` in
    conf/clustering/vbx.yaml). Fa exists because VBx's embeddings are not independent observations
    (Landini et al. 2022, sec. 3.2: x-vectors of overlapping windows); here the 10 s chunks overlap by
    ``10 - chunk_step_s`` s, so the number of embeddings of one stretch of speech is proportional to
    ``1 / chunk_step_s``. Scaling Fa by the step keeps the evidence per second of speech, and so the
    VBx posterior for the same audio, independent of the step (measured on dev: at a 2 s step the
    unscaled Fa 0.1 merges speakers in two conversations, 2 -> 1 and 5 -> 4, dev DER 25.17 %; Fa 0.2
    finds every synthetic count, 22.01 %).

    Speaker counts: if the VBx count misses ``num_speakers`` / ``[min_speakers, max_speakers]``, the
    centroids come from the AHC's forced-count cut instead (exactly the requested count);
    pyannote uses k-means there.
    """

    name: ClassVar[str] = "vbx"

    def __init__(
        self,
        threshold: float = 0.6,
        fa: float = 0.1,
        fb: float = 0.8,
        max_iters: int = 20,
        phi: float = 2.0,
        chunk_step_s: float = SegmentationConfig.step_s,
        **base: Any,
    ) -> None:
        if "min_cluster_size" in base:
            raise TypeError("vbx has no min_cluster_size: its AHC initialisation keeps every cluster and VBx "
                            "drops the redundant ones (pyannote's community-1 does the same)")
        super().__init__(threshold=threshold, min_cluster_size=1, **base)
        if fa <= 0 or fb <= 0:
            raise ValueError(f"fa and fb must be > 0, got fa={fa}, fb={fb}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        if phi <= 0:
            raise ValueError(f"phi must be > 0, got {phi}")
        if chunk_step_s <= 0:
            raise ValueError(f"chunk_step_s must be > 0, got {chunk_step_s}")
        self.fa, self.fb, self.max_iters, self.phi = float(fa), float(fb), int(max_iters), float(phi)
        self.chunk_step_s = float(chunk_step_s)

    @property
    def effective_fa(self) -> float:
        """The Fa VBx runs with: ``fa * chunk_step_s`` (class docstring)."""
        return self.fa * self.chunk_step_s

    def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, D), phi (D,))`` of unit embeddings ``x (N, D)``: the cosine stand-in for
        the PLDA (class docstring): ``sqrt(D) * (x - mean)`` and ``phi`` in every dimension."""
        dimension = x.shape[1]
        return np.sqrt(dimension) * (x - x.mean(axis=0)), np.full(dimension, self.phi)

    def cluster_vectors(self, x: np.ndarray, bounds: ClusterBounds) -> np.ndarray:
        num_embeddings = x.shape[0]
        if num_embeddings < 2:
            return np.zeros(num_embeddings, dtype=np.int64)
        from scipy.cluster.hierarchy import fcluster, linkage  # lazily: see the module's imports

        dendrogram = linkage(x, method="centroid", metric="euclidean")
        initial = np.unique(fcluster(dendrogram, self.threshold, criterion="distance") - 1,
                            return_inverse=True)[1]
        features, phi = self.features(x)
        gamma, prior = vbx_refine(initial, features, phi, self.effective_fa, self.fb, self.max_iters)
        kept = prior > 1e-7
        labels = np.argmax(gamma[:, kept], axis=1)
        labels = np.unique(labels, return_inverse=True)[1]
        count = int(labels.max()) + 1
        target = bounds.num_clusters
        if target is None and not bounds.min_clusters <= count <= bounds.max_clusters:
            target = min(max(count, bounds.min_clusters), bounds.max_clusters)
        if target is not None and count != target:
            labels, _ = self._cut_to_num_large(dendrogram, target, 1)
        return labels


class OnlineEMAClustering(BaseClustering):
    """Online speaker tracking with EMA-updated centroids ("enhanced post-embedding").

    Chunks are processed in index (= time) order. Per chunk, the fitting slots are matched to
    the current centroids by a Hungarian matching on cosine similarity:

    * a match with cosine similarity ``>= 1 - threshold`` (``threshold`` is a cosine
      *distance*) keeps that speaker and updates its centroid
      ``c <- normalise((1 - a) c + a x)`` with ``a = max(ema_alpha, 1 / (n + 1))`` after ``n``
      updates (running mean while young, EMA afterwards);
    * otherwise a new speaker is opened, unless ``max_speakers`` are already open, in which
      case the Hungarian match is accepted without updating the centroid (or the slot stays
      unassigned if the chunk has more slots than speakers).

    Afterwards, speakers with fewer than ``min_cluster_size`` members are merged into the most
    similar larger one (never below the requested count), a count above ``num_speakers`` is met
    by repeatedly merging the two most similar centroids (count-weighted), and a count below
    ``num_speakers`` / ``min_speakers`` by splitting: the speaker whose members are least similar
    to its centroid is split in two by a 2-means on cosine similarity (seeded by its farthest
    member), until the count is met or no speaker has two distinct members. Online labels are
    kept; only slots that did not take part in tracking (e.g. too little clean speech) and chunks
    whose labels collide after a merge are (re)assigned against the final centroids by the
    constrained assignment.
    """

    name: ClassVar[str] = "online_ema"

    def __init__(
        self,
        threshold: float = 0.6,
        ema_alpha: float = 0.1,
        min_cluster_size: int = 1,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if not 0.0 <= threshold <= 2.0:
            raise ValueError(f"threshold (cosine distance) must be in [0, 2], got {threshold}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if min_cluster_size < 1:
            raise ValueError(f"min_cluster_size must be >= 1, got {min_cluster_size}")
        self.threshold = float(threshold)
        self.ema_alpha = float(ema_alpha)
        self.min_cluster_size = int(min_cluster_size)

    def cluster(
        self, embeddings: np.ndarray, fitting: np.ndarray, bounds: ClusterBounds
    ) -> ClusterFit:
        num_chunks, _, dimension = embeddings.shape
        # max_speakers caps tracking; a forced num_speakers is applied by the final merge.
        max_open = bounds.max_clusters
        from scipy.optimize import linear_sum_assignment  # lazily: see the module's imports

        min_similarity = 1.0 - self.threshold
        centroids = np.zeros((0, dimension))
        num_updates = np.zeros(0, dtype=np.int64)
        labels = np.full(fitting.shape, UNASSIGNED, dtype=np.int64)

        for c in range(num_chunks):
            slots = np.flatnonzero(fitting[c])
            if slots.size == 0:
                continue
            x = embeddings[c, slots]
            matched: dict[int, int] = {}
            if centroids.shape[0]:
                similarity = x @ centroids.T
                rows, cols = linear_sum_assignment(similarity, maximize=True)
                matched = {int(r): int(k) for r, k in zip(rows, cols)}
            else:
                similarity = np.zeros((slots.size, 0))
            updates: list[tuple[int, int]] = []
            for r in range(slots.size):
                k = matched.get(r)
                if k is not None and similarity[r, k] >= min_similarity:
                    labels[c, slots[r]] = k
                    updates.append((k, r))
                elif centroids.shape[0] < max_open:
                    labels[c, slots[r]] = centroids.shape[0]
                    centroids = np.vstack([centroids, x[r]])
                    num_updates = np.append(num_updates, 1)
                elif k is not None:
                    labels[c, slots[r]] = k  # forced match, centroid left untouched
            for k, r in updates:
                alpha = max(self.ema_alpha, 1.0 / (num_updates[k] + 1))
                centroids[k] = _unit_rows((1.0 - alpha) * centroids[k] + alpha * x[r])
                num_updates[k] += 1

        target = bounds.num_clusters if bounds.num_clusters is not None else bounds.min_clusters
        centroids, labels = self._merge(centroids, labels, bounds.num_clusters, target)
        centroids, labels = split_clusters(embeddings, centroids, labels, target)
        mapping = _first_appearance_order(labels)
        present = np.flatnonzero(mapping >= 0)
        keep = present[np.argsort(mapping[present])]  # old ids in new order
        return ClusterFit(centroids[keep], _relabel(labels, mapping))

    def _merge(
        self, centroids: np.ndarray, labels: np.ndarray, num_clusters: int | None, target: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Absorb small speakers (keeping at least ``target``), then merge the closest pairs down
        to ``num_clusters``. Merged-away ids keep their (unused) centroid rows."""
        centroids = centroids.copy()
        labels = labels.copy()
        alive = [k for k in range(centroids.shape[0]) if np.any(labels == k)]

        def members(k: int) -> int:
            return int(np.sum(labels == k))

        def merge(src: int, dst: int) -> None:
            n_src, n_dst = members(src), members(dst)
            merged = n_dst * centroids[dst] + n_src * centroids[src]
            if np.linalg.norm(merged) > 0:
                centroids[dst] = _unit_rows(merged)
            labels[labels == src] = dst
            alive.remove(src)

        # 1) small speakers -> most similar large speaker (smallest first), never below target
        large = [k for k in alive if members(k) >= self.min_cluster_size]
        if large:
            for k in sorted(
                (k for k in alive if members(k) < self.min_cluster_size), key=members
            ):
                if len(alive) <= target:
                    break
                merge(k, large[int(np.argmax(centroids[large] @ centroids[k]))])
        # 2) forced count: merge the two most similar centroids, smaller into larger
        if num_clusters is not None:
            while len(alive) > num_clusters:
                sub = centroids[alive]
                similarity = sub @ sub.T
                similarity[np.tril_indices(len(alive))] = -np.inf
                i, j = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
                a, b = alive[i], alive[j]
                src, dst = (a, b) if members(a) < members(b) else (b, a)
                merge(src, dst)
        return centroids, labels

    def assign(
        self, embeddings: np.ndarray, assignable: np.ndarray, fit: ClusterFit
    ) -> np.ndarray:
        initial = fit.labels.copy()
        for c in range(initial.shape[0]):
            used = initial[c][initial[c] >= 0]
            if used.size != np.unique(used).size:
                initial[c] = UNASSIGNED  # collision after a merge: redo this chunk
        return constrained_assignment(embeddings, fit.centroids, assignable, initial=initial)


#: Registry of clustering variants by config name.
CLUSTERING: dict[str, type[BaseClustering]] = {
    cls.name: cls for cls in (AgglomerativeClustering, VBxClustering, OnlineEMAClustering)
}


def get_clustering(name: str, **params: Any) -> BaseClustering:
    """Instantiate the clustering variant ``name`` with ``params`` (constructor kwargs)."""
    try:
        cls = CLUSTERING[name]
    except KeyError:
        raise ValueError(
            f"unknown clustering {name!r}; valid names: {sorted(CLUSTERING)}"
        ) from None
    return cls(**params)
