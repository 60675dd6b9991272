"""Parity against the fp32 torch reference: comparison of arrays, aggregation, the flag, the config."""

from __future__ import annotations

import numpy as np
import pytest

from diaropt.config import compose
from diaropt.parity import compare_file, is_reference, parity_flag, parity_metrics, reference_config


def arrays(seed: int = 0, chunks: int = 4, dim: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(chunks, 589, 7))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    segmentations = (rng.random((chunks, 589, 3)) > 0.5).astype(np.float32)
    embeddings = rng.normal(size=(chunks, 3, dim)).astype(np.float32)
    embeddings[0, 2] = np.nan  # a skipped local speaker
    return {"logprobs": logprobs.astype(np.float32), "segmentations": segmentations, "embeddings": embeddings}


def test_identical_arrays_are_exact():
    reference = arrays()
    file = compare_file({k: v.copy() for k, v in reference.items()}, reference)
    metrics = parity_metrics([file], der=0.2, reference_der=0.2, cosine_floor=0.98)
    assert metrics["parity_seg_max_abs_diff"] == 0 and metrics["parity_seg_powerset_agreement"] == 1
    assert metrics["parity_emb_cos_min"] == pytest.approx(1) and metrics["parity_emb_compared"] == 11
    assert metrics["parity_der_delta"] == 0 and metrics["parity_ok"] == 1
    assert parity_flag(metrics, 0.98) == "ok"


def test_embedding_error_below_the_floor_is_flagged():
    reference = arrays()
    job = {k: v.copy() for k, v in reference.items()}
    job["embeddings"][1, 0] = -job["embeddings"][1, 0]  # one embedding turned around
    metrics = parity_metrics([compare_file(job, reference)], der=0.25, reference_der=0.2, cosine_floor=0.98)
    assert metrics["parity_emb_cos_min"] == pytest.approx(-1) and metrics["parity_ok"] == 0
    assert metrics["parity_der_delta"] == pytest.approx(0.05)
    assert parity_flag(metrics, 0.98).startswith("below_cosine_floor")


def test_only_chunks_with_identical_masks_judge_the_embedding_model():
    """A chunk whose segmentation changed fed other masks: it counts in ``_all``, not in the flag."""
    reference = arrays()
    job = {k: v.copy() for k, v in reference.items()}
    job["segmentations"][3, 0, 0] = 1 - job["segmentations"][3, 0, 0]
    job["embeddings"][3] = -job["embeddings"][3]
    job["embeddings"][2, 1] = np.nan  # embedded by the reference only
    job["logprobs"][2, 5] = job["logprobs"][2, 5, ::-1]
    metrics = parity_metrics([compare_file(job, reference)], 0.2, 0.2, 0.98)
    assert metrics["parity_ok"] == 1 and metrics["parity_emb_cos_min_all"] == pytest.approx(-1)
    assert metrics["parity_emb_active_mismatch"] == pytest.approx(1 / 11)
    assert 0 < metrics["parity_seg_max_abs_diff"] < 1
    assert metrics["parity_seg_powerset_agreement"] >= 1 - 1 / (4 * 589)


def test_nothing_comparable_is_not_a_pass():
    reference = arrays()
    job = {k: v.copy() for k, v in reference.items()}
    job["segmentations"] = 1 - job["segmentations"]
    metrics = parity_metrics([compare_file(job, reference)], 0.2, 0.2, 0.98)
    assert metrics["parity_ok"] == 0 and parity_flag(metrics, 0.98) == "no_comparable_embeddings"


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        compare_file(arrays(chunks=3), arrays(chunks=4))


def test_reference_config_keeps_the_job_data_and_clustering():
    cfg = compose(["quant=int8", "backend=onnxruntime", "clustering.threshold=0.7", "dataset=sample",
                   "frame_extraction=batched"])
    reference = reference_config(cfg)
    assert reference.backend.name.value == "torch" and reference.quant.mode.value == "fp32"
    assert reference.clustering.threshold == 0.7 and reference.dataset.name == "sample"
    assert reference.cache_arrays and reference.frame_extraction.mode.value == "batched"
    assert is_reference(reference, "torch") and not is_reference(cfg, "onnxruntime")
    assert not is_reference(compose(["backend=torch", "embedding.shared_trunk=true", "embedding.tiled_trunk=false"]),
                            "torch")
    # compute_unit=auto (the default) is cpu_only for torch: such a job is its own reference
    assert is_reference(compose(["backend=torch", "embedding.shared_trunk=false", "embedding.tiled_trunk=false"]),
                        "torch")
    exact = compose(["embedding.tiled_trunk=false", "backend=onnxruntime"])
    assert reference_config(exact).embedding.shared_trunk is False  # exact paths: the per-pair reference
    tiled = reference_config(compose(["embedding.tiled_trunk=true"]))  # an approximation: judged by DER
    assert tiled.embedding.shared_trunk and tiled.embedding.tiled_trunk and is_reference(tiled, "torch")


def test_a_sweep_runs_the_reference_once_per_audio_and_reference_configuration(monkeypatch):
    """The jobs of one sweep (one process, basic launcher) share the fp32 torch reference: quant does
    not change it, clustering does."""
    from types import SimpleNamespace

    import diaropt.parity as parity
    import diaropt.runner as runner
    import diaropt.variants.build as build
    from diaropt.keys import DER_METRIC

    reference = SimpleNamespace(outputs={"a": SimpleNamespace(arrays=arrays(0))}, aggregate={DER_METRIC: 0.20})
    calls = []
    monkeypatch.setattr(parity, "_REFERENCE_RUNS", {})
    monkeypatch.setattr(build, "build_models", lambda cfg: "built")
    monkeypatch.setattr(runner, "load_pipeline", lambda cfg, built, timer, progress=None, warm_up=True: "pipeline")
    monkeypatch.setattr(runner, "dataset_from_config", lambda cfg: "dataset")
    monkeypatch.setattr(runner, "run_dataset", lambda *args, **kwargs: calls.append(kwargs) or reference)
    job = SimpleNamespace(outputs={"a": SimpleNamespace(arrays=arrays(0))}, aggregate={DER_METRIC: 0.25})
    for overrides in (["quant=fp32"], ["quant=fp16"], ["quant=int8", "repeats=5"]):
        metrics = parity.run_parity(compose(["backend=onnxruntime", *overrides]), "onnxruntime", job)
        assert metrics["parity_der_delta"] == pytest.approx(0.05) and metrics["parity_ok"] == 1.0
    assert len(calls) == 1 and calls[0]["keep_arrays"] and calls[0]["desc"].startswith("parity reference")
    parity.run_parity(compose(["backend=onnxruntime", "clustering.threshold=0.7"]), "onnxruntime", job)
    assert len(calls) == 2  # another clustering: another reference
    a, b = (parity.reference_key(reference_config(compose(o))) for o in (["quant=int8"], ["dataset=sample"]))
    assert a != b
