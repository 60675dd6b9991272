"""What the missed detection and confusion of the default pipeline measure: oracle clustering vs the
clustering, and missed detection split by the speaker count (issue 15, analysis only).

    DIAROPT_SYNTHETIC_SOURCE=/work/shared/data/librispeech_test-other \\
    python experiments/missed_decomposition.py --dataset dev --dataset test --dataset ami_mini \\
        --out benchmarks/results/clustering/missed_decomposition.json

Per file (default configuration unless ``--override``; ``cache_arrays=true``, so the networks run once
per file and later runs read the array cache):

* **default**: the pipeline's own output (DER, missed / false alarm / confusion; collar 0, overlap
  scored), identical to ``experiments/recluster.py``.
* **oracle clustering**: the same segmentation, speaker count and reconstruction, but each chunk's
  local speakers are assigned to *reference* speakers: per chunk, a Hungarian matching maximises the
  number of chunk frames where the local speaker and the reference speaker are both active (one local
  speaker per reference speaker per chunk, as pyannote.audio's ``OracleClustering``); a local speaker
  matched with zero overlap, or left over, gets ``-2`` (skipped). This uses the reference: it is an
  analysis tool only and never part of the pipeline.
* **missed detection on the output frame grid** (frames whose middle is inside the UEM; ``r`` =
  reference speakers active at the frame middle, ``n`` = the speaker count of the pipeline (rounded
  average over chunks), ``h`` = hypothesis speakers of the final annotation, ``K`` = clusters found):
  missed speaker-frames ``max(0, r - h)`` split into

  - ``count_zero``: ``n = 0`` (no speech detected at all),
  - ``count_low``: ``0 < n < r``, the part ``r - n`` (speech detected, overlap under-counted),
  - ``count_ok``: the rest (``n >= r`` and still ``h < r``), itself split into frames with
    ``n > K`` (fewer clusters than the count) and ``n <= K``.

  ``count_zero`` and ``count_low`` are further split by ``m``, the largest number of active local speakers
  any single chunk covering the frame has there (``n`` is the rounded *average* over chunks): missed
  speaker-frames that some chunk did count (``min(missed, m - n)``, ``*_some_chunk``) vs that no chunk
  counted (the segmentation never saw that speaker there).

  Also reported: speaker-frames where ``n > K`` (the reconstruction pads zero columns, as pyannote's
  ``to_diarization`` does, so such frames output a *phantom* speaker: they cost confusion or false alarm,
  not missed detection).

Frame-level seconds use the 16.875 ms frame step; they approximate the segment-based pyannote.metrics
numbers (both are in the output: ``missed_s_pyannote`` vs ``frames_missed_s``).

* **embedding separation** (why a clustering collapses): the embeddings grouped by the oracle assignment;
  ``between_cosine_max``: the largest cosine similarity between two reference speakers' mean directions,
  ``within_cosine_mean``: the mean cosine of each embedding to its own speaker's mean direction (speakers
  with at least 2 embeddings). For scale: the default AHC initialisation (``vbx``, threshold 0.6 euclidean
  between unit-vector means) merges two singletons above cosine 0.82.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pyannote.core import Annotation, Segment, Timeline
from scipy.optimize import linear_sum_assignment

from diaropt.quiet import quiet_third_party

quiet_third_party()  # before coremltools is imported

from diaropt.config import compose  # noqa: E402
from diaropt.files import atomic_path  # noqa: E402
from diaropt.metrics import DiarizationScorer  # noqa: E402
from diaropt.pipeline import reconstruction  # noqa: E402
from diaropt.pipeline.audio import SAMPLE_RATE_HZ, chunk_starts, load_audio  # noqa: E402
from diaropt.pipeline.preprocessing import SEGMENTATION_FRAMES, FrameWindow, chunk_frame_offsets  # noqa: E402
from diaropt.pipeline.timing import StageTimer  # noqa: E402
from diaropt.runner import _crop_item, dataset_from_config, load_pipeline  # noqa: E402
from diaropt.variants.build import build_models  # noqa: E402

CATEGORIES = ("count_zero", "count_low", "count_ok_fewer_clusters", "count_ok_enough_clusters")
SUBCATEGORIES = ("count_zero_some_chunk", "count_low_some_chunk")


def frame_middles_s(num_frames: int, frames: FrameWindow = SEGMENTATION_FRAMES) -> np.ndarray:
    """``(num_frames,)`` float64: middle of each output frame on the file timeline."""
    return float(frames.start) + 0.5 * float(frames.duration) + np.arange(num_frames) * float(frames.step)


def timeline_mask(timeline: Timeline | Annotation, middles_s: np.ndarray) -> np.ndarray:
    """``(T,)`` bool: frame middles inside any segment of ``timeline``."""
    mask = np.zeros(middles_s.shape, dtype=bool)
    segments = timeline if isinstance(timeline, Timeline) else timeline.get_timeline()
    for segment in segments:
        mask |= (middles_s >= segment.start) & (middles_s < segment.end)
    return mask


def activity(annotation: Annotation, middles_s: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``(T, S)`` bool speaker activity of ``annotation`` at the frame middles, and its labels."""
    labels = sorted(annotation.labels())
    out = np.zeros((middles_s.shape[0], len(labels)), dtype=bool)
    for s, label in enumerate(labels):
        out[:, s] = timeline_mask(annotation.label_timeline(label), middles_s)
    return out, labels


