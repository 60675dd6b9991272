"""Numeric parity of a configuration against the fp32 torch reference on the same audio.

Every sweep job is compared with the reference configuration (``reference_overrides``: torch, fp32,
no fusion, no shared trunk, no shared sinc convolution; frame extraction modes are bit-identical, so
the job's is kept) run on the same files with the same windowing, masks and clustering:

| metric                          | what                                                          |
|---------------------------------|---------------------------------------------------------------|
| ``parity_seg_max_abs_diff``     | max abs difference of the powerset probabilities (C, F, 7)    |
| ``parity_seg_powerset_agreement`` | fraction of (chunk, frame) whose most likely class agrees   |
| ``parity_seg_powerset_agreement_perm`` | the same after the best permutation of each chunk's local speakers: the network is trained permutation-invariant and the pipeline is invariant to that order, so a chunk whose speakers swap slots (seen with int8 LSTMs) is not a disagreement here |
| ``parity_emb_cos_min``/``_mean`` | cosine of the embeddings of (chunk, local speaker) pairs whose chunk segmentation is identical in both runs, so the same masks went in: the embedding model's own error |
| ``parity_emb_cos_min_all``      | the same over every pair both runs embedded (masks may differ) |
| ``parity_emb_active_mismatch``  | fraction of local speakers embedded by one run only           |
| ``parity_der_delta``            | DER (pyannote convention, fraction) minus the reference's     |
| ``parity_ok``                   | 1.0 unless ``parity_emb_cos_min`` < ``parity.cosine_floor``   |

A flagged run (tag ``diaropt.parity_flag``) is never recommended, however fast.
The reference's network outputs are cached (``ArrayCache``) so a sweep computes them once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diaropt.keys import DER_METRIC, PARITY_OK

log = logging.getLogger(__name__)

#: What the reference configuration fixes; everything else (dataset, windowing, clustering, and the
#: approximations judged by DER: ``embedding.tiled_trunk``, ``embedding.anchor_every``) is the job's.
REFERENCE_SETTINGS: dict[str, Any] = {
    "backend.name": "torch", "quant.mode": "fp32", "compute_unit.name": "cpu_only",
    "fusion.clean_frames_in_graph": False, "fusion.segmentation_with_preprocessor": False,
    "fusion.embedding_with_post": False, "fusion.coreml_pipeline": False,
    "fusion.fbank_in_embedding_model": True, "embedding.shared_trunk": False,
    "segmentation.sinc_shared": False, "repeats": 1, "cache_arrays": True,
}


def reference_settings(cfg: DictConfig) -> dict[str, Any]:
    """``REFERENCE_SETTINGS`` that apply to ``cfg``: a tiled-trunk job keeps its shared trunk (the
    tiles need it), so its reference tiles as the job does."""
    if OmegaConf.select(cfg, "embedding.tiled_trunk", default=False):
        return {k: v for k, v in REFERENCE_SETTINGS.items() if k != "embedding.shared_trunk"}
    return REFERENCE_SETTINGS


def reference_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the reference settings applied (a copy)."""
    reference = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    for key, value in reference_settings(cfg).items():
        if OmegaConf.select(reference, key, default="__missing__") != "__missing__":
            OmegaConf.update(reference, key, value, merge=False)
    return reference


def is_reference(cfg: DictConfig, backend: str) -> bool:
    """True when the job itself is the reference configuration (its parity is exact by definition)."""
    from diaropt.variants.build import _value, resolve_compute_unit
    from diaropt.variants.fusion_plan import resolve_sinc_shared

    if backend != "torch":
        return False
    for key, value in reference_settings(cfg).items():
        if key in ("backend.name", "repeats", "cache_arrays"):
            continue
        current = _value(OmegaConf.select(cfg, key, default=value))
        if key == "compute_unit.name":  # auto is cpu_only for torch
            current = resolve_compute_unit(current, backend)
        elif key == "segmentation.sinc_shared":  # null (auto) is off for torch
            current = resolve_sinc_shared(cfg, backend)
        if current != value:
            return False
    return True


@dataclass
class FileParity:
    """Parity of one file: sums and extrema, so files aggregate exactly."""

    seg_max_abs_diff: float
    seg_frames: int
    seg_frames_agreeing: int
    seg_frames_agreeing_perm: int  # after the best permutation of each chunk's local speakers
    cos_same_mask: np.ndarray  # (N1,)
    cos_all: np.ndarray  # (N2,)
    speakers: int  # local speakers embedded by either run
    speakers_mismatched: int  # embedded by one run only


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


