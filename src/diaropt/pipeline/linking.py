"""Speaker linking between overlapping chunks (speaker tracking): embed fewer chunks than are segmented.

Consecutive 10 s chunks overlap by ``10 - step_s`` seconds, and the segmentation model's local
speakers of two chunks can be matched from their activity in the overlap (the same person is
active on the same frames). With ``embedding.anchor_every = k``, only every k-th chunk (and the
last) is an *anchor* whose active speakers are all embedded; a local speaker of any other chunk is
*linked* to the speaker of the nearest anchor it co-activates with in the overlap (Hungarian
matching of co-active frame counts), and inherits that speaker's cluster after clustering. Speakers
that match no anchor speaker (e.g. someone who starts talking outside the overlap) are embedded as
before. ``k = 1`` embeds every active speaker (no tracking).

Contracts (C chunks, F frames, L local speakers):
``link_to_anchors(segmentations (C, F, L) {0,1}, frame_offsets (C,), active (C, L) bool, k)`` ->
``Links(embed (C, L) bool, anchor_chunk (C, L) int64, anchor_speaker (C, L) int64)`` (``-1`` where
not linked); ``propagate_clusters(hard_clusters (C, L), links)`` -> ``(C, L)`` with linked slots set
to their anchor speaker's cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Links", "anchor_chunks", "link_to_anchors", "propagate_clusters"]


@dataclass(frozen=True)
class Links:
    embed: np.ndarray  # (C, L) bool: slots to embed
    anchor_chunk: np.ndarray  # (C, L) int64: anchor chunk a linked slot follows, -1 if none
    anchor_speaker: np.ndarray  # (C, L) int64: its local speaker in that chunk, -1 if none

    @property
    def num_linked(self) -> int:
        return int((self.anchor_chunk >= 0).sum())


def anchor_chunks(num_chunks: int, anchor_every: int) -> np.ndarray:
    """Sorted anchor chunk indices: every ``anchor_every``-th chunk and the last one."""
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be >= 1, got {anchor_every}")
    if num_chunks == 0:
        return np.zeros(0, dtype=np.int64)
    return np.union1d(np.arange(0, num_chunks, anchor_every), [num_chunks - 1]).astype(np.int64)


def _co_activity(segmentations: np.ndarray, frame_offsets: np.ndarray, chunk: int,
                 anchor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(co-active frames (L, L), chunk activity in the overlap (L,), anchor activity (L,), overlap
    frames) between ``chunk`` and ``anchor`` on the shared output grid."""
    num_frames = segmentations.shape[1]
    shift = int(frame_offsets[chunk] - frame_offsets[anchor])  # chunk frame t = anchor frame t + shift
    start, stop = max(0, -shift), min(num_frames, num_frames - shift)
    if stop <= start:
        empty = np.zeros(segmentations.shape[2])
        return np.zeros((len(empty), len(empty))), empty, empty, 0
    ours = segmentations[chunk, start:stop]
    theirs = segmentations[anchor, start + shift: stop + shift]
    return ours.T @ theirs, ours.sum(axis=0), theirs.sum(axis=0), stop - start


def link_to_anchors(segmentations: np.ndarray, frame_offsets: np.ndarray, active: np.ndarray, anchor_every: int,
                    min_overlap_ratio: float = 0.5, min_agreement: float = 0.5,
                    min_overlap_frames: int = 10) -> Links:
    """Which slots to embed and which to link (see the module docstring).

    A slot ``(c, i)`` of a non-anchor chunk is linked to ``(a, j)`` of the previous or next anchor
    when the chunks overlap by at least ``min_overlap_ratio`` of a chunk, Hungarian matching of
    co-active frames pairs ``i`` with an active ``j``, ``i`` is active on at least
    ``min_overlap_frames`` overlap frames, and the co-active frames are at least ``min_agreement``
    of the smaller of the two speakers' overlap activity. The anchor with more co-active frames wins.
    """
    segmentations = (np.asarray(segmentations) > 0).astype(np.float64)
    active = np.asarray(active, dtype=bool)
    num_chunks, num_frames, num_slots = segmentations.shape
    embed = active.copy()
    anchor_chunk = np.full((num_chunks, num_slots), -1, dtype=np.int64)
    anchor_speaker = np.full((num_chunks, num_slots), -1, dtype=np.int64)
    anchors = anchor_chunks(num_chunks, anchor_every)
    if anchor_every == 1:
        return Links(embed, anchor_chunk, anchor_speaker)
    is_anchor = np.zeros(num_chunks, dtype=bool)
    is_anchor[anchors] = True
    # scipy.optimize lazily: ~0.1 s of CLI start-up before the first stage (as in clustering)
    from scipy.optimize import linear_sum_assignment

    for chunk in np.flatnonzero(~is_anchor):
        if not active[chunk].any():
            continue
        position = np.searchsorted(anchors, chunk)
        best_co = np.zeros(num_slots)
        for anchor in (anchors[position - 1], anchors[position]):  # chunk is strictly between two anchors
            co, ours, theirs, overlap = _co_activity(segmentations, frame_offsets, chunk, anchor)
            if overlap < min_overlap_ratio * num_frames:
                continue
            rows, cols = linear_sum_assignment(-co)
            for i, j in zip(rows, cols):
                if not (active[chunk, i] and active[anchor, j]) or ours[i] < min_overlap_frames:
                    continue
                if co[i, j] < min_agreement * min(ours[i], theirs[j]) or co[i, j] <= best_co[i]:
                    continue
                best_co[i] = co[i, j]
                anchor_chunk[chunk, i], anchor_speaker[chunk, i] = anchor, j
        embed[chunk] &= anchor_chunk[chunk] < 0
    return Links(embed, anchor_chunk, anchor_speaker)


def propagate_clusters(hard_clusters: np.ndarray, links: Links) -> np.ndarray:
    """``hard_clusters (C, L)`` with each linked slot given its anchor speaker's cluster (a copy)."""
    out = np.array(hard_clusters, copy=True)
    chunks, slots = np.nonzero(links.anchor_chunk >= 0)
    out[chunks, slots] = hard_clusters[links.anchor_chunk[chunks, slots], links.anchor_speaker[chunks, slots]]
    return out
