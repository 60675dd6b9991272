"""Where ``python -m diaropt diarize one.wav`` spends its time before the first stage (warm caches).

    python benchmarks/startup_profile.py [AUDIO] [--repeats 3] [--out benchmarks/results/startup_profile.json]

Each repeat starts a new process that runs the CLI's own ``main`` with timing wrappers around the
start-up steps (wall clock, ``time.time()``, shared with this parent): interpreter start, the CLI's
imports, ``compose``, ``build_models`` (its ``_tool_versions``, ``_model_sources`` (weights' sha256),
``_torch_modules`` (only on a cache miss since phase 2) and ``fusion_plan.stage_specs`` parts, the
cache lookups), ONNX Runtime session creation, the warm-up (the CLI no longer warms up), the
first stage (``audio``) and the RTTM on disk. The model cache must already hold the configuration's
models (run the CLI once first); otherwise the first repeat measures a build. Import detail:
``python -X importtime -m diaropt diarize ...``. Numbers depend on the machine's load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, environment, spread, write_results

CHILD = r'''
import json, sys, time
marks = {"child_start": time.time()}
import diaropt.__main__ as cli
try:  # as `diarize` does before its imports (the wrapping below imports the same modules earlier)
    from diaropt.lazy_imports import import_pyannote_core_without_pyplot
    import_pyannote_core_without_pyplot()
except ImportError:  # code from before the deferral (--compare-src)
    pass
from diaropt.backends.base import BackendUnavailable
from diaropt.config import compose
from diaropt.data.annotations import write_rttm
from diaropt.pipeline.timing import StageTimer
from diaropt.runner import ChunkProgress, load_pipeline
from diaropt.variants import build
try:
    from diaropt.variants import fusion_plan
except ImportError:  # code from before issue 19 phase 2 (--compare-src)
    from diaropt.variants import fusion as fusion_plan
marks["imports_done"] = time.time()
spans = {}

def wrap(owner, name, label):
    original = getattr(owner, name, None)
    if original is None:  # not in this version of the code
        return
    def timed(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            spans[label] = spans.get(label, 0.0) + time.time() - start
    setattr(owner, name, timed)

import diaropt.config, diaropt.runner, diaropt.backends.onnxruntime as ortb, diaropt.pipeline.diarization as dz
wrap(diaropt.config, "compose", "compose")
wrap(build, "_tool_versions", "build.tool_versions")
wrap(build, "_torch_modules", "build.torch_modules")  # 0 on a cache hit (issue 19 phase 2)
wrap(build, "_model_sources", "build.weights_sha256")
wrap(fusion_plan, "stage_specs", "build.stage_specs")
wrap(build, "cached_build", "build.cache_lookup")
import diaropt.variants.build as vb
wrap(vb, "build_models", "build_models")
wrap(ortb.OnnxRuntimeModel, "__init__", "ort_session_create")
wrap(dz.DiarizationPipeline, "warm_up", "warm_up")
original_stage = StageTimer.stage
def stage(self, name):
    if name == "audio" and "first_stage" not in marks:
        marks["first_stage"] = time.time()
    return original_stage(self, name)
StageTimer.stage = stage
import diaropt.data.annotations as ann
original_write_rttm = ann.write_rttm
def write(*args, **kwargs):
    result = original_write_rttm(*args, **kwargs)
    marks.setdefault("first_rttm", time.time())
    return result
ann.write_rttm = write
code = cli.main(sys.argv[1:])
marks["end"] = time.time()
print("STARTUP_PROFILE " + json.dumps({"marks": marks, "spans": spans, "exit": code,
                                       "torch_imported": int("torch" in sys.modules),
                                       "matplotlib_imported": int("matplotlib" in sys.modules),
                                       "scipy_imported": int("scipy" in sys.modules)}))
'''


def one_run(audio: Path, overrides: list[str], src: Path | None = None) -> dict[str, float]:
    env = os.environ.copy()
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory(prefix="startup-") as out:
        spawn = time.time()
        done = subprocess.run([sys.executable, "-c", CHILD, "diarize", str(audio), "--out", out, "--no-progress",
                               *overrides], capture_output=True, text=True, env=env)
        line = next((l for l in done.stdout.splitlines() if l.startswith("STARTUP_PROFILE ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"startup run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    data = json.loads(line.split(" ", 1)[1])
    marks = {k: v - spawn for k, v in data["marks"].items()}
    spans = {"build.torch_modules": 0.0, "warm_up": 0.0, **data["spans"]}  # absent: not called
    return {"interpreter_start_s": marks["child_start"], "cli_imports_s": marks["imports_done"] - marks["child_start"],
            **{f"{k}_s": v for k, v in spans.items()},
            "spawn_to_first_stage_s": marks["first_stage"], "spawn_to_first_rttm_s": marks["first_rttm"],
            "spawn_to_exit_s": marks["end"],
            # 1: the module was imported by the end of the run (absent from older code's output: -1, unknown)
            **{f"{m}_imported": float(data.get(f"{m}_imported", -1)) for m in ("torch", "matplotlib", "scipy")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="?", type=Path, default=None, help="default: pyannote's 30 s sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "startup_profile.json")
    parser.add_argument("--compare-src", type=Path, default=None,
                        help="another checkout's src/ (e.g. before a change): its runs alternate with this "
                             "code's in every round and the per-round ratios are reported")
    parser.add_argument("--compare-label", default=None,
                        help="what --compare-src is, for the results (e.g. 'commit 3eb142c'); default: its path")
    args = parser.parse_args()
    audio = args.audio
    if audio is None:
        from diaropt.data.datasets import load_dataset

        audio = load_dataset("sample").items[0].audio_path
    results = {"benchmark": "startup_profile", **environment(), "audio": str(audio), "overrides": args.override}
    one_run(audio, args.override)  # fills the model cache if needed; not counted
    if args.compare_src is not None:
        one_run(audio, args.override, args.compare_src)
    runs, compared = [], []
    for r in range(args.repeats):
        pair = [("this", None), ("compared", args.compare_src)] if args.compare_src is not None else [("this", None)]
        for label, src in (pair if r % 2 == 0 else pair[::-1]):
            run = {**one_run(audio, args.override, src), "load_1min": os.getloadavg()[0]}
            (runs if label == "this" else compared).append(run)
            print(f"run {r + 1} {label}: " + "  ".join(f"{k} {v:.2f}" for k, v in run.items()), flush=True)
    results["runs"] = runs
    results["summary"] = {k: spread([run[k] for run in runs]) for k in sorted({k for run in runs for k in run})
                          if all(k in run for run in runs)}
    if compared:
        results["compare_src"] = args.compare_label or str(args.compare_src)
        results["compared_runs"] = compared
        results["compared_summary"] = {k: spread([run[k] for run in compared])
                                       for k in sorted({k for run in compared for k in run})
                                       if all(k in run for run in compared)}
        results["speedup_vs_compared_per_round"] = {
            key: spread([c[key] / t[key] for t, c in zip(runs, compared)])
            for key in ("spawn_to_first_stage_s", "spawn_to_first_rttm_s", "spawn_to_exit_s")}
    results["load_average_end"] = os.getloadavg()
    write_results("startup_profile", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
