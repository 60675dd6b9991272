"""Side by side with the peer: diaropt (default, recommended preset) and senko 0.2.2, same files, one run.

    python benchmarks/peer.py [--dataset test] [--no-ami] [--repeats 3] [--cold-repeats 3] [--max-files N]

Files: the ``--dataset`` set (default ``test``, the accuracy issue's test conversations; ``synthetic``
or ``ami_mini`` for a smoke run until it exists) and the AMI clips (``ami_mini``; ``--no-ami`` leaves
them out). Every file is first written once as a 16 kHz mono 16-bit WAV (senko accepts nothing else;
decoded and resampled by diaropt's own ``load_audio``) under the cache, and every system reads those
same WAVs.

Systems: ``default`` (diaropt's default configuration), ``recommended`` (the newest
``conf/experiment/recommended_*.yaml``, as ``long_form.py``; ``--recommended`` to override) and
``senko`` (``senko_runner.py``: senko on CPU as its own scripts run it; its fbank library or the
kaldi-native-fbank substitute, recorded).

- **warm**: all systems loaded once in this process (models built, sessions created, warmed up);
  per file, the wall time from the WAV path to the diarization (decoding included).
- **cold**: per system and file set, one new process (``python -m diaropt diarize ... --out DIR`` /
  ``python benchmarks/senko_runner.py ... --out DIR``) timed from spawn to its first RTTM on disk
  (one short file's wait: start-up included) and to its exit with every RTTM written.

Rounds are interleaved (round r runs every system once, in a rotated order) so that load from other
processes hits all systems alike; per-round speedups over senko are ratios within the round (median,
min, max). DER in both conventions of ``diaropt.metrics`` (pyannote: collar 0, overlap scored;
FluidAudio: collar 0.25 s, overlap skipped), scored on the warm outputs and, as a check that the CLI
computes the same, on the cold RTTMs. Writes ``benchmarks/results/peer.json`` (host, load average,
commit, engine/precision of each system), one MLflow run in ``diaropt-benchmarks``; ``summarize.py``
turns it into a SUMMARY.md section. Nothing here is asserted: numbers are read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common import (RESULTS_DIR, environment, finish, flat_metrics, load_average, load_configuration, log_to_mlflow,
                    quiet, spread, write_results)

from diaropt.config import REPO_ROOT

HERE = Path(__file__).resolve().parent
PEER = "senko"
POLL_S = 0.02  # cold runs: how often the output folder is checked for the first RTTM


@dataclass
class FileSet:
    """One evaluation set as the WAVs every system reads, with references for scoring."""

    name: str
    items: list[Any]  # diaropt DatasetItem (reference, uem)
    wavs: dict[str, Path]  # uri -> 16 kHz mono PCM-16 WAV
    duration_s: float


@dataclass
class System:
    name: str
    info: dict[str, Any]
    diarize: Callable[[Path, str], tuple[Any, dict[str, float]]]  # (wav, uri) -> (Annotation, stage seconds)
    cold_command: Callable[[list[Path], Path], list[str]]


def load_file_set(dataset: str, max_files: int | None, wav_root: Path) -> FileSet:
    """The dataset's items and their 16 kHz mono PCM-16 copies (written once, atomically)."""
    import soundfile as sf

    from diaropt.config import compose
    from diaropt.files import atomic_path
    from diaropt.pipeline.audio import SAMPLE_RATE_HZ, load_audio
    from diaropt.runner import dataset_from_config

    from hydra.errors import HydraException

    try:
        cfg = compose(["tracking.enabled=false", f"dataset={dataset}"])
    except HydraException as error:
        raise SystemExit(f"error: dataset {dataset!r} is not defined in conf/dataset/ ({type(error).__name__}). "
                         "`test` comes with the accuracy issue's evaluation sets; until then use --dataset synthetic "
                         "or --dataset ami_mini for a smoke run") from error
    items = list(dataset_from_config(cfg))[:max_files]
    folder = wav_root / dataset
    wavs: dict[str, Path] = {}
    duration_s = 0.0
    for item in items:
        path = folder / f"{item.uri}.wav"
        source_stat = item.audio_path.stat()
        stamp = folder / f".{item.uri}.source"  # which source the copy was made from
        source_id = f"{item.audio_path}:{source_stat.st_size}:{source_stat.st_mtime_ns}"
        if not path.is_file() or not stamp.is_file() or stamp.read_text() != source_id:
            audio = load_audio(item.audio_path)
            with atomic_path(path) as tmp:
                sf.write(str(tmp), audio, SAMPLE_RATE_HZ, subtype="PCM_16")
            with atomic_path(stamp) as tmp:
                tmp.write_text(source_id)
        wavs[item.uri] = path
        duration_s += sf.info(str(path)).duration
    return FileSet(dataset, items, wavs, duration_s)


