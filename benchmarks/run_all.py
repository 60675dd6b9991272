"""Run every benchmark in sequence (slow: about 35 min on 2 free cores), results in benchmarks/results/.

    python benchmarks/run_all.py [--quick] [--repeats N]

Order: long_form (17 min recordings, seed_baseline vs default vs the recommended preset), scaling
(1-60 min), compute_limit, profile_default, then ``summarize.py`` (``benchmarks/results/SUMMARY.md``).
Each is its own process, so a failure in one does not stop the others; the exit code is non-zero if
any failed. ``--quick`` shrinks every input (a smoke run whose numbers are not comparable; its
results go to ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quick_dir = HERE / "results" / "quick"
    if args.quick:
        quick_dir.mkdir(parents=True, exist_ok=True)
        jobs = {"long_form": ["--duration-min", "1", "--repeats", "1", "--out", str(quick_dir / "long_form.json"),
                              "--no-mlflow"],
                "scaling": ["--lengths-min", "0.5", "1", "--out", str(quick_dir / "scaling.json"), "--no-mlflow"],
                "compute_limit": ["--length-min", "0.5", "--matmul-repeats", "2", "--out",
                                  str(quick_dir / "compute_limit.json"), "--no-mlflow"]}
    else:
        jobs = {"long_form": ["--repeats", str(args.repeats), "--max-wall-min", "75", "--synthetic-configs", "core"],
                "scaling": [],
                "compute_limit": [], "profile_default": []}
    failed = []
    for name, extra in jobs.items():
        start = time.perf_counter()
        print(f"== {name} {' '.join(extra)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra])
        print(f"== {name}: exit {done.returncode} after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        if done.returncode != 0:
            failed.append(name)
    if not args.quick:
        subprocess.run([sys.executable, str(HERE / "summarize.py")])  # benchmarks/results/SUMMARY.md
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
