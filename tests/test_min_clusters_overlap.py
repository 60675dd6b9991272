"""``clustering.min_clusters_overlap_s``: at least as many clusters as local speakers the segmentation has
active at once for a sustained stretch (issue 15: on ami_mini the default clustering outputs one cluster
where the segmentation has two people speaking at once for seconds)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from diaropt.config import compose
from diaropt.models.constants import SEGMENTATION_FRAMES
from diaropt.pipeline.cluster_counts import sustained_speaker_count
from diaropt.pipeline.clustering import CLUSTERING, get_clustering
from diaropt.runner import clustering_from_config

STEP_S = SEGMENTATION_FRAMES.step_s
NUM_FRAMES = 589
DIM = 16


def _segmentations(num_chunks: int) -> np.ndarray:
    return np.zeros((num_chunks, NUM_FRAMES, 3), dtype=np.float32)


def test_sustained_count_needs_an_uninterrupted_run() -> None:
    seg = _segmentations(2)
    seg[:, :, 0] = 1
    seg[1, 100:160, 1] = 1  # 60 frames = 1.0125 s of two speakers
    assert sustained_speaker_count(seg, 1.0, STEP_S) == 2
    assert sustained_speaker_count(seg, 1.05, STEP_S) == 1
    seg[1, 130, 1] = 0  # interrupted: two runs of 30 and 29 frames
    assert sustained_speaker_count(seg, 1.0, STEP_S) == 1
    assert sustained_speaker_count(seg, 0.45, STEP_S) == 2
    seg[0, 0:59, 1:] = 1  # three at once for 59 frames (~0.996 s) in another chunk
    assert sustained_speaker_count(seg, 0.99, STEP_S) == 3
    assert sustained_speaker_count(seg, 1.0, STEP_S) == 1  # 59 frames < 1.0 s; chunk 1 was interrupted


def test_sustained_count_edge_cases() -> None:
    assert sustained_speaker_count(_segmentations(3), 0.5, STEP_S) == 0
    seg = _segmentations(1)
    seg[0, -1, :] = 1  # one frame, shorter than any duration > one step
    assert sustained_speaker_count(seg, STEP_S / 2, STEP_S) == 3
    assert sustained_speaker_count(seg, 2 * STEP_S, STEP_S) == 0
    with pytest.raises(ValueError, match="must be > 0"):
        sustained_speaker_count(seg, 0.0, STEP_S)
    with pytest.raises(ValueError, match="num_chunks"):
        sustained_speaker_count(seg[0], 1.0, STEP_S)


def _close_speakers_with_overlap(overlap_frames: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two speakers whose embeddings are close (cosine 0.9: every variant merges them at its default
    threshold) and one chunk (5) where the segmentation has both active at once for ``overlap_frames``, the
    second one only there (no clean frame: assigned, but not used to fit, so even the online tracker never
    sees two speakers in one chunk).
    Returns (embeddings (20, 3, DIM), segmentations (20, 589, 3), truth (20, 3) speaker id, -1 inactive)."""
    rng = np.random.default_rng(0)
    a = np.eye(DIM)[0]
    b = 0.9 * np.eye(DIM)[0] + np.sqrt(1 - 0.81) * np.eye(DIM)[1]
    truth = np.full((20, 3), -1)
    truth[:10, 0], truth[10:, 0], truth[5, 1] = 0, 1, 1
    embeddings = np.full((20, 3, DIM), np.nan)
    for (c, s), speaker in np.ndenumerate(truth):
        if speaker >= 0:
            embeddings[c, s] = (a, b)[speaker] + 0.02 * rng.normal(size=DIM)
    seg = _segmentations(20)
    seg[:, :, 0] = 1
    seg[5, :overlap_frames, 1] = 1
    return embeddings, seg, truth


@pytest.mark.parametrize("name", sorted(CLUSTERING))
def test_option_raises_the_cluster_count_of_every_variant(name: str, caplog: pytest.LogCaptureFixture) -> None:
    embeddings, seg, truth = _close_speakers_with_overlap()  # 200 frames = 3.375 s of overlap
    assert get_clustering(name)(embeddings, seg).num_clusters == 1  # the collapse the option addresses
    with caplog.at_level(logging.INFO, logger="diaropt.pipeline.clustering"):
        result = get_clustering(name, min_clusters_overlap_s=1.0)(embeddings, seg, uri="meeting_a")
    assert result.num_clusters == 2
    assert "meeting_a: 2 local speakers active at once" in caplog.text
    hard = result.hard_clusters
    assert hard[5, 0] != hard[5, 1] and min(hard[5, :2]) >= 0
    # the split follows the speakers (the two close directions), not an arbitrary partition
    assert len(set(hard[truth == 0])) == 1 and len(set(hard[truth == 1])) == 1
    assert set(hard[truth == 0]) != set(hard[truth == 1])


@pytest.mark.parametrize("name", sorted(CLUSTERING))
def test_option_yields_to_explicit_counts_and_short_overlap(name: str) -> None:
    embeddings, seg, _ = _close_speakers_with_overlap()
    assert get_clustering(name, min_clusters_overlap_s=4.0)(embeddings, seg).num_clusters == 1  # 3.4 s < 4 s
    clustering = get_clustering(name, min_clusters_overlap_s=1.0)
    assert clustering(embeddings, seg, max_speakers=1).num_clusters == 1
    assert clustering(embeddings, seg, num_speakers=1).num_clusters == 1
    without = clustering(embeddings, None).hard_clusters  # without segmentations: no count to read, no change
    np.testing.assert_array_equal(without, get_clustering(name)(embeddings, None).hard_clusters)


def test_config_key_reaches_every_variant_and_defaults_off() -> None:
    for name in sorted(CLUSTERING):
        assert clustering_from_config(compose([f"clustering={name}"])).min_clusters_overlap_s is None
        configured = clustering_from_config(compose([f"clustering={name}", "clustering.min_clusters_overlap_s=1.5"]))
        assert configured.min_clusters_overlap_s == 1.5
    with pytest.raises(ValueError, match="min_clusters_overlap_s"):
        get_clustering("vbx", min_clusters_overlap_s=0.0)