def oracle_hard_clusters(segmentations: np.ndarray, reference_frames: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Oracle assignment of local speakers to reference speakers.

    ``segmentations (C, F, L)`` {0, 1}, ``reference_frames (T, S)`` bool on the output grid,
    ``offsets (C,)`` output-grid index of each chunk's first frame -> ``(C, L)`` int8: the reference
    speaker matched to each local speaker (Hungarian on co-active frame counts, one local speaker per
    reference speaker), ``-2`` where unmatched or matched with zero overlap.
    """
    num_chunks, num_frames, num_local = segmentations.shape
    num_out, num_ref = reference_frames.shape
    hard = np.full((num_chunks, num_local), -2, dtype=np.int8)
    if num_ref == 0:
        return hard
    padded = np.vstack([reference_frames, np.zeros((num_frames, num_ref), dtype=bool)])
    for c in range(num_chunks):
        ref = padded[offsets[c]: offsets[c] + num_frames].astype(np.float64)  # (F, S)
        overlap = (segmentations[c] > 0).astype(np.float64).T @ ref  # (L, S)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        for row, col in zip(rows, cols):
            if overlap[row, col] > 0:
                hard[c, row] = col
    return hard


def separation(embeddings: np.ndarray, hard_clusters: np.ndarray) -> dict[str, float | int]:
    """``embeddings (C, L, D)`` (NaN rows: skipped) grouped by ``hard_clusters (C, L)`` (``< 0``: none) ->
    ``between_cosine_max``, ``within_cosine_mean`` (NaN when undefined) and ``num_speakers_embedded``
    (speakers with at least 2 embeddings)."""
    finite = np.all(np.isfinite(embeddings), axis=-1) & (hard_clusters >= 0)
    x = embeddings[finite].astype(np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    labels = hard_clusters[finite]
    means, within = [], []
    for k in np.unique(labels):
        members = x[labels == k]
        if len(members) < 2:
            continue
        mean = members.mean(axis=0)
        mean /= np.linalg.norm(mean)
        means.append(mean)
        within.extend(members @ mean)
    between = float("nan")
    if len(means) >= 2:
        similarity = np.stack(means) @ np.stack(means).T
        between = float(similarity[np.triu_indices(len(means), 1)].max())
    return {"between_cosine_max": between, "within_cosine_mean": float(np.mean(within)) if within else float("nan"),
            "num_speakers_embedded": len(means)}


def missed_split(r: np.ndarray, n: np.ndarray, h: np.ndarray, num_clusters: int,
                 m: np.ndarray | None = None) -> dict[str, int]:
    """Missed speaker-frames ``max(0, r - h)`` split into :data:`CATEGORIES` (module docstring).

    ``r``, ``n``, ``h``: ``(T,)`` int reference / estimated / hypothesis speaker counts (UEM frames only);
    ``m`` (optional, ``(T,)``): the largest per-chunk count at each frame, for the ``*_some_chunk`` parts.
    """
    r, n, h = (np.asarray(v, dtype=np.int64) for v in (r, n, h))
    missed = np.maximum(r - h, 0)
    zero = np.where(n == 0, missed, 0)
    low = np.where(n > 0, np.minimum(missed, np.maximum(r - n, 0)), 0)
    rest = missed - zero - low
    out = {"missed": int(missed.sum()), "count_zero": int(zero.sum()), "count_low": int(low.sum()),
           "count_ok_fewer_clusters": int(rest[n > num_clusters].sum()),
           "count_ok_enough_clusters": int(rest[n <= num_clusters].sum())}
    if m is not None:
        seen = np.maximum(np.asarray(m, dtype=np.int64) - n, 0)
        out["count_zero_some_chunk"] = int(np.minimum(zero, seen).sum())
        out["count_low_some_chunk"] = int(np.minimum(low, seen).sum())
    return out


def chunk_max_count(segmentations: np.ndarray, offsets: np.ndarray, num_out_frames: int) -> np.ndarray:
    """``(num_out_frames,)`` int64: the largest number of active local speakers any chunk covering the
    frame has there (``segmentations (C, F, L)``, ``offsets (C,)`` output-grid index of each chunk)."""
    per_chunk = np.sum(segmentations > 0, axis=-1)  # (C, F)
    out = np.zeros(num_out_frames, dtype=np.int64)
    for c, offset in enumerate(offsets):
        stop = min(int(offset) + per_chunk.shape[1], num_out_frames)
        if stop > offset:
            np.maximum(out[offset:stop], per_chunk[c, :stop - offset], out=out[offset:stop])
    return out


def analyse_file(pipeline: Any, item: Any, max_duration_s: float | None) -> dict[str, Any]:
    """Default and oracle-clustering scores plus the frame-level split of one dataset item."""
    audio, reference, uem = _crop_item(item, load_audio(item.audio_path), max_duration_s)
    output = pipeline(audio, item.uri, keep_arrays=True, timer=StageTimer())
    arrays = output.arrays
    segmentations, count = arrays["segmentations"], arrays["count"]
    starts_s = chunk_starts(audio.shape[0], pipeline.chunk_samples, pipeline.step_samples) / SAMPLE_RATE_HZ
    offsets = chunk_frame_offsets(starts_s, SEGMENTATION_FRAMES)
    middles = frame_middles_s(count.shape[0])
    duration_s = audio.shape[0] / SAMPLE_RATE_HZ
    if uem is None:
        uem = Timeline([Segment(0.0, duration_s)], uri=item.uri)
    in_uem = timeline_mask(uem, middles)
    reference_frames, reference_labels = activity(reference, middles)
    hypothesis_frames, _ = activity(output.annotation, middles)

    oracle = oracle_hard_clusters(segmentations, reference_frames, offsets)
    params = pipeline.params
    discrete = reconstruction.reconstruct(segmentations, oracle, count, starts_s, SEGMENTATION_FRAMES,
                                          num_clusters=len(reference_labels), require_positive_activation=False)
    oracle_annotation = reconstruction.to_annotation(discrete, SEGMENTATION_FRAMES, item.uri,
                                                     params.min_duration_on_s, params.min_duration_off_s)
    oracle_annotation = oracle_annotation.crop(Segment(0.0, duration_s))

    scores = {}
    for name, hypothesis in (("default", output.annotation), ("oracle", oracle_annotation)):
        row = DiarizationScorer(("pyannote",)).add(item.uri, reference, hypothesis, uem)
        scores[name] = {k: float(v) for k, v in row.items() if k.endswith("_pyannote")}
        scores[name]["num_labels_output"] = len(hypothesis.labels())

    r = reference_frames[in_uem].sum(axis=1)
    n = count[in_uem].astype(np.int64)
    h = hypothesis_frames[in_uem].sum(axis=1)
    step_s = float(SEGMENTATION_FRAMES.step)
    m = chunk_max_count(segmentations, offsets, count.shape[0])[in_uem]
    split = {k: v * step_s for k, v in missed_split(r, n, h, output.num_clusters, m).items()}
    phantom = np.maximum(n - output.num_clusters, 0)
    return {"uri": item.uri, "num_speakers_reference": len(reference_labels), "num_clusters": output.num_clusters,
            "max_count": int(n.max()) if n.size else 0, "scores": scores,
            "frames_reference_speech_s": float(r.sum() * step_s), "frames_missed_s": split.pop("missed"),
            "frames_missed_split_s": split, "phantom_speaker_s": float(phantom.sum() * step_s),
            "overlap_reference_s": float((r >= 2).sum() * step_s),
            "overlap_counted_s": float(((r >= 2) & (n >= 2)).sum() * step_s),
            "oracle_separation": separation(arrays["embeddings"], oracle)}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset totals: DER components in percent of reference speech, split in seconds and percent."""
    out: dict[str, Any] = {}
    for name in ("default", "oracle"):
        speech = sum(row["scores"][name]["reference_speech_s_pyannote"] for row in rows)
        parts = {k: sum(row["scores"][name][f"{k}_s_pyannote"] for row in rows)
                 for k in ("missed", "false_alarm", "confusion")}
        out[name] = {f"{k}_percent": 100 * v / speech for k, v in parts.items()}
        out[name]["der_percent"] = sum(out[name].values())
    speech = sum(row["frames_reference_speech_s"] for row in rows)
    out["frames_missed_percent"] = 100 * sum(row["frames_missed_s"] for row in rows) / speech
    out["frames_missed_split_percent"] = {k: 100 * sum(row["frames_missed_split_s"][k] for row in rows) / speech
                                          for k in CATEGORIES + SUBCATEGORIES}
    out["phantom_speaker_percent"] = 100 * sum(row["phantom_speaker_s"] for row in rows) / speech
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Missed detection and clustering: oracle clustering and missed detection by speaker count", "",
             f"Written by `experiments/missed_decomposition.py` (its docstring defines every column). "
             f"Overrides: `{' '.join(report['base'])}`. All percentages are of the reference speech "
             "(collar 0, overlap scored). Missed split columns, in % of reference speech: `n=0` no speech "
             "counted; `0<n<r` overlap under-counted; `n>=r, n>K` and `n>=r, n<=K`: the count was enough "
             "(any residue is post-processing: min_duration_off filling, frame/segment rounding). `phantom` = "
             "speaker-frames where the count exceeds the clusters found (output as an extra, zero-activation "
             "speaker column, as pyannote pads).", ""]
    for dataset, entry in report["datasets"].items():
        t = entry["totals"]
        d, o = t["default"], t["oracle"]
        s = t["frames_missed_split_percent"]
        lines += [f"## dataset={dataset}", "",
                  f"- default: DER {d['der_percent']:.2f} % (missed {d['missed_percent']:.2f}, false alarm "
                  f"{d['false_alarm_percent']:.2f}, confusion {d['confusion_percent']:.2f})",
                  f"- oracle clustering: DER {o['der_percent']:.2f} % (missed {o['missed_percent']:.2f}, false "
                  f"alarm {o['false_alarm_percent']:.2f}, confusion {o['confusion_percent']:.2f})",
                  f"- frame-level missed {t['frames_missed_percent']:.2f} %: n=0 {s['count_zero']:.2f}, "
                  f"0<n<r {s['count_low']:.2f}, n>=r & n>K {s['count_ok_fewer_clusters']:.2f}, n>=r & n<=K "
                  f"{s['count_ok_enough_clusters']:.2f}; of n=0, counted by some chunk "
                  f"{s['count_zero_some_chunk']:.2f}; of 0<n<r, counted by some chunk {s['count_low_some_chunk']:.2f}; "
                  f"phantom speaker-frames {t['phantom_speaker_percent']:.2f}",
                  "", "| file | ref spk / clusters / max count | default DER (miss / FA / conf) | oracle DER "
                  "(miss / FA / conf) | missed n=0 | 0<n<r | n>=r,n>K | n>=r,n<=K | phantom | ref overlap s "
                  "(counted >= 2) | oracle speakers: max between cos / mean within cos |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in entry["rows"]:
            speech = row["frames_reference_speech_s"] / 100
            cells = []
            for name in ("default", "oracle"):
                sc = row["scores"][name]
                cells.append(f"{100 * sc['der_pyannote']:.2f} ({100 * sc['missed_pyannote']:.2f} / "
                             f"{100 * sc['false_alarm_pyannote']:.2f} / {100 * sc['confusion_pyannote']:.2f})")
            split = [f"{row['frames_missed_split_s'][k] / speech:.2f}" for k in CATEGORIES]
            lines.append(f"| {row['uri']} | {row['num_speakers_reference']} / {row['num_clusters']} / "
                         f"{row['max_count']} | {cells[0]} | {cells[1]} | {' | '.join(split)} | "
                         f"{row['phantom_speaker_s'] / speech:.2f} | {row['overlap_reference_s']:.1f} "
                         f"({row['overlap_counted_s']:.1f}) | {row['oracle_separation']['between_cosine_max']:.2f} / "
                         f"{row['oracle_separation']['within_cosine_mean']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True,
                        help="a dataset config name (conf/dataset/), repeatable: dev, test, ami_mini, sample, ...")
    parser.add_argument("--override", action="append", default=[],
                        help="a configuration override (key=value) applied to every dataset, repeatable")
    parser.add_argument("--out", type=Path, required=True,
                        help="the JSON results file (e.g. results.json); the tables go beside it as .md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = ["cache_arrays=true", "parity.enabled=false", *args.override]
    report: dict[str, Any] = {"base": base, "datasets": {}}
    configs = {}
    for dataset_name in args.dataset:  # every name and override checked before any work
        try:
            configs[dataset_name] = compose([f"dataset={dataset_name}", *base])
        except Exception as error:  # noqa: BLE001 - Hydra / OmegaConf / validation: one line, exit 2
            print(f"error: --dataset {dataset_name} {' '.join(args.override)}: {type(error).__name__}: "
                  f"{str(error).splitlines()[0]}", file=sys.stderr)
            return 2
    pipeline = None
    for dataset_name, cfg in configs.items():
        if pipeline is None:
            pipeline = load_pipeline(cfg, build_models(cfg), StageTimer())
        rows = [analyse_file(pipeline, item, cfg.dataset.max_duration_s) for item in dataset_from_config(cfg)]
        report["datasets"][dataset_name] = {"rows": rows, "totals": totals(rows)}
        t = report["datasets"][dataset_name]["totals"]
        print(f"{dataset_name}: default DER {t['default']['der_percent']:.2f} %, oracle clustering "
              f"{t['oracle']['der_percent']:.2f} %, missed split {t['frames_missed_split_percent']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