def diaropt_system(name: str, overrides: list[str], source: str) -> System:
    import onnxruntime

    from diaropt.pipeline.timing import StageTimer
    from diaropt.variants.build import _value

    loaded = load_configuration(name, overrides)
    cfg = loaded.cfg
    quant = str(_value(cfg.quant.mode))
    info = {"system": "diaropt", "overrides": overrides, "source": source, "backend": loaded.built.backend,
            "engine": (f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
                       if loaded.built.backend == "onnxruntime" else loaded.built.backend),
            "precision": quant, "quant_segmentation": bool(cfg.quant.segmentation),
            "quant_embedding": bool(cfg.quant.embedding),
            "frame_extraction": str(_value(cfg.frame_extraction.mode)), "step_s": cfg.segmentation.step_s,
            "tiled_trunk": bool(cfg.embedding.tiled_trunk), "num_threads": cfg.backend.num_threads,
            "segmentation_batch_size": cfg.segmentation.batch_size,
            "overlap_stages": bool(cfg.backend.get("overlap_stages", False)),
            "ort_allow_spinning": cfg.backend.get("ort_allow_spinning", None),
            "ort_force_spinning_stop": bool(cfg.backend.get("ort_force_spinning_stop", False)),
            "sinc_shared": bool(loaded.built.fusion.get("sinc_shared", 0)),  # as realized (auto resolved)
            "ort_cache_optimized": bool(cfg.backend.get("ort_cache_optimized", False)),
            "build_s": loaded.build_s, "load_s": loaded.compile_timer.seconds.get("compile", 0.0),
            "warmup_s": loaded.compile_timer.seconds.get("warmup", 0.0)}

    def run(wav: Path, uri: str) -> tuple[Any, dict[str, float]]:
        timer = StageTimer(loaded.pipeline.sync)
        output = loaded.pipeline(wav, uri, timer=timer)
        metrics = timer.metrics(output.audio_duration_s)
        return output.annotation, {k: v for k, v in metrics.items() if k.startswith("time_") and k != "time_total_s"}

    def command(wavs: list[Path], out: Path) -> list[str]:
        return [sys.executable, "-m", "diaropt", "diarize", *map(str, wavs), "--out", str(out), "--no-progress",
                *overrides]

    return System(name, info, run, command)


def senko_system(fbank: str, cold_warmup: bool = True) -> System:
    import senko_runner

    diarizer, info = senko_runner.load_diarizer(fbank)

    def run(wav: Path, uri: str) -> tuple[Any, dict[str, float]]:
        segments, timing = senko_runner.diarize(diarizer, wav)
        return senko_runner.annotation_of(segments, uri), {f"time_{k}": v for k, v in timing.items()
                                                           if k != "total_time"}

    def command(wavs: list[Path], out: Path) -> list[str]:
        return [sys.executable, str(HERE / "senko_runner.py"), *map(str, wavs), "--out", str(out),
                "--fbank", "kaldi-native-fbank" if info["fbank_substituted"] else "native",
                *([] if cold_warmup else ["--no-warmup"])]

    info["cold_warmup"] = cold_warmup
    system = System(PEER, info, run, command)
    system.parity = diarizer  # kept for the fbank parity measurement
    return system


def warm_pass(system: System, file_set: FileSet) -> dict[str, Any]:
    """Every file of the set once; per-file wall seconds, stage seconds and the annotations."""
    per_file, annotations = {}, {}
    for uri, wav in file_set.wavs.items():
        start = time.perf_counter()
        annotation, stages = system.diarize(wav, uri)
        per_file[uri] = {"wall_s": time.perf_counter() - start, **stages}
        annotations[uri] = annotation
    total = sum(f["wall_s"] for f in per_file.values())
    return {"time_total_s": total, "rtfx": file_set.duration_s / total, "per_file": per_file,
            "load_1min": os.getloadavg()[0], "annotations": annotations}


