"""Quality bar of the pipeline issue: DER and timing breakdown on ami_mini, written to a file.

    python benchmarks/pipeline_quality.py [--overrides backend=torch ...] [--out benchmarks/results/...]

Runs each configuration (default: the fp32 torch reference and the default configuration) over the
dataset in one process, so their timings are comparable; writes per-file DER (both conventions),
aggregate DER/JER and the timing breakdown to ``benchmarks/results/pipeline_quality.json`` with the
commit it was measured on. Not a test: numbers are read, not asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import git_commit
from diaropt.config import REPO_ROOT, compose, to_container
from diaropt.pipeline.timing import StageTimer
from diaropt.runner import dataset_from_config, load_pipeline, run_dataset
from diaropt.variants.build import build_models

CONFIGURATIONS = {
    "torch_fp32_reference": ["backend=torch"],
    "default": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ami_mini")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/pipeline_quality.json")
    parser.add_argument("--config", action="append", default=[],
                        help="name=override1,override2 (repeatable); default: torch reference + default")
    args = parser.parse_args()
    configurations = dict(CONFIGURATIONS)
    if args.config:
        configurations = {c.split("=", 1)[0]: [o for o in c.split("=", 1)[1].split(",") if o] for c in args.config}
    results = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
               "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
               "dataset": args.dataset, "configurations": {}}
    for name, overrides in configurations.items():
        cfg = compose([f"dataset={args.dataset}", "tracking.enabled=false", *overrides])
        built = build_models(cfg)
        timer = StageTimer()
        pipeline = load_pipeline(cfg, built, timer)
        result = run_dataset(pipeline, dataset_from_config(cfg), None, timer, repeats=args.repeats,
                             show_progress=False)
        aggregate = result.aggregate
        print(f"{name:24s} DER {100 * aggregate['der_pyannote']:.2f} % (pyannote) "
              f"{100 * aggregate['der_fluidaudio']:.2f} % (fluidaudio)  RTFx {aggregate['rtfx']:.1f}  "
              f"embedding share {100 * aggregate['share_embedding']:.1f} %")
        results["configurations"][name] = {
            "overrides": overrides, "backend": built.backend, "config": to_container(cfg),
            "aggregate": aggregate,
            "per_file": [{k: v for k, v in row.items() if k.startswith(("uri", "der_", "jer_", "missed_", "false_",
                                                                         "confusion_", "num_", "time_", "rtfx"))}
                         for row in result.rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from diaropt.files import atomic_path

    with atomic_path(args.out) as tmp:  # a failed write keeps the previous results whole
        tmp.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
