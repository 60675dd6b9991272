"""The analysis helpers of ``experiments/missed_decomposition.py`` (oracle clustering, missed-detection
split, per-chunk maximum count, embedding separation) on hand-made arrays with known answers."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import numpy as np
import pytest

from diaropt.config import REPO_ROOT


@pytest.fixture(scope="module")
def md() -> ModuleType:
    path = REPO_ROOT / "experiments/missed_decomposition.py"
    spec = importlib.util.spec_from_file_location("missed_decomposition", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_matches_local_to_reference_speakers_one_to_one(md: ModuleType) -> None:
    num_frames = 10
    segmentations = np.zeros((2, num_frames, 3), np.float32)
    offsets = np.array([0, 5])
    reference = np.zeros((15, 2), bool)  # output grid: 15 frames, 2 reference speakers
    reference[0:8, 0] = True
    reference[8:15, 1] = True
    # chunk 0 (frames 0-9): local 2 = ref 0 (frames 0-7), local 0 = ref 1 (8-9), local 1 silent
    segmentations[0, 0:8, 2] = 1
    segmentations[0, 8:10, 0] = 1
    # chunk 1 (frames 5-14): local 0 and local 1 both overlap ref 1 only, local 2 overlaps ref 0 a little
    segmentations[1, 3:10, 0] = 1  # output 8-14: ref 1, 7 frames
    segmentations[1, 4:6, 1] = 1  # output 9-10: ref 1, 2 frames (loses the one-to-one matching)
    segmentations[1, 0:3, 2] = 1  # output 5-7: ref 0
    hard = md.oracle_hard_clusters(segmentations, reference, offsets)
    np.testing.assert_array_equal(hard, [[1, -2, 0], [1, -2, 0]])
    assert hard.dtype == np.int8
    assert (md.oracle_hard_clusters(segmentations, np.zeros((15, 0), bool), offsets) == -2).all()


def test_missed_split_by_count_and_clusters(md: ModuleType) -> None:
    r = np.array([1, 2, 2, 3, 2, 1, 0])
    n = np.array([0, 1, 2, 1, 3, 1, 1])
    h = np.array([0, 1, 1, 1, 1, 1, 1])  # frames 2 and 4: count enough, one speaker fewer in the output
    m = np.array([1, 2, 2, 1, 3, 1, 1])  # some chunk counted frame 0's speaker and frame 1's second one
    split = md.missed_split(r, n, h, num_clusters=2, m=m)
    assert split == {"missed": 1 + 1 + 1 + 2 + 1, "count_zero": 1, "count_low": 1 + 2,
                     "count_ok_fewer_clusters": 1, "count_ok_enough_clusters": 1,
                     "count_zero_some_chunk": 1, "count_low_some_chunk": 1}
    assert "count_low_some_chunk" not in md.missed_split(r, n, h, num_clusters=2)


def test_chunk_max_count_takes_the_largest_chunk_on_each_frame(md: ModuleType) -> None:
    segmentations = np.zeros((2, 4, 3), np.float32)
    segmentations[0, :, 0] = 1
    segmentations[0, 3, 1] = 1
    segmentations[1, 0, :] = 1  # output frame 2: three active in chunk 1, one in chunk 0
    out = md.chunk_max_count(segmentations, np.array([0, 2]), num_out_frames=5)
    np.testing.assert_array_equal(out, [1, 1, 3, 2, 0])


def test_separation_of_orthogonal_speakers(md: ModuleType) -> None:
    embeddings = np.full((3, 3, 4), np.nan)
    embeddings[:, 0] = [1, 0, 0, 0]
    embeddings[:, 1] = [0, 2, 0, 0]  # scale does not matter
    embeddings[0, 2] = [0, 0, 1, 0]  # a third speaker with one embedding: not counted
    hard = np.array([[0, 1, 2]] * 3)
    out = md.separation(embeddings, hard)
    assert out["num_speakers_embedded"] == 2
    assert out["between_cosine_max"] == pytest.approx(0.0)
    assert out["within_cosine_mean"] == pytest.approx(1.0)
    assert np.isnan(md.separation(embeddings, np.where(hard == 0, 0, -2))["between_cosine_max"])


def test_a_bad_dataset_name_is_refused_before_any_work(md: ModuleType, tmp_path, capsys) -> None:
    """Every ``--dataset`` (and override) is composed first: a typo in the last name costs nothing computed
    and writes nothing; one line names it."""
    out = tmp_path / "md.json"
    assert md.main(["--dataset", "sample", "--dataset", "nosuch", "--out", str(out)]) == 2
    assert "--dataset nosuch" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".md").exists()
