"""Scaling benchmark: per-stage time and peak memory vs audio length, default configuration.

    python benchmarks/scaling.py [--lengths-min 1 5 17 60]

Each length runs in its own process (a fresh interpreter, so one length's allocations do not raise
the next one's peak) on the AMI long-form recording of that length (``diaropt.data.long_form``).
Process RSS is sampled every 20 ms (``diaropt.sweep.PeakMemory``); the peak is recorded for the
whole file and per stage. Per stage, ``time = a + b * length`` is fitted (R^2) and the exponent of
a log-log fit is reported: ~1 is linear, ~0 constant, > 1.15 super-linear. Memory growth per hour
of audio is compared with the sizes of the arrays the pipeline keeps per file. Writes
``benchmarks/results/scaling.json`` and one MLflow run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from common import RESULTS_DIR, environment, finish, flat_metrics, load_configuration, log_to_mlflow, quiet, write_results

from diaropt.pipeline.timing import STAGES, StageTimer
from diaropt.sweep import PeakMemory

MB = 1 << 20


class MemoryStageTimer(StageTimer):
    """A ``StageTimer`` that also records the peak RSS (bytes) seen during each stage."""

    def __init__(self, sync: Any, sampler: PeakMemory) -> None:
        super().__init__(sync)
        self.sampler = sampler
        self.peak_rss_bytes: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sampler.reset()
        with super().stage(name):
            yield
        peak = max(self.sampler.peak_bytes, PeakMemory.current_bytes())
        self.peak_rss_bytes[name] = max(self.peak_rss_bytes.get(name, 0), peak)


def worker(length_min: float) -> dict[str, Any]:
    """Diarize the AMI long form of ``length_min`` once with the default configuration."""
    from diaropt.assets import default_cache_dir
    from diaropt.data.long_form import load_ami_long_form
    from diaropt.metrics import DiarizationScorer
    from diaropt.pipeline.audio import load_audio

    from common import load_average

    quiet()
    load_start = load_average()
    rss_start = PeakMemory.current_bytes()
    loaded = load_configuration("default", [])
    dataset, _ = load_ami_long_form(60 * length_min, Path(default_cache_dir()) / "datasets")
    (item,) = dataset.items
    rss_models = PeakMemory.current_bytes()
    with PeakMemory() as memory, PeakMemory() as stage_memory:  # whole run; per stage (reset by the timer)
        timer = MemoryStageTimer(loaded.pipeline.sync, stage_memory)
        timer.merge(loaded.compile_timer)
        with timer.stage("audio"):
            audio = load_audio(item.audio_path)
        output = loaded.pipeline(audio, item.uri, timer=timer)
    scores = DiarizationScorer().add(item.uri, item.reference, output.annotation, item.uem)
    return {"length_min": length_min, "audio_duration_s": output.audio_duration_s,
            "num_chunks": output.num_chunks, "num_embedded": output.num_embedded,
            "num_clusters": output.num_clusters, **timer.metrics(output.audio_duration_s),
            "der_pyannote": scores["der_pyannote"], "der_fluidaudio": scores["der_fluidaudio"],
            "rss_start_bytes": rss_start, "rss_after_models_bytes": rss_models, "peak_rss_bytes": memory.peak_bytes,
            "peak_rss_growth_bytes": memory.peak_bytes - rss_models,
            "peak_rss_per_stage_bytes": timer.peak_rss_bytes, "load_average_start": load_start,
            "load_average_end": load_average(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def fit(lengths: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """Linear fit (a, b per minute, R^2) and log-log exponent, with a verdict."""
    b, a = np.polyfit(lengths, values, 1)
    predicted = a + b * lengths
    total = float(np.sum((values - values.mean()) ** 2))
    r2 = 1.0 - float(np.sum((values - predicted) ** 2)) / total if total > 0 else float("nan")
    positive = values > 0
    exponent = float(np.polyfit(np.log(lengths[positive]), np.log(values[positive]), 1)[0]) \
        if positive.sum() >= 2 else float("nan")
    if exponent < 0.3:
        verdict = "constant"
    elif exponent > 1.15:
        verdict = "super-linear"
    elif exponent < 0.85:
        verdict = "sub-linear (fixed cost dominates short files)" if r2 >= 0.98 else "sub-linear"
    else:
        verdict = "linear" if r2 >= 0.98 else "linear trend, noisy"
    return {"intercept": float(a), "slope_per_min": float(b), "r2": r2, "loglog_exponent": exponent,
            "verdict": verdict}


def kept_arrays_bytes(num_chunks: int, num_clusters: int, duration_s: float) -> dict[str, int]:
    """Bytes of the per-file arrays the pipeline holds (from its array contracts). Reconstruction
    sums each chunk's cluster activations straight into the output grid: no (C, F, K) array."""
    frames, local, samples = 589, 3, int(duration_s * 16000)
    output_frames = int(duration_s / 0.016875) + frames
    clusters = max(num_clusters, 1)
    return {"audio_float32": 4 * samples,
            "logprobs_float32 (C,589,7)": 4 * num_chunks * frames * 7,
            "segmentations_float32 (C,589,3)": 4 * num_chunks * frames * local,
            "masks_float32 (C,589,3)": 4 * num_chunks * frames * local,
            "summed cluster activations (T,K) float64": 8 * output_frames * clusters,
            "top-count ranks (T,K) int64 x2": 16 * output_frames * clusters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths-min", type=float, nargs="+", default=[1, 5, 17, 60])
    parser.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep each length's worker result here as len_<min>.json; reuse files found there")
    parser.add_argument("--note", action="append", default=[], help="recorded in the results' notes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scaling.json")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    if args.runs_dir is not None:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        from diaropt.files import atomic_path

        result = worker(args.worker)
        with atomic_path(args.worker_out) as tmp:  # reused by --runs-dir: never a partial file
            tmp.write_text(json.dumps(result, default=str))
        return
    quiet()
    start_s = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "scaling", **environment(), "configuration": "default",
                               "recording": "AMI long form (diaropt.data.long_form), one run per length",
                               "notes": list(args.note)}
    print(f"load average at start: {results['load_average_start']}", flush=True)
    runs = []
    for length in sorted(args.lengths_min):
        saved = args.runs_dir / f"len_{length:g}.json" if args.runs_dir is not None else None
        if saved is not None and saved.is_file():  # a worker run earlier (e.g. started in parallel)
            run = json.loads(saved.read_text())
            run["reused_from"] = str(saved)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = saved or Path(tmp) / "run.json"
                subprocess.run([sys.executable, __file__, "--worker", str(length), "--worker-out", str(out)],
                               check=True)
                run = json.loads(out.read_text())
        runs.append(run)
        print(f"{length:5g} min: total {run['time_total_s']:7.1f} s  RTFx {run['rtfx']:5.1f}  "
              f"peak RSS {run['peak_rss_bytes'] / MB:6.0f} MB (+{run['peak_rss_growth_bytes'] / MB:.0f} MB over the "
              f"loaded models)  DER {100 * run['der_pyannote']:.1f} %", flush=True)
    lengths = np.array([r["length_min"] for r in runs], dtype=float)
    fits = {}
    for key in [f"time_{s}_s" for s in STAGES] + ["time_total_s"]:
        fits[key] = fit(lengths, np.array([r[key] for r in runs]))
    for key in ("peak_rss_bytes", "peak_rss_growth_bytes"):
        fits[key] = fit(lengths, np.array([r[key] for r in runs], dtype=float))
    per_stage_peak = {stage: fit(lengths, np.array([r["peak_rss_per_stage_bytes"].get(stage, 0) for r in runs],
                                                    dtype=float)) for stage in STAGES if stage != "compile"}
    longest = runs[-1]
    results.update({
        "runs": runs, "fits": fits, "peak_rss_per_stage_fits": per_stage_peak,
        "memory_growth_mb_per_hour": 60 * fits["peak_rss_growth_bytes"]["slope_per_min"] / MB,
        "kept_arrays_mb_longest": {k: v / MB for k, v in kept_arrays_bytes(
            longest["num_chunks"], longest["num_clusters"], longest["audio_duration_s"]).items()},
        "peak_rss_mb_longest": longest["peak_rss_bytes"] / MB,
        "stage_with_highest_peak_longest": max(longest["peak_rss_per_stage_bytes"],
                                               key=longest["peak_rss_per_stage_bytes"].get)})
    finish(results, start_s)
    for key, f in fits.items():
        print(f"{key:24s} a {f['intercept']:9.3g}  b/min {f['slope_per_min']:9.3g}  R2 {f['r2']:.4f}  "
              f"exponent {f['loglog_exponent']:.2f}  {f['verdict']}", flush=True)
    path = write_results("scaling", results, args.out)
    if not args.no_mlflow:
        metrics = flat_metrics({"fits": fits, "memory_growth_mb_per_hour": results["memory_growth_mb_per_hour"],
                                "peak_rss_mb_longest": results["peak_rss_mb_longest"],
                                **{f"len{r['length_min']:g}min": {k: r[k] for k in ("time_total_s", "rtfx",
                                   "peak_rss_bytes", "der_pyannote", "time_embedding_s", "time_segmentation_s")}
                                   for r in runs}})
        log_to_mlflow("scaling", metrics, {"lengths_min": " ".join(f"{x:g}" for x in lengths),
                                           "commit": results["commit"]}, [path])


if __name__ == "__main__":
    main()
