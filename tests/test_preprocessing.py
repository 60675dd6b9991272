from __future__ import annotations

import numpy as np
import pytest
from pyannote.core import SlidingWindow

from diaropt.pipeline.preprocessing import (
    POWERSET_MAPPING,
    SEGMENTATION_FRAMES,
    active_local_speakers,
    chunk_frame_offsets,
    clean_frame_masks,
    embedding_masks,
    num_output_frames,
    overlap_add,
    powerset_to_multilabel,
    speaker_count,
)

UNIT_FRAMES = SlidingWindow(start=0.0, duration=1.0, step=1.0)


def test_powerset_mapping_is_exact() -> None:
    expected = [
        [0, 0, 0],  # none
        [1, 0, 0],  # {0}
        [0, 1, 0],  # {1}
        [0, 0, 1],  # {2}
        [1, 1, 0],  # {0,1}
        [1, 0, 1],  # {0,2}
        [0, 1, 1],  # {1,2}
    ]
    np.testing.assert_array_equal(POWERSET_MAPPING, expected)
    assert not POWERSET_MAPPING.flags.writeable


def test_powerset_to_multilabel_decodes_each_class() -> None:
    # one chunk, 7 frames, frame i has class i as its argmax
    logprobs = np.full((1, 7, 7), -10.0, dtype=np.float32)
    logprobs[0, np.arange(7), np.arange(7)] = -0.01
    multilabel = powerset_to_multilabel(logprobs)
    assert multilabel.shape == (1, 7, 3)
    assert multilabel.dtype == np.float32
    np.testing.assert_array_equal(multilabel[0], POWERSET_MAPPING)


def test_powerset_to_multilabel_matches_one_hot_matmul() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50, 7))
    logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    one_hot = np.eye(7, dtype=np.float32)[np.argmax(logprobs, axis=-1)]
    np.testing.assert_array_equal(powerset_to_multilabel(logprobs), one_hot @ POWERSET_MAPPING)
    with pytest.raises(ValueError):
        powerset_to_multilabel(logprobs[..., :6])


def _hand_segmentation() -> np.ndarray:
    # 1 chunk, 6 frames, 3 local speakers
    seg = np.array(
        [
            [1, 0, 0],
            [1, 1, 0],
            [0, 1, 0],
            [0, 0, 0],
            [1, 0, 1],
            [1, 0, 0],
        ],
        dtype=np.float32,
    )
    return seg[None]


