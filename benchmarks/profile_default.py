"""Profile of the default configuration on a few minutes of audio (py-spy, else cProfile).

    python benchmarks/profile_default.py [--length-min 3] [--rate-hz 100]

Runs a worker process (default configuration, AMI long form of ``--length-min``) under
``py-spy record --native`` (Python and native frames, e.g. ONNX Runtime kernels, of the Python
threads) and writes, under ``benchmarks/results/``:

- ``profile_default.collapsed.txt``: collapsed stacks (open it in speedscope.app or flamegraph.pl);
  stacks seen fewer than ``--min-samples`` times are dropped if the file would exceed 1.5 MB;
- ``profile_default.txt``: a text summary (top self / inclusive frames, native libraries, stages);
- ``profile_default.json``: the same numbers plus the worker's stage timings.

Without py-spy (``pip install py-spy``) or when it cannot attach, the worker runs under cProfile
and the summary comes from its statistics. Also logged to MLflow (experiment diaropt-benchmarks).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, finish, log_to_mlflow, quiet, write_results

MAX_COLLAPSED_BYTES = 1_500_000
RUN_FRAME = "DiarizationPipeline.__call__ (diaropt/pipeline/diarization.py"  # the timed run
#: a stack belongs to the stage of its outermost frame in one of these modules
STAGE_FRAMES = {"segmentation": "(diaropt/pipeline/segmentation.py", "embedding": "(diaropt/pipeline/embedding.py",
                "clustering": "(diaropt/pipeline/clustering.py", "postprocess": "(diaropt/pipeline/reconstruction.py",
                "preprocessing": "(diaropt/pipeline/preprocessing.py", "audio": "(diaropt/pipeline/audio.py"}


def worker(length_min: float, out: Path) -> None:
    """Diarize the AMI long form once with the default configuration; stage timings to ``out``."""
    from common import load_configuration

    from diaropt.assets import default_cache_dir
    from diaropt.data.long_form import load_ami_long_form
    from diaropt.runner import run_dataset

    quiet()
    loaded = load_configuration("default", [])
    dataset, _ = load_ami_long_form(60 * length_min, Path(default_cache_dir()) / "datasets")
    result = run_dataset(loaded.pipeline, dataset, None, loaded.compile_timer, repeats=1, show_progress=False)
    from diaropt.files import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in result.aggregate.items()
                                   if k.startswith(("time_", "rtfx", "share_", "der_"))}))


def _strip_line(frame: str) -> str:
    """``func (file.py:123)`` -> ``func (file.py)``; an unsymbolized native frame ``0x7f.. (lib.so)``
    -> ``[native] lib.so`` (ONNX Runtime's wheel is stripped: its kernels have no names)."""
    native = re.match(r"^0x[0-9a-f]+ \((.*)\)$", frame)
    if native:
        return f"[native] {native.group(1)}"
    return re.sub(r":\d+\)$", ")", frame)


def normalize(stacks: Counter) -> Counter:
    """Stacks with :func:`_strip_line` frames and native runs collapsed (smaller, readable files)."""
    out: Counter = Counter()
    for stack, count in stacks.items():
        frames: list[str] = []
        for frame in (_strip_line(f) for f in stack.split(";")):
            if not (frames and frame.startswith("[native]") and frames[-1] == frame):
                frames.append(frame)
        out[";".join(frames)] += count
    return out


def summarize_collapsed(stacks: Counter) -> dict[str, Any]:
    """Top self and inclusive frames (whole process and inside the pipeline run), native libraries,
    of :func:`normalize`\ d stacks."""
    total = sum(stacks.values())
    run_total = 0
    self_all: Counter = Counter()
    self_run: Counter = Counter()
    inclusive_run: Counter = Counter()
    libraries: Counter = Counter()
    stage_samples: Counter = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        leaf = frames[-1]
        self_all[leaf] += count
        libraries[leaf if leaf.startswith("[native]") else "python / other"] += count
        if any(f.startswith(RUN_FRAME) for f in frames):
            run_total += count
            self_run[leaf] += count
            for frame in set(frames):
                inclusive_run[frame] += count
            stage = next((name for f in frames for name, marker in STAGE_FRAMES.items() if marker in f),
                         "pipeline (other)")
            stage_samples[stage] += count

    def top(counter: Counter, denominator: int, n: int = 15) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "share": v / denominator} for k, v in counter.most_common(n)]

    return {"samples_total": total, "samples_in_pipeline_run": run_total,
            "top_self_in_run": top(self_run, max(run_total, 1)),
            "top_inclusive_in_run": top(Counter({k: v for k, v in inclusive_run.items() if v < run_total}),
                                        max(run_total, 1), 20),
            "top_self_whole_process": top(self_all, max(total, 1)),
            "native_libraries_self": top(libraries, max(total, 1), 10),
            "stage_share_of_run_samples": {k: v / max(run_total, 1) for k, v in stage_samples.most_common()}}