def cold_pass(system: System, file_set: FileSet) -> dict[str, Any]:
    """One new process over the set: seconds to its first RTTM and to its exit (every RTTM written)."""
    with tempfile.TemporaryDirectory(prefix=f"peer-{system.name}-") as folder:
        out = Path(folder)
        command = system.cold_command(list(file_set.wavs.values()), out)
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=REPO_ROOT)
        first_s = None
        while process.poll() is None:
            if first_s is None and any(out.glob("*.rttm")):
                first_s = time.perf_counter() - start
            time.sleep(POLL_S)
        wall_s = time.perf_counter() - start
        stdout, stderr = process.communicate()
        written = {p.stem for p in out.glob("*.rttm")}
        missing = sorted(set(file_set.wavs) - written)
        if process.returncode != 0 or missing:
            raise RuntimeError(f"cold run of {system.name} on {file_set.name} failed (exit {process.returncode}, "
                               f"missing RTTMs {missing[:5]}): {stderr[-2000:]}")
        if first_s is None:  # the process ended between two polls
            first_s = wall_s
        annotations = _read_rttms(out, file_set)
    return {"first_rttm_s": first_s, "wall_s": wall_s, "rtfx": file_set.duration_s / wall_s,
            "load_1min": os.getloadavg()[0], "command": " ".join(command[:3]) + " ...",
            "annotations": annotations, "stdout_tail": stdout[-1500:]}


def _read_rttms(folder: Path, file_set: FileSet) -> dict[str, Any]:
    from pyannote.core import Annotation

    from diaropt.data.annotations import load_rttm

    annotations = {}
    for uri in file_set.wavs:
        loaded = load_rttm(folder / f"{uri}.rttm", allow_empty=True)
        annotations[uri] = loaded.get(uri, Annotation(uri=uri))
    return annotations


def score(file_set: FileSet, annotations: dict[str, Any]) -> dict[str, Any]:
    """Pooled DER (both conventions) over the set, and per file."""
    from diaropt.metrics import DiarizationScorer

    scorer = DiarizationScorer()
    rows = [scorer.add(item.uri, item.reference, annotations[item.uri], item.uem) for item in file_set.items]
    aggregate = scorer.aggregate()
    keys = ("der_pyannote", "der_fluidaudio", "jer_pyannote", "missed_pyannote", "false_alarm_pyannote",
            "confusion_pyannote")
    return {"aggregate": {k: float(aggregate[k]) for k in keys},
            "per_file": {row["uri"]: {k: float(row[k]) for k in ("der_pyannote", "der_fluidaudio")} for row in rows},
            "num_speakers_hypothesis": {uri: len(a.labels()) for uri, a in annotations.items()}}


def summarize(file_set: FileSet, warm: dict[str, list[dict]], cold: dict[str, list[dict]]) -> dict[str, Any]:
    """Per system: warm/cold spreads, per-round speedups over senko, DER (warm; cold as a check)."""
    summary: dict[str, Any] = {}
    for name, runs in warm.items():
        entry: dict[str, Any] = {"warm": {"time_total_s": spread([r["time_total_s"] for r in runs]),
                                          "rtfx": spread([r["rtfx"] for r in runs])}}
        stage_keys = sorted({k for r in runs for f in r["per_file"].values() for k in f if k.startswith("time_")})
        entry["warm"]["stage_s"] = {k: spread([sum(f.get(k, 0.0) for f in r["per_file"].values()) for r in runs])
                                    for k in stage_keys}
        entry["scores"] = score(file_set, runs[-1]["annotations"])
        if PEER in warm and name != PEER:
            entry["warm"]["speedup_vs_senko"] = spread([p["time_total_s"] / r["time_total_s"]
                                                        for p, r in zip(warm[PEER], runs)])
            entry["der_delta_vs_senko_pts"] = {
                c: 100 * (entry["scores"]["aggregate"][f"der_{c}"] - summary_or_score(summary, warm, file_set, c))
                for c in ("pyannote", "fluidaudio")}
        cold_runs = cold.get(name, [])
        if cold_runs:
            entry["cold"] = {"first_rttm_s": spread([r["first_rttm_s"] for r in cold_runs]),
                             "wall_s": spread([r["wall_s"] for r in cold_runs]),
                             "rtfx": spread([r["rtfx"] for r in cold_runs])}
            cold_scores = score(file_set, cold_runs[-1]["annotations"])["aggregate"]
            entry["cold"]["der_pyannote"] = cold_scores["der_pyannote"]
            entry["cold"]["der_fluidaudio"] = cold_scores["der_fluidaudio"]
            if cold.get(PEER) and name != PEER:
                entry["cold"]["speedup_vs_senko"] = spread([p["wall_s"] / r["wall_s"]
                                                            for p, r in zip(cold[PEER], cold_runs)])
                entry["cold"]["first_rttm_speedup_vs_senko"] = spread(
                    [p["first_rttm_s"] / r["first_rttm_s"] for p, r in zip(cold[PEER], cold_runs)])
        summary[name] = entry
    return summary


