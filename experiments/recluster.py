"""Re-cluster one dataset under many clustering configurations, running the networks once per file.

    python experiments/recluster.py --dataset dev --grid "clustering=ahc clustering.threshold=0.6,0.7" \\
        --grid "clustering=online_ema clustering.threshold=0.5,0.6" --out benchmarks/results/recluster_dev.json

Every configuration is composed from conf/ like a sweep job (``cache_arrays=true``: segmentation outputs and
embeddings come from the array cache after the first configuration), so the numbers equal
``python experiments/sweep.py -m dataset=dev clustering=... clustering.threshold=... cache_arrays=true
parity.enabled=false`` without MLflow and without loading the models again per job. Writes one JSON with per-file
rows (DER, missed detection, false alarm, confusion; collar 0, overlap scored) per configuration, and the same
as markdown tables beside it (``.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

from diaropt.quiet import quiet_third_party

quiet_third_party()  # before coremltools is imported

from diaropt.config import compose, to_container  # noqa: E402
from diaropt.files import atomic_path  # noqa: E402
from diaropt.pipeline.timing import StageTimer  # noqa: E402
from diaropt.runner import (clustering_from_config, dataset_from_config, load_pipeline,  # noqa: E402
                            params_from_config, run_dataset)
from diaropt.variants.build import build_models  # noqa: E402


def expand(grid: str) -> list[list[str]]:
    """``"a=1,2 b=x"`` -> ``[["a=1", "b=x"], ["a=2", "b=x"]]`` (Hydra's basic sweep syntax)."""
    axes = []
    for token in grid.split():
        key, values = token.split("=", 1)
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)]


def markdown(results: dict) -> str:
    """Per-file DER table (percent; missed / false alarm / confusion) of every configuration in ``results``."""
    lines = [f"## dataset={results['dataset']}", ""]
    for entry in results["results"]:
        aggregate = entry["aggregate"]
        lines += [f"### {' '.join(entry['overrides'])}: DER {100 * aggregate['der_pyannote']:.2f} % "
                  f"(missed {100 * aggregate['missed_pyannote']:.2f}, false alarm "
                  f"{100 * aggregate['false_alarm_pyannote']:.2f}, confusion {100 * aggregate['confusion_pyannote']:.2f})",
                  "", "| file | speakers ref / hyp | DER % | missed % | false alarm % | confusion % |",
                  "|---|---|---|---|---|---|"]
        for row in entry["rows"]:
            lines.append(f"| {row['uri']} | {row['num_speakers_reference']} / {row['num_speakers_hypothesis']} | "
                         f"{100 * row['der_pyannote']:.2f} | {100 * row['missed_pyannote']:.2f} | "
                         f"{100 * row['false_alarm_pyannote']:.2f} | {100 * row['confusion_pyannote']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--grid", action="append", required=True, help="space-separated key=v1,v2 overrides")
    parser.add_argument("--override", action="append", default=[], help="applied to every configuration")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    base = [f"dataset={args.dataset}", "cache_arrays=true", "parity.enabled=false", *args.override]
    configurations = [overrides for grid in args.grid for overrides in expand(grid)]
    cfg = compose(base + configurations[0])
    built = build_models(cfg)
    timer = StageTimer()
    pipeline = load_pipeline(cfg, built, timer)
    dataset = dataset_from_config(cfg)
    results = []
    for overrides in configurations:
        cfg = compose(base + overrides)
        pipeline.clustering = clustering_from_config(cfg)
        pipeline.params = params_from_config(cfg)
        start = time.perf_counter()
        result = run_dataset(pipeline, dataset, None, timer, max_duration_s=cfg.dataset.max_duration_s,
                             show_progress=False)
        rows = [{k: v for k, v in row.items() if k in ("uri", "num_speakers_reference", "num_speakers_hypothesis")
                 or k.endswith("_pyannote")} for row in result.rows]
        results.append({"overrides": overrides, "clustering": to_container(cfg)["clustering"],
                        "aggregate": {k: v for k, v in result.aggregate.items() if "pyannote" in k or "fluid" in k},
                        "rows": rows, "array_cache_hits": result.aggregate.get("array_cache_hits", 0)})
        print(f"{' '.join(overrides):60s} DER {100 * result.aggregate['der_pyannote']:6.2f} % "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:  # rewritten after each configuration: never a partial file
            tmp.write_text(json.dumps({"dataset": args.dataset, "base": base, "results": results}))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown({"dataset": args.dataset, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
