from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diaropt.pipeline.clustering import (
    CLUSTERING,
    UNASSIGNED,
    AgglomerativeClustering,
    OnlineEMAClustering,
    VBxClustering,
    constrained_assignment,
    get_clustering,
    resolve_cluster_bounds,
)

DIM = 16


def _speakers(num_speakers: int, seed: int = 0) -> np.ndarray:
    """Orthonormal speaker directions (num_speakers, DIM)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
    return q[:num_speakers]


def _make_embeddings(
    truth: np.ndarray, speakers: np.ndarray, noise: float = 0.05, seed: int = 1
) -> np.ndarray:
    """``truth (num_chunks, 3)`` speaker ids (-1 = inactive) -> embeddings with NaN rows."""
    rng = np.random.default_rng(seed)
    emb = np.full(truth.shape + (DIM,), np.nan)
    active = truth >= 0
    emb[active] = speakers[truth[active]] + noise * rng.normal(size=(int(active.sum()), DIM))
    # scale must not matter (cosine)
    emb[active] *= rng.uniform(0.5, 3.0, size=(int(active.sum()), 1))
    return emb.astype(np.float32)


def _random_truth(num_chunks: int, num_speakers: int, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    truth = np.full((num_chunks, 3), -1)
    for c in range(num_chunks):
        num_present = rng.integers(1, min(3, num_speakers) + 1)
        present = rng.choice(num_speakers, size=num_present, replace=False)
        slots = rng.choice(3, size=present.size, replace=False)
        truth[c, slots] = present
    return truth


def _options(name: str, **options) -> dict:
    """``options`` without the ones variant ``name`` does not have (vbx has no min_cluster_size)."""
    if name == "vbx":
        options.pop("min_cluster_size", None)
    return options


def _assert_no_shared_cluster(hard: np.ndarray) -> None:
    for row in hard:
        assigned = row[row >= 0]
        assert assigned.size == np.unique(assigned).size, row


def _assert_matches_truth(hard: np.ndarray, truth: np.ndarray) -> None:
    """Same partition as ``truth`` on active slots (a bijection speaker <-> cluster)."""
    active = truth >= 0
    assert np.all(hard[active] >= 0)
    assert np.all(hard[~active] == UNASSIGNED)
    pairs = set(zip(truth[active].tolist(), hard[active].tolist()))
    assert len(pairs) == len({t for t, _ in pairs}) == len({h for _, h in pairs})


@pytest.mark.parametrize("min_cluster_size", [1, 12])
def test_ahc_threshold_finds_well_separated_speakers(min_cluster_size: int) -> None:
    truth = _random_truth(40, 3)
    emb = _make_embeddings(truth, _speakers(3))
    result = AgglomerativeClustering(min_cluster_size=min_cluster_size)(emb)
    assert result.hard_clusters.dtype == np.int8
    assert result.hard_clusters.shape == (40, 3)
    assert result.centroids.shape == (3, DIM)
    assert result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    _assert_matches_truth(result.hard_clusters, truth)
    # clusters numbered by first appearance
    first = result.hard_clusters[result.hard_clusters >= 0]
    assert first[0] == 0


def test_ahc_threshold_controls_merging() -> None:
    # two speakers at cosine similarity 0.9 (euclidean ~0.447 between unit vectors)
    a = np.zeros(DIM)
    a[0] = 1.0
    b = np.zeros(DIM)
    b[0], b[1] = 0.9, np.sqrt(1 - 0.81)
    truth = _random_truth(30, 2, seed=5)
    emb = _make_embeddings(truth, np.stack([a, b]), noise=0.005)
    assert AgglomerativeClustering(threshold=0.7, min_cluster_size=1)(emb).num_clusters == 1
    strict = AgglomerativeClustering(threshold=0.2, min_cluster_size=1)(emb)
    assert strict.num_clusters == 2
    _assert_matches_truth(strict.hard_clusters, truth)


@pytest.mark.parametrize("num_speakers", [1, 2, 3, 4, 6])
def test_ahc_forced_count_is_exact(num_speakers: int) -> None:
    truth = _random_truth(30, 3, seed=3)
    emb = _make_embeddings(truth, _speakers(3))
    result = AgglomerativeClustering()(emb, num_speakers=num_speakers)
    assert result.num_clusters == num_speakers
    hard = result.hard_clusters
    _assert_no_shared_cluster(hard)
    assert set(np.unique(hard[hard >= 0]).tolist()) <= set(range(num_speakers))
    assert np.all(hard[truth < 0] == UNASSIGNED)


def test_ahc_min_max_speakers_clip_the_count() -> None:
    truth = _random_truth(30, 3, seed=4)
    emb = _make_embeddings(truth, _speakers(3))
    ahc = get_clustering("ahc")
    assert ahc(emb, min_speakers=5).num_clusters == 5
    assert ahc(emb, max_speakers=2).num_clusters == 2
    unchanged = ahc(emb, min_speakers=2, max_speakers=5)
    assert unchanged.num_clusters == 3
    _assert_matches_truth(unchanged.hard_clusters, truth)
    assert ahc(emb, min_speakers=4, max_speakers=4).num_clusters == 4


def test_resolve_cluster_bounds() -> None:
    bounds = resolve_cluster_bounds(10, num_speakers=3)
    assert (bounds.num_clusters, bounds.min_clusters, bounds.max_clusters) == (3, 1, 10)
    assert resolve_cluster_bounds(2, num_speakers=5).num_clusters == 2  # clipped
    assert resolve_cluster_bounds(10, min_speakers=2, max_speakers=2).num_clusters == 2
    with pytest.raises(ValueError):
        resolve_cluster_bounds(10, min_speakers=3, max_speakers=2)
    with pytest.raises(ValueError):
        resolve_cluster_bounds(10, num_speakers=4, max_speakers=3)
    with pytest.raises(ValueError):
        resolve_cluster_bounds(10, num_speakers=0)


@pytest.mark.parametrize("name", sorted(CLUSTERING))
def test_skipped_and_silent_speakers_get_minus_two(name: str) -> None:
    speakers = _speakers(2)
    truth = np.array([[0, 1, -1], [1, -1, 0], [0, 1, -1], [-1, -1, -1]])
    emb = _make_embeddings(truth, speakers)
    # slot (2, 1) has a finite embedding but is silent in the segmentation
    seg = np.repeat((truth >= 0)[:, None, :], 20, axis=1).astype(np.float32)
    seg[2, :, 1] = 0.0
    result = get_clustering(name, **_options(name, min_cluster_size=1))(emb, seg)
    hard = result.hard_clusters
    assert np.all(hard[truth < 0] == UNASSIGNED)
    assert hard[2, 1] == UNASSIGNED
    assert hard[0, 0] == hard[1, 2] == hard[2, 0] != UNASSIGNED
    assert hard[0, 1] == hard[1, 0] != hard[0, 0]


def test_all_skipped_gives_empty_result() -> None:
    emb = np.full((3, 3, DIM), np.nan, dtype=np.float32)
    for name in CLUSTERING:
        result = get_clustering(name)(emb, num_speakers=2)
        assert result.num_clusters == 0
        assert result.centroids.shape == (0, DIM)
        assert np.all(result.hard_clusters == UNASSIGNED)


def test_constrained_assignment_with_identical_embeddings() -> None:
    speakers = _speakers(3)
    emb = np.full((2, 3, DIM), np.nan)
    emb[0, 0] = emb[0, 1] = speakers[0]  # identical local speakers
    emb[1] = speakers[0]  # three identical local speakers, only two clusters
    hard = constrained_assignment(emb, speakers[:2])
    assert hard.dtype == np.int8
    assert sorted(hard[0, :2].tolist()) == [0, 1]
    assert hard[0, 2] == UNASSIGNED
    assert sorted(hard[1].tolist()) == [UNASSIGNED, 0, 1]
    # labels already fixed in `initial` are kept and blocked for the other slots
    initial = np.array([[1, -2, -2], [-2, -2, -2]])
    fixed = constrained_assignment(emb, speakers[:2], initial=initial)
    assert fixed[0, 0] == 1 and fixed[0, 1] == 0


def test_ahc_identical_embeddings_in_one_chunk_get_distinct_clusters() -> None:
    speakers = _speakers(2)
    truth = _random_truth(20, 2, seed=6)
    emb = _make_embeddings(truth, speakers).astype(np.float64)
    emb[0, :2] = speakers[0]  # two copies of speaker 0 in chunk 0
    emb[0, 2] = np.nan
    result = AgglomerativeClustering()(emb, num_speakers=2)
    _assert_no_shared_cluster(result.hard_clusters)
    assert sorted(result.hard_clusters[0, :2].tolist()) == [0, 1]


def test_online_ema_tracks_speakers_across_slots() -> None:
    speakers = _speakers(3)
    truth = np.array(
        [
            [0, 1, -1],
            [1, 0, -1],
            [-1, 0, 1],
            [1, -1, 0],
            [2, 0, -1],  # speaker 2 appears late
            [0, 2, 1],
            [-1, -1, 2],
        ]
    )
    emb = _make_embeddings(truth, speakers)
    result = OnlineEMAClustering(threshold=0.5)(emb)
    assert result.num_clusters == 3
    _assert_matches_truth(result.hard_clusters, truth)
    # numbered by first appearance: speaker 0 -> 0, 1 -> 1, 2 -> 2
    np.testing.assert_array_equal(result.hard_clusters[0, :2], [0, 1])
    assert result.hard_clusters[4, 0] == 2


def test_online_ema_follows_drifting_speaker() -> None:
    speakers = _speakers(3)
    num_chunks = 40
    angles = np.linspace(0.0, np.pi / 3, num_chunks)  # 60 degree drift, 1.5 degree per chunk
    drifting = np.cos(angles)[:, None] * speakers[0] + np.sin(angles)[:, None] * speakers[1]
    emb = np.full((num_chunks, 3, DIM), np.nan)
    emb[:, 0] = drifting
    emb[:, 1] = speakers[2]
    result = OnlineEMAClustering(threshold=0.2, ema_alpha=0.3)(emb)
    # start and end are 60 degrees apart (cosine 0.5 < 1 - 0.2), yet one speaker is tracked
    assert result.num_clusters == 2
    assert np.all(result.hard_clusters[:, 0] == 0)
    assert np.all(result.hard_clusters[:, 1] == 1)
    centroid = result.centroids[0]
    assert centroid @ drifting[-1] > centroid @ drifting[0]


def test_online_ema_max_and_forced_num_speakers() -> None:
    truth = _random_truth(30, 3, seed=8)
    emb = _make_embeddings(truth, _speakers(3))
    online = get_clustering("online_ema", threshold=0.5)
    capped = online(emb, max_speakers=2)
    assert capped.num_clusters == 2
    _assert_no_shared_cluster(capped.hard_clusters)
    merged = online(emb, num_speakers=2)
    assert merged.num_clusters == 2
    _assert_no_shared_cluster(merged.hard_clusters)
    # a chunk holding the three speakers keeps two of them after merging down to 2 clusters
    num_assigned = np.sum(merged.hard_clusters >= 0, axis=1)
    assert np.all(num_assigned == np.minimum(np.sum(truth >= 0, axis=1), 2))
    # cannot invent speakers: num_speakers above the tracked count is a no-op
    assert online(emb, num_speakers=3).num_clusters == 3


def test_online_ema_absorbs_small_clusters() -> None:
    speakers = _speakers(3)
    truth = np.zeros((12, 3), dtype=np.int64) - 1
    truth[:, 0] = 0
    truth[:, 1] = 1
    truth[5, 2] = 2  # one-off outlier speaker
    emb = _make_embeddings(truth, speakers)
    assert OnlineEMAClustering(threshold=0.5)(emb).num_clusters == 3
    result = OnlineEMAClustering(threshold=0.5, min_cluster_size=2)(emb)
    assert result.num_clusters == 2
    _assert_no_shared_cluster(result.hard_clusters)


def test_get_clustering_registry() -> None:
    assert set(CLUSTERING) == {"ahc", "online_ema", "vbx"}
    ahc = get_clustering("ahc", threshold=0.5, min_cluster_size=3)
    assert isinstance(ahc, AgglomerativeClustering)
    assert (ahc.threshold, ahc.min_cluster_size) == (0.5, 3)
    assert isinstance(get_clustering("online_ema", ema_alpha=0.2), OnlineEMAClustering)
    with pytest.raises(ValueError, match="ahc.*online_ema"):
        get_clustering("spectral")


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(CLUSTERING)),
    seed=st.integers(0, 10_000),
    num_chunks=st.integers(1, 12),
    num_speakers=st.one_of(st.none(), st.integers(1, 4)),
)
def test_output_contract_holds_on_random_inputs(
    name: str, seed: int, num_chunks: int, num_speakers: int | None
) -> None:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(num_chunks, 3, 8)).astype(np.float32)
    skipped = rng.random((num_chunks, 3)) < 0.3
    emb[skipped] = np.nan
    result = get_clustering(name, **_options(name, min_cluster_size=2))(emb, num_speakers=num_speakers)
    hard = result.hard_clusters
    assert hard.shape == (num_chunks, 3) and hard.dtype == np.int8
    assert np.all(hard[skipped] == UNASSIGNED)
    assert np.all((hard == UNASSIGNED) | ((hard >= 0) & (hard < result.num_clusters)))
    _assert_no_shared_cluster(hard)
    assert result.centroids.shape == (result.num_clusters, 8)
    if num_speakers is not None:  # every method meets a forced count it can meet
        assert result.num_clusters == min(num_speakers, int((~skipped).sum()))


# ------------------------------------------------------------------ speaker counts, min_cluster_size


def _ten_speaker_embeddings(num_speakers: int = 10, noise: float = 0.35, seed: int = 3) -> np.ndarray:
    """Speakers as random unit directions in 64 dims (cosine ~0 between them), noisy embeddings."""
    rng = np.random.default_rng(seed)
    speakers = rng.normal(size=(num_speakers, 64))
    speakers /= np.linalg.norm(speakers, axis=1, keepdims=True)
    truth = _random_truth(120, num_speakers, seed=seed)
    emb = np.full(truth.shape + (64,), np.nan)
    active = truth >= 0
    emb[active] = speakers[truth[active]] + noise / 8 * rng.normal(size=(int(active.sum()), 64))
    return emb


@pytest.mark.parametrize("name", sorted(CLUSTERING))
@pytest.mark.parametrize("num_speakers", [2, 5, 7, 10])
def test_forced_count_is_exact_for_every_method(name: str, num_speakers: int) -> None:
    """num_speakers=N gives N clusters, all used, for N up to 10, whatever the threshold finds."""
    emb = _ten_speaker_embeddings()
    for threshold in (0.2, 0.9):  # over- and under-clustering thresholds
        result = get_clustering(name, threshold=threshold)(emb, num_speakers=num_speakers)
        hard = result.hard_clusters
        assert result.num_clusters == num_speakers
        assert np.unique(hard[hard >= 0]).size == num_speakers
        _assert_no_shared_cluster(hard)


@pytest.mark.parametrize("name", sorted(CLUSTERING))
def test_min_and_max_speakers_bound_every_method(name: str) -> None:
    emb = _ten_speaker_embeddings()
    low = get_clustering(name, threshold=1.5)(emb, min_speakers=6)  # threshold alone merges a lot
    high = get_clustering(name, threshold=0.05)(emb, max_speakers=4)  # threshold alone splits a lot
    assert low.num_clusters >= 6 and high.num_clusters <= 4


@pytest.mark.parametrize("name", sorted(CLUSTERING))
def test_unmet_count_warns_naming_the_file(name: str, caplog: pytest.LogCaptureFixture) -> None:
    emb = _make_embeddings(np.array([[0, 1, -1], [1, 0, -1]]), _speakers(2))  # 4 usable embeddings
    with caplog.at_level("WARNING", logger="diaropt.pipeline.clustering"):
        result = get_clustering(name)(emb, num_speakers=6, uri="meeting_42")
    assert result.num_clusters <= 4
    assert any("meeting_42" in r.message and "num_speakers=6" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="diaropt.pipeline.clustering"):
        get_clustering(name)(emb, num_speakers=2, uri="meeting_42")
    assert not caplog.records


def test_count_defaults_from_the_constructor() -> None:
    emb = _ten_speaker_embeddings()
    for name in CLUSTERING:
        assert get_clustering(name, num_speakers=3)(emb).num_clusters == 3
        assert get_clustering(name, num_speakers=3)(emb, num_speakers=5).num_clusters == 5  # the call wins


@pytest.mark.parametrize("name", ["ahc", "online_ema"])
def test_min_cluster_size_changes_the_result(name: str) -> None:
    """A speaker with few embeddings is its own cluster with min_cluster_size=1 and is absorbed with 12."""
    rng = np.random.default_rng(0)
    speakers = _speakers(3)
    truth = _random_truth(40, 2)
    truth[5, 2], truth[17, 2], truth[30, 2] = 2, 2, 2  # speaker 2: three embeddings only
    emb = _make_embeddings(truth, speakers, seed=int(rng.integers(100)))
    small = get_clustering(name, min_cluster_size=1)(emb)
    large = get_clustering(name, min_cluster_size=12)(emb)
    assert small.num_clusters == 3 and large.num_clusters == 2


def test_vbx_merges_an_over_split_initialisation() -> None:
    """AHC cut far too low splits each speaker; VBx's prior re-estimation drops the redundant clusters."""
    truth = _random_truth(60, 3)
    emb = _make_embeddings(truth, _speakers(3), noise=0.15)
    ahc = get_clustering("ahc", threshold=0.4, min_cluster_size=1)(emb)
    vbx = get_clustering("vbx", threshold=0.4, fa=1.0, fb=0.8)(emb)
    assert ahc.num_clusters > 10
    assert vbx.num_clusters == 3
    _assert_matches_truth(vbx.hard_clusters, truth)


