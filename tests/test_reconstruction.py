from __future__ import annotations

import numpy as np
import pytest
from pyannote.core import Annotation, Segment, SlidingWindow, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate

from diaropt.pipeline.clustering import get_clustering
from diaropt.pipeline.preprocessing import (
    POWERSET_MAPPING,
    SEGMENTATION_FRAMES,
    active_local_speakers,
    powerset_to_multilabel,
    speaker_count,
)
from diaropt.pipeline.reconstruction import cluster_activations, reconstruct, to_annotation

UNIT_FRAMES = SlidingWindow(start=0.0, duration=1.0, step=1.0)
STEP_S = SEGMENTATION_FRAMES.step


def test_cluster_activations_max_over_mapped_local_speakers() -> None:
    seg = np.zeros((1, 4, 3))
    seg[0, :, 0] = [1, 0, 0, 1]
    seg[0, :, 1] = [0, 1, 0, 1]
    seg[0, :, 2] = [1, 1, 1, 1]
    act = cluster_activations(seg, np.array([[1, 1, -2]]), num_clusters=3)
    assert act.shape == (1, 4, 3)
    assert np.all(np.isnan(act[0, :, 0])) and np.all(np.isnan(act[0, :, 2]))
    np.testing.assert_array_equal(act[0, :, 1], [1, 1, 0, 1])
    with pytest.raises(ValueError):
        cluster_activations(seg, np.array([[1, 3, -2]]), num_clusters=3)


def test_reconstruct_keeps_top_count_clusters_with_sum_overlap_add() -> None:
    # two chunks of 3 unit frames starting at 0 and 1 -> 4 output frames
    seg = np.zeros((2, 3, 3))
    seg[0, :, 0] = [1, 1, 1]  # cluster 0
    seg[0, :, 1] = [0, 1, 1]  # cluster 1
    seg[1, :, 0] = [1, 1, 0]  # cluster 1
    seg[1, :, 2] = [0, 1, 1]  # cluster 2
    hard = np.array([[0, 1, -2], [1, -2, 2]], dtype=np.int8)
    # summed activations per frame: f0 [1,0,0], f1 [1,2,0], f2 [1,2,1], f3 [0,0,1]
    count = np.array([1, 1, 2, 1], dtype=np.uint8)
    discrete = reconstruct(seg, hard, count, np.array([0.0, 1.0]), UNIT_FRAMES)
    assert discrete.dtype == np.uint8 and discrete.shape == (4, 3)
    np.testing.assert_array_equal(
        discrete, [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]  # f2 tie 0 vs 2 -> lower index
    )


def test_reconstruct_zero_activation_policy() -> None:
    seg = np.ones((1, 2, 3))
    hard = np.array([[0, -2, -2]])
    count = np.array([2, 0], dtype=np.uint8)  # count says 2 but only cluster 0 is active
    strict = reconstruct(seg, hard, count, np.array([0.0]), UNIT_FRAMES, num_clusters=2)
    np.testing.assert_array_equal(strict, [[1, 0], [0, 0]])
    loose = reconstruct(
        seg, hard, count, np.array([0.0]), UNIT_FRAMES, require_positive_activation=False
    )
    # pyannote behaviour: a silent (padded) column is picked to reach the count
    np.testing.assert_array_equal(loose, [[1, 1], [0, 0]])


def test_streamed_cluster_sum_equals_overlap_add_of_cluster_activations() -> None:
    """reconstruct() sums each chunk's per-cluster max straight into the output grid (no (C, F, K)
    intermediate): same sums, bit for bit, as overlap-adding ``cluster_activations``."""
    from diaropt.pipeline.preprocessing import overlap_add
    from diaropt.pipeline.reconstruction import _summed_cluster_activations

    rng = np.random.default_rng(0)
    num_chunks, num_frames = 40, 589
    seg = (rng.random((num_chunks, num_frames, 3)) > 0.6).astype(np.float32) * rng.random((num_chunks, 1, 3),
                                                                                             dtype=np.float32)
    hard = rng.integers(-2, 5, size=(num_chunks, 3)).astype(np.int8)
    starts_s = np.arange(num_chunks) * 1.0
    num_out = 40 * 60 + 100  # shorter than the last chunk's end: frames beyond are dropped alike
    expected = overlap_add(cluster_activations(seg, hard, 6), starts_s, SEGMENTATION_FRAMES, num_out_frames=num_out,
                           average=False, missing=0.0)
    streamed = _summed_cluster_activations(seg, hard, starts_s, SEGMENTATION_FRAMES, num_out, 6)
    np.testing.assert_array_equal(streamed, expected)
    assert streamed.dtype == np.float64 and streamed.shape == (num_out, 6)


def _rounded(timeline: Timeline) -> list[tuple[float, float]]:
    return [(round(s.start, 6), round(s.end, 6)) for s in timeline]


