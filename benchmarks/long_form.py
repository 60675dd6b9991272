"""Long-form benchmark: timing breakdown, RTFx and DER on ~17 min recordings with exact references.

    python benchmarks/long_form.py [--duration-min 17] [--repeats 3] [--recommended "quant=int8 ..."]

Recordings (built reproducibly, cached under the diaropt cache dir):

- ``ami``: the fully annotated AMI debug clips of the pinned assets concatenated to the target length
  (``diaropt.data.long_form``; global AMI speaker ids, shifted references and UEMs);
- ``synthetic``: one LibriSpeech meeting (5 speakers, ~10 % overlap) from
  ``../shared/data/librispeech_test-other`` (``dataset=synthetic``'s generator); skipped, with the
  reason printed, if that folder is absent.

Configurations, all loaded once in this one process: ``seed_baseline`` (``experiment=seed_baseline``:
per-frame extraction, fp32, per-pair embedding, the first batch sizes), the candidates (default: the
tiled trunk; ``shared_trunk``: the trunk once per chunk, exact)
and the "recommended" one: ``--recommended``, else the report's preset (:func:`report_preset`), else the
fastest candidate whose DER on ``ami`` is within ``--der-tolerance-pts`` of seed_baseline's. Repeats
are interleaved (round r runs every configuration once, in a rotated order) so that load from other
processes hits all configurations alike; speedups are per-round ratios to seed_baseline (median,
min, max). Writes ``benchmarks/results/long_form.json`` and one MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import (RESULTS_DIR, environment, finish, flat_metrics, load_average, load_configuration, log_to_mlflow,
                    quiet, spread, write_results)

from diaropt.config import REPO_ROOT
from diaropt.pipeline.timing import STAGES
from diaropt.variants.build import _value

BASELINE = "seed_baseline"
BASELINE_OVERRIDES = ["experiment=seed_baseline"]
# the exact optimization alone (outputs unchanged), to separate it from the default's tiled trunk and
# the recommended preset's other axes
CANDIDATES = {"default": [], "shared_trunk": ["embedding.shared_trunk=true", "embedding.tiled_trunk=false"]}
DEFAULT_SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "librispeech_test-other"
TIMING_KEYS = [f"time_{stage}_s" for stage in STAGES] + ["time_total_s", "rtfx"]
SCORE_KEYS = ("der_pyannote", "der_fluidaudio", "jer_pyannote", "missed_pyannote",
              "false_alarm_pyannote", "confusion_pyannote")


def report_preset() -> tuple[list[str], str] | None:
    """Overrides of the report's recommended configuration, with where they came from: the newest
    preset installed in ``conf/experiment/recommended_*.yaml`` (``experiments/report.py
    --install-preset``; committed, so a clone benchmarks what the team reviewed), else the latest
    ``outputs/reports/*/`` preset (``override /group: option`` defaults and plain keys; a JSON file
    with an ``overrides`` list also works)."""
    from omegaconf import OmegaConf

    from diaropt.config import CONF_DIR

    installed = sorted((CONF_DIR / "experiment").glob("recommended_*.yaml"), key=lambda p: p.stat().st_mtime)
    if installed:
        newest = installed[-1]
        return [f"experiment={newest.stem}"], str(newest.relative_to(REPO_ROOT) if newest.is_relative_to(REPO_ROOT)
                                                  else newest)
    reports = sorted((p for p in (REPO_ROOT / "outputs" / "reports").glob("*/") if p.is_dir()),
                     key=lambda p: p.stat().st_mtime)
    for folder in reversed(reports):
        for path in sorted(folder.glob("*preset*.json")) + sorted(folder.glob("recommended*.json")):
            data = json.loads(path.read_text())
            if isinstance(data.get("overrides"), list):
                return [str(o) for o in data["overrides"]], str(path)
        for path in sorted(folder.rglob("*preset*.yaml")) + sorted(folder.rglob("recommended*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            overrides = []
            for entry in node.pop("defaults", []) or []:
                if isinstance(entry, dict):
                    for key, value in entry.items():
                        overrides.append(f"{key.replace('override ', '').strip('/ ')}={value}")
            for key, value in flat_metrics(node).items():
                overrides.append(f"{key}={value}")
            return overrides, str(path)
    return None


def recordings(duration_s: float, source_dir: Path, num_speakers: int, overlap_ratio: float,
               seed: int, names: tuple[str, ...] = ("ami", "synthetic")) -> tuple[dict[str, Any], dict[str, str]]:
    """{name: one-item Dataset}, {name: reason skipped}."""
    from diaropt.assets import default_cache_dir
    from diaropt.data.datasets import load_dataset
    from diaropt.data.long_form import load_ami_long_form

    cache = Path(default_cache_dir()) / "datasets"
    datasets: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if "ami" in names:
        datasets["ami"], _ = load_ami_long_form(duration_s, cache, seed=seed)
    if "synthetic" not in names:
        pass
    elif source_dir.is_dir():
        datasets["synthetic"] = load_dataset("synthetic", source_dir=str(source_dir), num_files=1,
                                             duration_s=duration_s, num_speakers=num_speakers,
                                             overlap_ratio=overlap_ratio, seed=seed, cache_dir=cache)
    else:
        skipped["synthetic"] = f"{source_dir} does not exist (LibriSpeech speakers for the synthetic meeting)"
        print(f"skipping the synthetic meeting: {skipped['synthetic']}", flush=True)
    return datasets, skipped


def describe(dataset: Any) -> dict[str, Any]:
    import soundfile as sf

    from diaropt.data.long_form import overlap_fraction

    (item,) = dataset.items
    return {"uri": item.uri, "audio_path": str(item.audio_path),
            "duration_s": sf.info(str(item.audio_path)).duration,
            "num_speakers_reference": len(item.reference.labels()),
            "overlap_fraction_reference": overlap_fraction(item.reference),
            "speech_s": item.reference.get_timeline().support().duration(),
            "scored_s": item.uem.duration() if item.uem is not None else None}


def run_round(loaded: Any, dataset: Any) -> dict[str, Any]:
    from diaropt.runner import run_dataset

    result = run_dataset(loaded.pipeline, dataset, None, loaded.compile_timer, repeats=1, show_progress=False)
    row = result.rows[0]
    return {**result.aggregate, "num_chunks": row["num_chunks"], "num_embedded": row["num_embedded"],
            "num_speakers_hypothesis": row["num_speakers_hypothesis"]}


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration: timing spreads, shares, scores, per-round speedups vs the baseline."""
    summary: dict[str, Any] = {}
    for name, runs in rounds.items():
        last = runs[-1]
        entry: dict[str, Any] = {"timing": {k: spread([r[k] for r in runs]) for k in TIMING_KEYS}}
        total = entry["timing"]["time_total_s"]["median"]
        entry["share"] = {stage: entry["timing"][f"time_{stage}_s"]["median"] / total for stage in STAGES}
        entry["scores"] = {k: last[k] for k in SCORE_KEYS if k in last}
        entry["der_pyannote_all_rounds"] = [r["der_pyannote"] for r in runs]
        entry["counts"] = {k: last[k] for k in ("num_chunks", "num_embedded", "num_speakers_hypothesis",
                                               "audio_duration_s")}
        if BASELINE in rounds:
            base = rounds[BASELINE]
            entry["speedup_vs_seed_baseline"] = {
                "total": spread([b["time_total_s"] / r["time_total_s"] for b, r in zip(base, runs)]),
                "embedding": spread([b["time_embedding_s"] / r["time_embedding_s"] for b, r in zip(base, runs)]),
                "segmentation": spread([b["time_segmentation_s"] / r["time_segmentation_s"]
                                        for b, r in zip(base, runs)])}
            entry["der_delta_vs_seed_baseline_pts"] = 100 * (last["der_pyannote"] - base[-1]["der_pyannote"])
        summary[name] = entry
    return summary


def pick_recommended(summary: dict[str, Any], candidates: list[str], tolerance_pts: float) -> tuple[str, str]:
    """Fastest candidate (median total time) whose DER is within ``tolerance_pts`` of the baseline's."""
    eligible = [c for c in candidates if abs(summary[c]["der_delta_vs_seed_baseline_pts"]) <= tolerance_pts]
    if not eligible:
        return "default", f"no candidate within {tolerance_pts} DER points of seed_baseline: default kept"
    best = min(eligible, key=lambda c: summary[c]["timing"]["time_total_s"]["median"])
    return best, (f"fastest of {eligible} (median total time on ami) among candidates within {tolerance_pts} DER "
                  f"points of seed_baseline")


def run_recording(name: str, dataset: Any, loaded: dict[str, Any], repeats: int, start_s: float,
                  max_wall_min: float | None, notes: list[str], remaining_recordings: int,
                  on_run: Any = None) -> dict[str, list]:
    """Interleaved rounds over ``loaded``; may cut repeats to 2 if the projected wall time is too long."""
    names = list(loaded)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    r = 0
    while r < repeats:
        round_start = time.perf_counter()
        order = names[r % len(names):] + names[: r % len(names)]
        for config in order:
            rounds[config].append(run_round(loaded[config], dataset))
            a = rounds[config][-1]
            print(f"  {name} round {r + 1}/{repeats} {config:14s} total {a['time_total_s']:7.1f} s  "
                  f"embedding {a['time_embedding_s']:7.1f} s  RTFx {a['rtfx']:6.1f}  DER {100 * a['der_pyannote']:.2f} %",
                  flush=True)
            if on_run is not None:
                on_run(name, rounds)
        round_s = time.perf_counter() - round_start
        if r == 0 and max_wall_min is not None and repeats > 2:
            projected_min = ((time.perf_counter() - start_s) + round_s * (repeats - 1)
                             + round_s * repeats * remaining_recordings) / 60
            if projected_min > max_wall_min:
                notes.append(f"repeats reduced from {repeats} to 2: one round of {name} took {round_s:.0f} s, "
                             f"projected wall time {projected_min:.0f} min > {max_wall_min:.0f} min")
                print(notes[-1], flush=True)
                repeats = 2
        r += 1
    return rounds


def headline_of(per_recording: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """Speedup (median, min, max), RTFx, DER and embedding share per recording and configuration."""
    headline: dict[str, Any] = {}
    for rec, summary in per_recording.items():
        for config, entry in summary.items():
            speed = entry.get("speedup_vs_seed_baseline", {}).get("total", {})
            headline[f"{rec}.{config}"] = {
                "speedup_median": speed.get("median"), "speedup_min": speed.get("min"),
                "speedup_max": speed.get("max"), "rtfx": entry["timing"]["rtfx"]["median"],
                "der_pyannote_pct": 100 * entry["scores"]["der_pyannote"],
                "der_fluidaudio_pct": 100 * entry["scores"]["der_fluidaudio"],
                "embedding_share_pct": 100 * entry["share"]["embedding"]}
            if verbose:
                print(f"{rec:9s} {config:14s} speedup {speed.get('median', float('nan')):5.2f} "
                      f"[{speed.get('min', float('nan')):.2f}, {speed.get('max', float('nan')):.2f}]  "
                      f"RTFx {entry['timing']['rtfx']['median']:6.1f}  "
                      f"DER {100 * entry['scores']['der_pyannote']:.2f} % "
                      f"(fluidaudio {100 * entry['scores']['der_fluidaudio']:.2f} %)  "
                      f"embedding {100 * entry['share']['embedding']:.1f} %", flush=True)
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-min", type=float, default=17.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recommended", default=None, help='space-separated overrides, e.g. "quant=int8"')
    parser.add_argument("--candidate", action="append", default=[], help="name=override1,override2 (repeatable)")
    parser.add_argument("--der-tolerance-pts", type=float, default=0.5)
    parser.add_argument("--synthetic-configs", choices=("all", "core"), default="all",
                        help="core: only seed_baseline, default and recommended on the synthetic meeting")
    parser.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE_DIR)
    parser.add_argument("--num-speakers", type=int, default=5)
    parser.add_argument("--overlap-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-wall-min", type=float, default=None,
                        help="cut repeats to 2 if round 1 projects a longer run")
    parser.add_argument("--recordings", nargs="+", choices=("ami", "synthetic"), default=["ami", "synthetic"])
    parser.add_argument("--note", action="append", default=[], help="recorded in the results' notes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "long_form.json")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    quiet()
    start_s = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "long_form", **environment(), "notes": list(args.note)}
    print(f"load average at start: {results['load_average_start']}", flush=True)

    candidates = dict(CANDIDATES)
    if args.candidate:
        candidates = {c.split("=", 1)[0]: [o for o in c.split("=", 1)[1].split(",") if o] for c in args.candidate}
    recommended: tuple[list[str], str] | None = None
    if args.recommended is not None:
        recommended = (args.recommended.split(), "--recommended")
    else:
        recommended = report_preset()
    configurations = {BASELINE: BASELINE_OVERRIDES, **candidates}
    if recommended is not None:
        configurations["recommended"] = recommended[0]
        results["recommended"] = {"overrides": recommended[0], "source": recommended[1]}

    datasets, skipped = recordings(60 * args.duration_min, args.source_dir, args.num_speakers, args.overlap_ratio,
                                   args.seed, tuple(args.recordings))
    results["recordings"] = {name: describe(ds) for name, ds in datasets.items()}
    results["skipped"] = skipped
    for name, info in results["recordings"].items():
        print(f"{name}: {info['duration_s'] / 60:.1f} min, {info['num_speakers_reference']} speakers, "
              f"overlap {100 * info['overlap_fraction_reference']:.1f} % of speech", flush=True)

    loaded = {}
    for name, overrides in configurations.items():
        loaded[name] = load_configuration(name, overrides)
        print(f"loaded {name} ({' '.join(overrides) or 'defaults'}; backend {loaded[name].built.backend}, "
              f"build {loaded[name].build_s:.1f} s)", flush=True)
    results["configurations"] = {n: {"overrides": c.overrides, "backend": c.built.backend,
                                     "frame_extraction": str(_value(c.cfg.frame_extraction.mode)),
                                     "quant": str(_value(c.cfg.quant.mode)),
                                     "embedding_batch_size": c.cfg.embedding.batch_size,
                                     "build_s": c.build_s} for n, c in loaded.items()}

    repeats = args.repeats
    per_recording: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    def save_partial(name: str, rounds: dict[str, list]) -> None:
        """Write what is done so far (a killed run still leaves its finished measurements)."""
        done = sum(len(r) for r in rounds.values())
        partial = {**results, "status": f"partial: {done} runs of {name} done", "load_average_now": load_average(),
                   "results": {**per_recording, name: summarize({k: v for k, v in rounds.items() if v})},
                   "rounds": {**raw, name: rounds}}
        partial["headline"] = headline_of(partial["results"])
        write_results("long_form", partial, args.out)

    for index, (name, dataset) in enumerate(datasets.items()):
        chosen = dict(loaded)
        best = results.get("recommended", {}).get("candidate")
        if name != "ami" and args.synthetic_configs == "core":
            keep = {BASELINE, "default", "recommended", best}
            chosen = {n: c for n, c in loaded.items() if n in keep}
        notes_before = len(results["notes"])
        rounds = run_recording(name, dataset, chosen, repeats, start_s, args.max_wall_min, results["notes"],
                               len(datasets) - index - 1, save_partial)
        if len(results["notes"]) > notes_before:
            repeats = 2
        raw[name] = rounds
        per_recording[name] = summarize(rounds)
        if name == "ami" and "recommended" not in loaded and len(candidates) > 1:  # chosen among the candidates, on ami
            best, why = pick_recommended(per_recording["ami"], list(candidates), args.der_tolerance_pts)
            results["recommended"] = {"overrides": candidates[best], "source": f"candidate {best!r}: {why}",
                                      "candidate": best}
            print(f"recommended: {best} ({why})", flush=True)
        if best is None and len(candidates) == 1 and "recommended" not in loaded:  # the one candidate
            best = next(iter(candidates))
            results["recommended"] = {"overrides": candidates[best], "candidate": best,
                                      "source": f"the only candidate run ({best!r}); no report preset found"}
        if best is None:
            best = results.get("recommended", {}).get("candidate")
        if best is not None and best in per_recording[name]:
            per_recording[name]["recommended"] = per_recording[name][best]
    results["repeats"] = repeats
    results["results"] = per_recording
    results["rounds"] = raw
    finish(results, start_s)

    results["headline"] = headline_of(per_recording, verbose=True)
    results["status"] = "complete"
    path = write_results("long_form", results, args.out)
    if not args.no_mlflow:
        log_to_mlflow(args.out.stem, flat_metrics(results["headline"]),
                      {"repeats": repeats, "duration_min": args.duration_min, "commit": results["commit"],
                       "recommended": " ".join(results.get("recommended", {}).get("overrides", [])) or "default",
                       "notes": " | ".join(results["notes"])[:5000] or "-"}, [path])


if __name__ == "__main__":
    sys.exit(main())