def test_vbx_refine_keeps_a_clean_partition() -> None:
    from diaropt.pipeline.clustering import vbx_refine

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(-3, 1, size=(30, 4)), rng.normal(3, 1, size=(30, 4))])
    labels = np.repeat([0, 1], 30)
    gamma, prior = vbx_refine(labels, features, np.full(4, 9.0), fa=1.0, fb=1.0)
    assert gamma.shape == (60, 2) and np.allclose(gamma.sum(axis=1), 1.0)
    np.testing.assert_array_equal(np.argmax(gamma, axis=1), labels)
    np.testing.assert_allclose(prior, [0.5, 0.5], atol=1e-6)


def test_method_must_match_the_class() -> None:
    with pytest.raises(ValueError, match="method"):
        AgglomerativeClustering(method="online_ema")
    assert isinstance(VBxClustering(method="vbx"), VBxClustering)


def test_vbx_fa_is_scaled_by_the_chunk_step() -> None:
    """Fa used by VBx = fa x chunk_step_s; the config passes segmentation.step_s as chunk_step_s."""
    from diaropt.config import compose
    from diaropt.runner import clustering_from_config

    truth = _random_truth(60, 3)
    emb = _make_embeddings(truth, _speakers(3), noise=0.3)
    doubled_step = get_clustering("vbx", threshold=0.4, fa=0.3, chunk_step_s=2.0)(emb)
    doubled_fa = get_clustering("vbx", threshold=0.4, fa=0.6, chunk_step_s=1.0)(emb)
    np.testing.assert_array_equal(doubled_step.hard_clusters, doubled_fa.hard_clusters)
    np.testing.assert_array_equal(doubled_step.centroids, doubled_fa.centroids)
    for step in (1.0, 2.0):
        clustering = clustering_from_config(compose([f"segmentation.step_s={step}", "clustering.fa=0.1"]))
        assert clustering.chunk_step_s == step and clustering.effective_fa == pytest.approx(0.1 * step)
    with pytest.raises(ValueError, match="chunk_step_s"):
        get_clustering("vbx", chunk_step_s=0.0)