def test_to_annotation_min_durations_and_labels() -> None:
    frames = SlidingWindow(start=0.0, duration=0.2, step=0.1)
    discrete = np.zeros((30, 2), dtype=np.uint8)
    discrete[0:5, 0] = 1
    discrete[7:12, 0] = 1  # gap of 2 frames (0.2 s)
    discrete[20:22, 1] = 1  # 0.2 s segment
    discrete[25:30, 1] = 1  # reaches the last frame
    plain = to_annotation(discrete, frames, uri="file")
    assert plain.uri == "file"
    assert plain.labels() == ["SPEAKER_00", "SPEAKER_01"]
    segments = sorted(
        (round(s.start, 6), round(s.end, 6), label)
        for s, _, label in plain.itertracks(yield_label=True)
    )
    # boundaries at frame middles: frame t middle = t * 0.1 + 0.1
    assert segments == [
        (0.1, 0.6, "SPEAKER_00"),
        (0.8, 1.3, "SPEAKER_00"),
        (2.1, 2.3, "SPEAKER_01"),
        (2.6, 3.1, "SPEAKER_01"),
    ]
    filled = to_annotation(discrete, frames, min_duration_off_s=0.25)
    assert _rounded(filled.label_timeline("SPEAKER_00")) == [(0.1, 1.3)]
    pruned = to_annotation(discrete, frames, min_duration_on_s=0.3)
    assert _rounded(pruned.label_timeline("SPEAKER_01")) == [(2.6, 3.1)]
    assert len(to_annotation(np.zeros((5, 3)), frames)) == 0


# --- end to end -----------------------------------------------------------------------------

# file-level truth: speaker "A" on [1, 4] and [11, 13], speaker "B" on [3, 7]
TRUTH_S = {"A": [(1.0, 4.0), (11.0, 13.0)], "B": [(3.0, 7.0)]}
CHUNK_STARTS_S = np.array([0.0, 5.0])  # 15 s file, 10 s chunks, step 5 s
# local slot of each speaker per chunk (deliberately different in the two chunks)
SLOTS = [{"A": 0, "B": 1}, {"A": 2, "B": 0}]


def _hand_made_logprobs() -> np.ndarray:
    num_frames = 589
    middles_s = (
        SEGMENTATION_FRAMES.start
        + np.arange(num_frames) * STEP_S
        + SEGMENTATION_FRAMES.duration / 2
    )
    logprobs = np.full((2, num_frames, 7), np.log(1e-4), dtype=np.float32)
    for c, chunk_start_s in enumerate(CHUNK_STARTS_S):
        multilabel = np.zeros((num_frames, 3))
        for speaker, intervals in TRUTH_S.items():
            for start_s, end_s in intervals:
                file_middles_s = chunk_start_s + middles_s
                inside = (file_middles_s >= start_s) & (file_middles_s < end_s)
                multilabel[inside, SLOTS[c][speaker]] = 1
        classes = [
            int(np.flatnonzero((POWERSET_MAPPING == row).all(axis=1))[0]) for row in multilabel
        ]
        logprobs[c, np.arange(num_frames), classes] = np.log(0.99)
    return logprobs


def test_end_to_end_hand_made_segmentation_to_annotation() -> None:
    segmentations = powerset_to_multilabel(_hand_made_logprobs())
    active = active_local_speakers(segmentations)
    np.testing.assert_array_equal(active, [[True, True, False], [True, False, True]])

    # embeddings: per-speaker direction, NaN for skipped slots
    directions = {"A": np.eye(8)[0], "B": np.eye(8)[1]}
    embeddings = np.full((2, 3, 8), np.nan, dtype=np.float32)
    for c, slots in enumerate(SLOTS):
        for speaker, slot in slots.items():
            embeddings[c, slot] = directions[speaker]
    embeddings[~active] = np.nan

    clustering = get_clustering("ahc")(embeddings, segmentations)
    hard = clustering.hard_clusters
    np.testing.assert_array_equal(hard, [[0, 1, -2], [1, -2, 0]])

    count = speaker_count(segmentations, CHUNK_STARTS_S, SEGMENTATION_FRAMES)
    assert count.max() == 2
    discrete = reconstruct(
        segmentations, hard, count, CHUNK_STARTS_S, SEGMENTATION_FRAMES,
        num_clusters=clustering.num_clusters,
    )
    assert discrete.shape == (count.shape[0], 2)
    np.testing.assert_array_equal(discrete.sum(axis=1), count)  # both clusters always active

    hypothesis = to_annotation(discrete, SEGMENTATION_FRAMES, uri="toy")
    expected = {"SPEAKER_00": TRUTH_S["A"], "SPEAKER_01": TRUTH_S["B"]}
    assert sorted(hypothesis.labels()) == sorted(expected)
    for label, intervals in expected.items():
        got = [(s.start, s.end) for s in hypothesis.label_timeline(label)]
        assert len(got) == len(intervals), (label, got)
        for (start_s, end_s), (ref_start_s, ref_end_s) in zip(got, intervals):
            assert abs(start_s - ref_start_s) <= STEP_S + 1e-9, (label, start_s, ref_start_s)
            assert abs(end_s - ref_end_s) <= STEP_S + 1e-9, (label, end_s, ref_end_s)

    reference = Annotation(uri="toy")
    for label, intervals in TRUTH_S.items():
        for start_s, end_s in intervals:
            reference[Segment(start_s, end_s), label] = label
    uem = Timeline([Segment(0.0, 15.0)])
    assert DiarizationErrorRate()(reference, hypothesis, uem=uem) < 0.01