def test_clean_frame_masks_drop_overlapped_frames() -> None:
    clean = clean_frame_masks(_hand_segmentation())
    expected = np.array(
        [
            [1, 0, 0],
            [0, 0, 0],
            [0, 1, 0],
            [0, 0, 0],
            [0, 0, 0],
            [1, 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(clean[0], expected)


def test_embedding_masks_fall_back_to_full_mask() -> None:
    seg = _hand_segmentation()
    full = seg[0]
    clean = clean_frame_masks(seg)[0]
    # speaker 0 has 2 clean frames, speaker 1 has 1, speaker 2 has 0
    masks = embedding_masks(seg, min_num_clean_frames=1)[0]
    np.testing.assert_array_equal(masks[:, 0], clean[:, 0])  # 2 > 1: clean
    np.testing.assert_array_equal(masks[:, 1], full[:, 1])  # 1 > 1 is False: full
    np.testing.assert_array_equal(masks[:, 2], full[:, 2])  # no clean frame: full
    # default minimum 0: any clean frame suffices
    masks0 = embedding_masks(seg)[0]
    np.testing.assert_array_equal(masks0[:, 1], clean[:, 1])
    np.testing.assert_array_equal(masks0[:, 2], full[:, 2])
    # ratio: ceil(0.3 * 6) = 2 -> speaker 0 (2 clean frames) falls back to full as well
    masks_ratio = embedding_masks(seg, min_clean_frames_ratio=0.3)[0]
    np.testing.assert_array_equal(masks_ratio, full)
    with pytest.raises(ValueError):
        embedding_masks(seg, 1, min_clean_frames_ratio=0.1)


def test_active_local_speakers_skips_silent_slots() -> None:
    seg = np.zeros((2, 10, 3), dtype=np.float32)
    seg[0, :4, 0] = 1
    seg[0, :1, 1] = 1
    seg[1, :, 2] = 1
    np.testing.assert_array_equal(
        active_local_speakers(seg), [[True, True, False], [False, False, True]]
    )
    np.testing.assert_array_equal(
        active_local_speakers(seg, min_active_frames=2),
        [[True, False, False], [False, False, True]],
    )


def test_chunk_frame_offsets_round_to_grid() -> None:
    offsets = chunk_frame_offsets(np.array([0.0, 1.0, 2.5]), SEGMENTATION_FRAMES)
    # 1 / 0.016875 = 59.26, 2.5 / 0.016875 = 148.15
    np.testing.assert_array_equal(offsets, [0, 59, 148])


def test_speaker_count_two_chunk_overlap_add() -> None:
    seg = np.zeros((2, 4, 3), dtype=np.float32)
    # chunk 0 per-frame counts [1, 2, 2, 1]
    seg[0, :, 0] = 1
    seg[0, 1:3, 1] = 1
    # chunk 1 (starts at output frame 2) per-frame counts [1, 1, 0, 1]
    seg[1, [0, 1, 3], 2] = 1
    count = speaker_count(seg, np.array([0.0, 2.0]), UNIT_FRAMES)
    assert count.dtype == np.uint8
    # frame 2: (2 + 1) / 2 = 1.5 -> 2 ; frame 3: (1 + 1) / 2 = 1 ; frame 4: 0 / 1
    np.testing.assert_array_equal(count, [1, 2, 2, 1, 0, 1])
    # explicit number of output frames: pad with 0 / crop
    np.testing.assert_array_equal(
        speaker_count(seg, np.array([0.0, 2.0]), UNIT_FRAMES, num_out_frames=8),
        [1, 2, 2, 1, 0, 1, 0, 0],
    )


def test_speaker_count_real_grid_with_end_aligned_last_chunk() -> None:
    file_duration_s = 12.5
    chunk_starts_s = np.array([0.0, 1.0, 2.0, file_duration_s - 10.0])
    seg = np.zeros((4, 589, 3), dtype=np.float32)
    seg[:, :, 1] = 1  # one speaker everywhere
    count = speaker_count(seg, chunk_starts_s, SEGMENTATION_FRAMES)
    assert count.shape == (num_output_frames(chunk_starts_s, 589, SEGMENTATION_FRAMES),)
    assert count.shape == (148 + 589,)
    assert np.all(count == 1)
    # the output grid reaches the end of the file (within one frame)
    last_end_s = (count.shape[0] - 1) * SEGMENTATION_FRAMES.step + SEGMENTATION_FRAMES.duration
    assert abs(last_end_s - file_duration_s) < 2 * SEGMENTATION_FRAMES.step


def test_overlap_add_ignores_nan_and_sums() -> None:
    values = np.array([[[1.0], [np.nan]], [[3.0], [5.0]]])  # 2 chunks, 2 frames, 1 class
    averaged = overlap_add(values, np.array([0.0, 1.0]), UNIT_FRAMES, missing=-1.0)
    np.testing.assert_allclose(averaged[:, 0], [1.0, 3.0, 5.0])
    summed = overlap_add(values, np.array([0.0, 0.0]), UNIT_FRAMES, average=False, missing=-1.0)
    np.testing.assert_allclose(summed[:, 0], [4.0, 5.0])
    all_nan = overlap_add(np.full((1, 2, 1), np.nan), np.array([0.0]), UNIT_FRAMES, missing=-1.0)
    np.testing.assert_allclose(all_nan[:, 0], [-1.0, -1.0])
