"""Shared helpers of the benchmark scripts: environment record, configurations, statistics, MLflow.

Not a test helper: benchmarks measure and write ``benchmarks/results/*.json``; nothing is asserted.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diaropt.backends.base import usable_cpu_count
from diaropt.config import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MLFLOW_EXPERIMENT = "diaropt-benchmarks"
log = logging.getLogger("benchmarks")


def quiet() -> None:
    """Silence the tracer/coremltools chatter that would bury the benchmark's own lines."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def git_commit() -> str:
    """HEAD, with ``-dirty`` if tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> dict[str, float]:
    """1/5/15-minute load averages (other workers share this machine's cores)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen}


def environment() -> dict[str, Any]:
    """Commit, date, host, package versions, thread counts and the load average now."""
    import torch

    from diaropt.tracking import host_tags

    return {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": platform.platform(), "host": host_tags(REPO_ROOT), "torch_threads": torch.get_num_threads(),
            "cpu_count_usable": usable_cpu_count(),
            "load_average_start": load_average()}


def finish(results: dict[str, Any], start_s: float) -> None:
    results["load_average_end"] = load_average()
    results["wall_time_s"] = time.perf_counter() - start_s


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (and how many)."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def write_results(name: str, results: dict[str, Any], out: Path | None = None, announce: bool = True) -> Path:
    """Write ``results`` as JSON to ``out`` (default ``results/<name>.json``) atomically; say so if ``announce``."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from diaropt.files import atomic_path

    with atomic_path(path) as tmp:  # a failed write (full disk) keeps the previous results whole
        tmp.write_text(json.dumps(results, indent=1, default=str))
    if announce:
        print(f"wrote {path}", flush=True)
    return path


def flat_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``a.b.c`` keys (MLflow metric names)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flat_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[re.sub(r"[^0-9A-Za-z_\-. :/]", "_", prefix)[:250]] = float(tree)  # MLflow's allowed name characters
    return out


def log_to_mlflow(run_name: str, metrics: dict[str, float], params: dict[str, Any],
                  files: list[Path]) -> str | None:
    """One run in experiment ``diaropt-benchmarks`` (default store); returns its id, None on failure.

    The results file is already written when this runs: a tracking failure only prints a warning.
    """
    try:
        from diaropt.tracking import Tracker, host_tags, resolve_tracking_uri

        tracker = Tracker(resolve_tracking_uri(None, REPO_ROOT), MLFLOW_EXPERIMENT)
        run = tracker.start_child(run_name, None, {**host_tags(REPO_ROOT), "diaropt.benchmark": run_name})
        with run:
            run.log_params(params)
            run.log_metrics(metrics)
            for path in files:
                if path.is_file():
                    run.log_file(path, "results")
        print(f"MLflow: experiment {MLFLOW_EXPERIMENT!r}, run {run.run_id} ({run_name})", flush=True)
        return run.run_id
    except Exception as error:  # noqa: BLE001 - results are on disk already
        print(f"MLflow logging failed ({type(error).__name__}: {error}); results are in the JSON file", flush=True)
        return None


@dataclass
class LoadedConfiguration:
    """One configuration's models, built and loaded once, ready for repeated runs."""

    name: str
    overrides: list[str]
    cfg: Any
    built: Any
    pipeline: Any
    compile_timer: Any
    build_s: float


def load_configuration(name: str, overrides: list[str]) -> LoadedConfiguration:
    """Compose (tracking off), build (cached) and load one configuration; warm-up included."""
    from diaropt.config import compose
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import load_pipeline
    from diaropt.variants.build import build_models

    cfg = compose(["tracking.enabled=false", *overrides])
    start = time.perf_counter()
    built = build_models(cfg)
    build_s = time.perf_counter() - start
    timer = StageTimer()
    pipeline = load_pipeline(cfg, built, timer)
    return LoadedConfiguration(name, overrides, cfg, built, pipeline, timer, build_s)