def permutation_invariant_agreement(job_classes: np.ndarray, reference_classes: np.ndarray) -> int:
    """Frames whose powerset class agrees after the best permutation of each chunk's local speakers.

    ``job_classes`` / ``reference_classes``: (C, F) int argmax powerset classes (``POWERSET_MAPPING``
    rows: 7 classes over 3 local speakers). Returns the sum over chunks of the best per-chunk count.
    """
    from itertools import permutations

    from diaropt.pipeline.preprocessing import POWERSET_MAPPING

    mapping = np.asarray(POWERSET_MAPPING).astype(int)  # (7, L)
    index = {tuple(row): k for k, row in enumerate(mapping)}
    best = np.zeros(job_classes.shape[0], dtype=np.int64)
    for order in permutations(range(mapping.shape[1])):
        relabel = np.array([index[tuple(row[list(order)])] for row in mapping])  # class -> class, speakers reordered
        best = np.maximum(best, (relabel[job_classes] == reference_classes).sum(axis=-1))
    return int(best.sum())


def compare_file(job: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> FileParity:
    """Compare one file's arrays (``DiarizationOutput.arrays``: logprobs (C, F, 7), segmentations
    (C, F, L), embeddings (C, L, D) with NaN rows for skipped speakers)."""
    if job["embeddings"].shape != reference["embeddings"].shape:
        raise ValueError(f"embedding arrays differ in shape: {job['embeddings'].shape} vs "
                         f"{reference['embeddings'].shape} (different windowing or model?)")
    seg_diff, frames, agreeing, agreeing_perm = float("nan"), 0, 0, 0
    if "logprobs" in job and "logprobs" in reference:
        job_probs, ref_probs = np.exp(job["logprobs"].astype(np.float64)), np.exp(reference["logprobs"].astype(np.float64))
        seg_diff = float(np.abs(job_probs - ref_probs).max())
        job_classes, ref_classes = job_probs.argmax(-1), ref_probs.argmax(-1)
        agree = job_classes == ref_classes
        frames, agreeing = int(agree.size), int(agree.sum())
        agreeing_perm = permutation_invariant_agreement(job_classes, ref_classes)
    same_chunk = np.all(job["segmentations"] == reference["segmentations"], axis=(1, 2))  # (C,)
    job_active = np.all(np.isfinite(job["embeddings"]), axis=-1)  # (C, L)
    ref_active = np.all(np.isfinite(reference["embeddings"]), axis=-1)
    both = job_active & ref_active
    cos_all = _cosines(job["embeddings"][both], reference["embeddings"][both])
    same = both & same_chunk[:, None]
    cos_same = _cosines(job["embeddings"][same], reference["embeddings"][same])
    return FileParity(seg_diff, frames, agreeing, agreeing_perm, cos_same, cos_all, int((job_active | ref_active).sum()),
                      int((job_active ^ ref_active).sum()))


def parity_metrics(files: list[FileParity], der: float, reference_der: float, cosine_floor: float) -> dict[str, float]:
    """Aggregate per-file parity into the logged metrics (see the module docstring)."""
    cos_same = np.concatenate([f.cos_same_mask for f in files]) if files else np.zeros(0)
    cos_all = np.concatenate([f.cos_all for f in files]) if files else np.zeros(0)
    frames = sum(f.seg_frames for f in files)
    speakers = sum(f.speakers for f in files)
    seg_diffs = [f.seg_max_abs_diff for f in files if not np.isnan(f.seg_max_abs_diff)]
    nan = float("nan")
    metrics = {
        "parity_seg_max_abs_diff": max(seg_diffs) if seg_diffs else nan,
        "parity_seg_powerset_agreement": sum(f.seg_frames_agreeing for f in files) / frames if frames else nan,
        "parity_seg_powerset_agreement_perm": (sum(f.seg_frames_agreeing_perm for f in files) / frames
                                               if frames else nan),
        "parity_emb_cos_min": float(cos_same.min()) if cos_same.size else nan,
        "parity_emb_cos_mean": float(cos_same.mean()) if cos_same.size else nan,
        "parity_emb_cos_min_all": float(cos_all.min()) if cos_all.size else nan,
        "parity_emb_compared": float(cos_same.size),
        "parity_emb_active_mismatch": sum(f.speakers_mismatched for f in files) / speakers if speakers else 0.0,
        "parity_der_delta": der - reference_der,
        "parity_reference_der": reference_der,
    }
    # nothing comparable (no chunk segmented identically) is not a pass
    metrics[PARITY_OK] = float(cos_same.size > 0 and metrics["parity_emb_cos_min"] >= cosine_floor)
    return metrics


def parity_flag(metrics: Mapping[str, float], cosine_floor: float) -> str:
    """The ``diaropt.parity_flag`` tag: ``ok`` or why the run is flagged."""
    if metrics[PARITY_OK] == 1.0:
        return "ok"
    if np.isnan(metrics["parity_emb_cos_min"]):
        return "no_comparable_embeddings"
    return f"below_cosine_floor ({metrics['parity_emb_cos_min']:.4f} < {cosine_floor})"


def exact_parity(der: float) -> dict[str, float]:
    """The metrics of the reference configuration itself."""
    return {"parity_seg_max_abs_diff": 0.0, "parity_seg_powerset_agreement": 1.0,
            "parity_seg_powerset_agreement_perm": 1.0, "parity_emb_cos_min": 1.0,
            "parity_emb_cos_mean": 1.0, "parity_emb_cos_min_all": 1.0, "parity_emb_compared": float("nan"),
            "parity_emb_active_mismatch": 0.0, "parity_der_delta": 0.0, "parity_reference_der": der,
            PARITY_OK: 1.0}


def run_parity(cfg: DictConfig, backend: str, result) -> dict[str, float]:
    """Parity of a finished job (``runner.DatasetResult`` with arrays kept) against the reference,
    which is run here (its network outputs cached across jobs). Not part of the job's timings."""
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import ChunkProgress, dataset_from_config, load_pipeline, run_dataset
    from diaropt.variants.build import build_models

    der = result.aggregate[DER_METRIC]
    if is_reference(cfg, backend):
        return exact_parity(der)
    reference_cfg = reference_config(cfg)
    key = reference_key(reference_cfg)
    reference = _REFERENCE_RUNS.get(key)
    if reference is not None:
        log.info("parity: the fp32 torch reference of these files was run earlier in this process; reusing it")
    else:
        log.info("parity: running the fp32 torch reference on the same files (network outputs cached on disk, "
                 "so a later job of the sweep only re-clusters)")
        start = time.perf_counter()
        built = build_models(reference_cfg)
        timer = StageTimer()
        chunks = ChunkProgress()  # the stage under way (chunks segmented, speakers embedded), on a terminal
        pipeline = load_pipeline(reference_cfg, built, timer, chunks)
        reference = run_dataset(pipeline, dataset_from_config(reference_cfg), None, timer,
                                max_duration_s=reference_cfg.dataset.max_duration_s, keep_arrays=True,
                                desc="parity reference (torch fp32)")
        chunks.close()
        hits = int(reference.aggregate.get("array_cache_hits", 0))
        log.info("parity: reference of %d file(s) in %.0f s (%d from the array cache)", len(reference.outputs),
                 time.perf_counter() - start, hits)
        _REFERENCE_RUNS.clear()  # one reference in memory: a sweep's jobs share one
        _REFERENCE_RUNS[key] = reference
    files = [compare_file(result.outputs[uri].arrays, reference.outputs[uri].arrays) for uri in result.outputs]
    return parity_metrics(files, der, reference.aggregate[DER_METRIC], cfg.parity.cosine_floor)


#: reference_key -> the reference run (``runner.DatasetResult``) of the last parity check in this process:
#: the jobs of a sweep run by the basic launcher share one process and, mostly, one reference.
_REFERENCE_RUNS: dict[str, Any] = {}

#: Config keys that do not change the reference's outputs: where results go, the job's own timing and
#: quantization (the reference is fp32 torch whatever ``quant`` says), what the sweeper reads.
_NOT_REFERENCE_KEYS = ("hydra", "tracking", "paths.output_dir", "quant", "repeats", "objectives", "resume",
                       "experiment_preset")


def reference_key(reference_cfg: DictConfig) -> str:
    """Identity of a reference run: sha256 of the reference configuration without
    :data:`_NOT_REFERENCE_KEYS` (dataset, windowing, models, clustering and post-processing stay in)."""
    import hashlib
    import json

    container = OmegaConf.to_container(reference_cfg, resolve=True, enum_to_str=True)
    for dotted in _NOT_REFERENCE_KEYS:
        *parents, last = dotted.split(".")
        node = container
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()
