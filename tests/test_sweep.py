"""The main job: a tiny multirun logged to a temporary MLflow store, failures and parallel jobs."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from conftest import TINY_SWEEP as TINY
from diaropt.config import REPO_ROOT


def sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "experiments/sweep.py"), "-m", *TINY,
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment_name=test",
               f"hydra.sweep.dir={tmp_path}/sweep", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)


def runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    frame = mlflow.search_runs(experiment_names=["test"])
    parents = frame[frame["tags.mlflow.parentRunId"].isna()]
    children = frame[frame["tags.mlflow.parentRunId"].notna()]
    return parents, children


def test_multirun_logs_one_parent_and_a_child_per_quant_value(tmp_path):
    result = sweep(tmp_path, "quant=fp32,fp16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 jobs: 2 finished, 0 skipped, 0 failed" in result.stdout
    parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent_id = parents.run_id.iloc[0]
    assert set(children["tags.mlflow.parentRunId"]) == {parent_id}
    assert sorted(children["params.quant.mode"]) == ["fp16", "fp32"]
    assert set(children["params.backend.resolved"]) == {"onnxruntime"}
    assert sorted(children["params.quant.realized"]) == [  # which engine realized each quant mode
        "onnxruntime: fp16 initializers and compute, fp32 inputs/outputs", "onnxruntime: the exported fp32 graph"]
    # compute_unit=auto (the default) is ONNX Runtime's CPU here; the resolved value is what is logged
    assert set(children["params.compute_unit.name"]) == {"auto"}
    assert set(children["params.compute_unit.resolved"]) == set(children["tags.axis.compute_unit"]) == {"cpu_only"}
    assert children["params.dataset.sha256"].str.len().eq(64).all() and children["params.dataset.sha256"].nunique() == 1
    for key in ("time_compile_s", "time_segmentation_s", "time_embedding_s", "time_clustering_s",
                "time_postprocess_s", "time_total_s", "rtfx", "der_pyannote", "der_fluidaudio",
                "missed_pyannote", "jer_pyannote", "peak_rss_bytes", "embedding_model_size_bytes"):
        assert children[f"metrics.{key}"].notna().all(), key
    assert (children["metrics.der_pyannote"] < 1).all()
    assert (children["metrics.der_pyannote_pct"] == 100 * children["metrics.der_pyannote"]).all()
    assert parents["tags.mlflow.runName"].iloc[0].startswith("quant=fp32,fp16 @ ")  # named by the swept axis
    assert "libcoremlpython" not in result.stderr and "has not been tested with coremltools" not in result.stderr
    # output redirected (not a terminal): plain log lines, no progress-bar frames of ours or a library's
    assert "\r" not in result.stdout + result.stderr
    assert (children["metrics.repeats"] == 3).all()  # repeats=null: timed (target) jobs run 3 passes
    # parity against the fp32 torch reference: fp32 ONNX Runtime matches it to float rounding
    fp32 = children[children["params.quant.mode"] == "fp32"].iloc[0]
    assert fp32["metrics.parity_emb_cos_min"] > 0.9999 and fp32["metrics.parity_ok"] == 1
    assert fp32["tags.diaropt.parity_flag"] == "ok" and abs(fp32["metrics.parity_der_delta"]) < 0.01
    for key in ("parity_seg_max_abs_diff", "parity_seg_powerset_agreement", "parity_emb_cos_mean"):
        assert children[f"metrics.{key}"].notna().all(), key
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(children.run_id.iloc[0])}
    assert {"config.yaml", "rttm", "results", "timing_breakdown.png", "models"} <= artifacts
    assert [a.path for a in client.list_artifacts(children.run_id.iloc[0], "rttm")] == ["rttm/sample.rttm"]
    assert parents["metrics.num_finished"].iloc[0] == 2
    assert {a.path for a in client.list_artifacts(parent_id, "summary")}
    # tags say where it ran, so a Linux sweep and a Mac sweep are never confused
    assert children["tags.host.os"].notna().all() and children["tags.version.onnxruntime"].notna().all()


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = sweep(tmp_path, "segmentation.checkpoint=null,/nonexistent/weights.bin")
    assert result.returncode == 1  # a failed job makes the sweep exit non-zero ...
    assert "2 jobs: 1 finished, 0 skipped, 1 failed" in result.stdout
    parents, children = runs(tmp_path)
    assert sorted(children.status) == ["FAILED", "FINISHED"]  # ... after the other job finished
    assert "no such file" in result.stdout + result.stderr
    assert not (children.status == "RUNNING").any() and not (parents.status == "RUNNING").any()


def test_host_that_cannot_run_a_job_skips_it_with_the_reason(tmp_path):
    result = sweep(tmp_path, "backend=torch", "compute_unit=cpu_only,cpu_and_ne")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 finished, 1 skipped, 0 failed" in result.stdout
    _, children = runs(tmp_path)
    skipped = children[children["tags.diaropt.skipped"] == "true"]
    assert len(skipped) == 1
    assert "torch has no compute unit cpu_and_ne" in skipped["tags.diaropt.skip_reason"].iloc[0]


def test_clustering_sweep_reuses_cached_network_outputs(tmp_path):
    cache = f"paths.cache_dir={tmp_path}/cache"
    # one pass per job: with repeats (auto: 3 for timed jobs) every pass after the first is a hit too
    result = sweep(tmp_path, "backend=torch", "cache_arrays=true", cache, "clustering.threshold=0.5,0.7", "repeats=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, children = runs(tmp_path)
    children = children.sort_values("params.clustering.threshold")
    assert list(children["metrics.array_cache_hits"]) == [0.0, 1.0]  # the second job re-clustered only
    assert children["tags.diaropt.timings_comparable"].iloc[1] == "false"
    assert len(list((tmp_path / "cache" / "arrays").glob("*.npz"))) == 1


@pytest.mark.slow
def test_joblib_launcher_with_two_workers_loses_no_run(tmp_path):
    result = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "clustering.threshold=0.5,0.6,0.7")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3
    assert (children.status == "FINISHED").all()
    assert children["metrics.der_pyannote"].notna().all()


@pytest.mark.slow
def test_optuna_search_returns_both_objectives_per_trial(tmp_path):
    result = sweep(tmp_path, "experiment=optuna_search", "hydra.sweeper.n_trials=2", "parity.enabled=false",
                   "quant=choice(fp32,fp16)", "frame_extraction=strided")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Number of Pareto solutions" in result.stdout + result.stderr
    parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    assert children["metrics.der_pyannote"].notna().all() and children["metrics.rtfx"].notna().all()
    assert set(children["params.experiment_preset"]) == {"optuna_search"}


def test_peak_memory_reset_restarts_the_running_peak() -> None:
    """``PeakMemory.reset`` (per-stage peaks in benchmarks/scaling.py) forgets a freed allocation."""
    import numpy as np

    from diaropt.sweep import PeakMemory

    with PeakMemory() as memory:
        block = np.ones(50_000_000, dtype=np.float32)  # 200 MB, touched
        with_block = memory.current_bytes()
        del block
        before_reset = memory.peak_bytes = max(memory.peak_bytes, with_block)
        memory.reset()
        assert memory.peak_bytes <= before_reset - 150 * (1 << 20)