def summary_or_score(summary: dict[str, Any], warm: dict[str, list[dict]], file_set: FileSet, convention: str) -> float:
    if PEER in summary:
        return summary[PEER]["scores"]["aggregate"][f"der_{convention}"]
    return score(file_set, warm[PEER][-1]["annotations"])["aggregate"][f"der_{convention}"]


def _strip(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Rounds without the annotation objects (the JSON keeps numbers)."""
    return {name: [{k: v for k, v in r.items() if k != "annotations"} for r in rs] for name, rs in runs.items()}


def headline_of(results: dict[str, Any]) -> dict[str, Any]:
    headline: dict[str, Any] = {}
    for set_name, summary in results.get("results", {}).items():
        for system, entry in summary.items():
            row = {"warm_rtfx": entry["warm"]["rtfx"]["median"],
                   "der_pyannote_pct": 100 * entry["scores"]["aggregate"]["der_pyannote"],
                   "der_fluidaudio_pct": 100 * entry["scores"]["aggregate"]["der_fluidaudio"]}
            if "speedup_vs_senko" in entry["warm"]:
                row["warm_speedup_vs_senko"] = entry["warm"]["speedup_vs_senko"]["median"]
            if "cold" in entry:
                row["cold_wall_s"] = entry["cold"]["wall_s"]["median"]
                row["cold_first_rttm_s"] = entry["cold"]["first_rttm_s"]["median"]
                row["cold_rtfx"] = entry["cold"]["rtfx"]["median"]
                if "speedup_vs_senko" in entry["cold"]:
                    row["cold_speedup_vs_senko"] = entry["cold"]["speedup_vs_senko"]["median"]
            headline[f"{set_name}.{system}"] = row
    return headline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="test", help="dataset config name (conf/dataset/); default test")
    parser.add_argument("--no-ami", action="store_true", help="leave out the AMI clips (ami_mini)")
    parser.add_argument("--max-files", type=int, default=None, help="first N files of each set (smoke runs)")
    parser.add_argument("--repeats", type=int, default=3, help="warm rounds")
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold rounds (0: none)")
    parser.add_argument("--recommended", default=None, help='space-separated overrides, e.g. "segmentation.step_s=2"')
    parser.add_argument("--no-peer", action="store_true", help="diaropt only (senko not installed)")
    parser.add_argument("--senko-fbank", choices=("auto", "native", "kaldi-native-fbank"), default="auto")
    parser.add_argument("--senko-cold-warmup", choices=("on", "off"), default="on",
                        help="senko's warm-up in its cold runs (on: as its scripts; off: its fastest start)")
    parser.add_argument("--note", action="append", default=[], help="recorded in the results' notes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peer.json")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    quiet()
    start_s = time.perf_counter()
    from long_form import report_preset

    from diaropt.assets import default_cache_dir
    from diaropt.data.annotations import DataError

    if not args.no_peer and args.senko_fbank == "native":  # refuse before minutes of loading, not after
        import senko_runner

        runs, why = senko_runner.native_fbank_status()
        if not runs:
            print(f"error: --senko-fbank native: senko's native fbank library cannot run here: {why} "
                  "(use --senko-fbank auto to substitute kaldi-native-fbank, recorded in the results)", file=sys.stderr)
            return 2

    results: dict[str, Any] = {"benchmark": "peer", **environment(), "notes": list(args.note),
                               "repeats": args.repeats, "cold_repeats": args.cold_repeats}
    print(f"load average at start: {results['load_average_start']}", flush=True)
    wav_root = Path(default_cache_dir()) / "datasets" / "peer_wav16"
    sets = [args.dataset] + ([] if args.no_ami or args.dataset == "ami_mini" else ["ami_mini"])
    try:
        file_sets = {name: load_file_set(name, args.max_files, wav_root) for name in sets}
    except DataError as error:  # e.g. the LibriSpeech source of the synthetic conversations is missing
        print(f"error: dataset {args.dataset!r}: {error}", file=sys.stderr)
        return 2
    results["file_sets"] = {n: {"num_files": len(s.wavs), "duration_s": s.duration_s, "wav_folder": str(wav_root / n),
                                "uris": list(s.wavs)} for n, s in file_sets.items()}
    results["input_audio"] = ("every system reads the same 16 kHz mono 16-bit PCM WAV copies (senko's only input "
                              "format), decoded/resampled once by diaropt.pipeline.audio.load_audio")
    for name, s in file_sets.items():
        print(f"{name}: {len(s.wavs)} files, {s.duration_s / 60:.1f} min", flush=True)

    recommended = (args.recommended.split(), "--recommended") if args.recommended is not None else report_preset()
    systems: dict[str, System] = {"default": diaropt_system("default", [], "defaults")}
    if recommended is not None:
        systems["recommended"] = diaropt_system("recommended", *recommended)
    if not args.no_peer:
        systems[PEER] = senko_system(args.senko_fbank, args.senko_cold_warmup == "on")
        if not systems[PEER].info["fbank_substituted"]:
            import senko_runner

            first = next(iter(next(iter(file_sets.values())).wavs.values()))
            systems[PEER].info["fbank_substitute_parity"] = senko_runner.fbank_parity(systems[PEER].parity, first)
    results["systems"] = {n: s.info for n, s in systems.items()}
    for name, s in systems.items():
        print(f"loaded {name}: {json.dumps({k: v for k, v in s.info.items() if k != 'overrides'}, default=str)}",
              flush=True)

    names = list(systems)
    warm: dict[str, dict[str, list]] = {n: {s: [] for s in names} for n in file_sets}
    cold: dict[str, dict[str, list]] = {n: {s: [] for s in names} for n in file_sets}
    per_set: dict[str, Any] = {}

    def save(status: str) -> None:
        per_set.clear()
        for set_name, file_set in file_sets.items():
            done = {k: v for k, v in warm[set_name].items() if v}
            if done:
                per_set[set_name] = summarize(file_set, done, {k: v for k, v in cold[set_name].items() if v})
        results.update(status=status, results=per_set, load_average_now=load_average(),
                       rounds={n: {"warm": _strip(warm[n]), "cold": _strip(cold[n])} for n in file_sets})
        results["headline"] = headline_of(results)
        write_results("peer", results, args.out, announce=status == "complete")  # partial saves: after each round

    print(f"results, saved after every round: {args.out}", flush=True)
    for r in range(max(args.repeats, args.cold_repeats)):
        order = names[r % len(names):] + names[: r % len(names)]
        for set_name, file_set in file_sets.items():
            if r < args.repeats:
                for name in order:
                    run = warm_pass(systems[name], file_set)
                    warm[set_name][name].append(run)
                    print(f"  warm {set_name} round {r + 1} {name:12s} {run['time_total_s']:7.2f} s  RTFx "
                          f"{run['rtfx']:6.1f}  load {run['load_1min']:.1f}", flush=True)
            if r < args.cold_repeats:
                for name in order:
                    run = cold_pass(systems[name], file_set)
                    cold[set_name][name].append(run)
                    print(f"  cold {set_name} round {r + 1} {name:12s} first RTTM {run['first_rttm_s']:6.2f} s  "
                          f"all {run['wall_s']:7.2f} s  RTFx {run['rtfx']:6.1f}", flush=True)
        save(f"partial: {r + 1} rounds done")
    finish(results, start_s)
    save("complete")
    for key, row in results["headline"].items():
        print(f"{key:28s} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    if not args.no_mlflow:
        log_to_mlflow(args.out.stem, flat_metrics(results["headline"]),
                      {"dataset": args.dataset, "sets": ",".join(file_sets), "repeats": args.repeats,
                       "cold_repeats": args.cold_repeats, "commit": results["commit"],
                       "recommended": " ".join(recommended[0]) if recommended else "-",
                       "senko_fbank": systems[PEER].info["fbank"] if PEER in systems else "-",
                       "notes": " | ".join(results["notes"])[:5000] or "-"}, [args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