def read_collapsed(path: Path) -> Counter:
    stacks: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def write_collapsed(stacks: Counter, path: Path, min_samples: int) -> int:
    """Write ``stacks``; drop rare ones (below ``min_samples``, doubling) until it fits the size cap."""
    threshold = 1
    while True:
        text = "".join(f"{s} {c}\n" for s, c in stacks.most_common() if c >= threshold)
        if len(text.encode()) <= MAX_COLLAPSED_BYTES:
            from diaropt.files import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_text(text)
            return threshold
        threshold = max(threshold * 2, min_samples)


def profile_with_cprofile(length_min: float, timings_path: Path) -> dict[str, Any]:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    worker(length_min, timings_path)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(((v[2], v[3], f"{k[2]} ({Path(k[0]).name}:{k[1]})") for k, v in stats.stats.items()),
                  reverse=True)
    total = max(rows[0][0] if rows else 1.0, 1e-9)
    by_cumulative = sorted(rows, key=lambda r: r[1], reverse=True)
    return {"top_self_in_run": [{"frame": f, "seconds": s, "share": s / total} for s, _, f in rows[:15]],
            "top_inclusive_in_run": [{"frame": f, "seconds": c} for _, c, f in by_cumulative[:20]]}


def _feeds(session: Any, chunks: Any, batch: int) -> dict[str, Any]:
    """Inputs for one batch by name: real waveforms (``chunks (batch, samples)`` cut to the model's input
    length: the ``segmentation.sinc_shared`` front model takes ~1 s rows), all-one masks, and non-negative
    stand-ins for feature inputs (the tiled trunk's frames, the sinc rest model's pooled frames)."""
    import numpy as np

    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        shape = (batch, *spec.shape[1:])
        if spec.name == "waveforms":  # a chunk per row, or (sinc front model) its first row's samples
            samples = spec.shape[-1] if isinstance(spec.shape[-1], int) else chunks.shape[-1]
            feeds[spec.name] = np.ascontiguousarray(chunks[:, :samples]).reshape(*shape[:-1], samples)
        elif spec.name == "masks":
            feeds[spec.name] = np.ones(shape, np.float32)
        else:  # frame_features: ReLU outputs, any non-negative values exercise the same kernels
            feeds[spec.name] = np.abs(np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    return feeds


def onnxruntime_op_profile(length_min: float, batches: int = 3) -> dict[str, Any]:
    """ONNX Runtime's own per-node profile of every default model on real chunks (op types by time).

    py-spy cannot name ORT's kernels (stripped wheel); ORT's profiler can. Same model files, session
    options as the backend (default intra-op threads, one inter-op thread), profiling on.
    """
    import numpy as np
    import onnxruntime as ort

    from diaropt.assets import default_cache_dir
    from diaropt.config import compose
    from diaropt.data.long_form import load_ami_long_form
    from diaropt.pipeline.audio import load_audio, make_chunks
    from diaropt.variants.build import build_models
    from diaropt.variants.fusion import CHUNK_SAMPLES

    cfg = compose(["tracking.enabled=false"])
    built = build_models(cfg)
    dataset, _ = load_ami_long_form(60 * length_min, Path(default_cache_dir()) / "datasets")
    audio = load_audio(dataset.items[0].audio_path)
    out: dict[str, Any] = {}
    for model in built.stages:
        batch = cfg.segmentation.batch_size if model.kind == "segmentation" else cfg.embedding.batch_size
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        with tempfile.TemporaryDirectory() as tmp:
            options.profile_file_prefix = str(Path(tmp) / model.kind)
            session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
            for index in range(batches + 1):  # the first batch is a warm-up, still profiled: dropped below
                starts = (np.arange(batch) + index * batch) * 16000 % max(len(audio) - CHUNK_SAMPLES, 1)
                chunks = make_chunks(audio, starts.astype(np.int64), CHUNK_SAMPLES)
                session.run(None, _feeds(session, chunks, batch))
            events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        cutoff = runs[0]["ts"] + runs[0]["dur"] if runs else 0
        by_type: Counter = Counter()
        by_node: Counter = Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= cutoff:
                by_type[event["args"].get("op_name", "?")] += event["dur"]
                by_node[event["name"][: -len("_kernel_time")]] += event["dur"]
        total = max(sum(by_type.values()), 1)
        out[model.kind] = {"batch_size": batch, "batches": batches,
                           "kernel_time_ms_per_batch": total / 1000 / batches,
                           "op_types": [{"op": k, "share": v / total} for k, v in by_type.most_common(10)],
                           "nodes": [{"node": k, "share": v / total} for k, v in by_node.most_common(10)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length-min", type=float, default=3.0)
    parser.add_argument("--rate-hz", type=int, default=100)
    parser.add_argument("--min-samples", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.length_min, args.worker_out)
        return
    quiet()
    start_s = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "profile_default", **environment(), "configuration": "default",
                               "recording": f"AMI long form, {args.length_min:g} min"}
    print(f"load average at start: {results['load_average_start']}", flush=True)
    collapsed = RESULTS_DIR / "profile_default.collapsed.txt"
    summary_txt = RESULTS_DIR / "profile_default.txt"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        raw = Path(tmp) / "raw.txt"
        py_spy = shutil.which("py-spy")
        done = None
        if py_spy is not None:
            command = [py_spy, "record", "--format", "raw", "--native", "--rate", str(args.rate_hz), "-o", str(raw),
                       "--", sys.executable, __file__, "--worker", "--length-min", str(args.length_min),
                       "--worker-out", str(timings)]
            done = subprocess.run(command, capture_output=True, text=True)
        if done is not None and done.returncode == 0 and raw.is_file() and timings.is_file():
            stacks = normalize(read_collapsed(raw))
            results["profiler"] = f"py-spy record --native --rate {args.rate_hz}"
            results["summary"] = summarize_collapsed(stacks)
            results["collapsed_min_samples_kept"] = write_collapsed(stacks, collapsed, args.min_samples)
            results["artifacts"] = [collapsed.name, summary_txt.name]
        else:
            reason = "py-spy not installed" if py_spy is None else (done.stderr[-500:] if done else "unknown")
            print(f"py-spy unavailable ({reason}); profiling with cProfile", flush=True)
            results["profiler"] = f"cProfile (py-spy: {reason})"
            results["summary"] = profile_with_cprofile(args.length_min, timings)
            results["artifacts"] = [summary_txt.name]
        results["timings"] = json.loads(timings.read_text())
    results["onnxruntime_op_profile"] = onnxruntime_op_profile(args.length_min)
    finish(results, start_s)
    summary = results["summary"]
    lines = [f"profile of the default configuration ({results['recording']}), {results['profiler']}",
             f"commit {results['commit']}  date {results['date']}  load {results['load_average_start']} -> "
             f"{results['load_average_end']}",
             "stage times (s): " + ", ".join(f"{k[5:-2]} {v:.2f}" for k, v in results["timings"].items()
                                              if k.startswith("time_") and k.endswith("_s")), ""]
    for key in ("stage_share_of_run_samples",):
        if key in summary:
            lines += [key + ": " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in summary[key].items()), ""]
    for key in ("top_self_in_run", "top_inclusive_in_run", "native_libraries_self"):
        lines.append(key)
        for row in summary.get(key, []):
            lines.append(f"  {100 * row.get('share', 0):5.1f} %  {row['frame']}")
        lines.append("")
    for kind, profile in results["onnxruntime_op_profile"].items():
        lines.append(f"onnxruntime kernel time by op type, {kind} model (batch {profile['batch_size']}, "
                     f"{profile['kernel_time_ms_per_batch']:.0f} ms per batch)")
        lines += [f"  {100 * row['share']:5.1f} %  {row['op']}" for row in profile["op_types"]]
        lines.append("")
    from diaropt.files import atomic_path

    with atomic_path(summary_txt) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines[:30]), flush=True)
    results["top_items"] = {
        "python_and_native_self": [row["frame"] for row in summary.get("top_self_in_run", [])[:10]],
        "python_inclusive": [row["frame"] for row in summary.get("top_inclusive_in_run", [])[:10]],
        **{f"onnxruntime_{kind}_op_types": [f"{row['op']} {100 * row['share']:.1f} %" for row in p["op_types"][:6]]
           for kind, p in results["onnxruntime_op_profile"].items()}}
    path = write_results("profile_default", results)
    if not args.no_mlflow:
        metrics = {f"stage_share.{k}": v for k, v in summary.get("stage_share_of_run_samples", {}).items()}
        metrics.update({f"top_self.{i}": row.get("share", 0.0) for i, row in enumerate(summary["top_self_in_run"][:10])})
        log_to_mlflow("profile_default", metrics, {"profiler": results["profiler"], "commit": results["commit"],
                                                   **{f"top_self.{i}": row["frame"][:500] for i, row in
                                                      enumerate(summary["top_self_in_run"][:10])}},
                      [path, summary_txt, collapsed])


if __name__ == "__main__":
    main()
