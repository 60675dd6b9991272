"""Throughput options of issue 19 phase 2 against the default, interleaved in one process.

    python benchmarks/throughput_options.py [WAV ...] [--rounds 3] [--option NAME=OVERRIDES ...]

Each option is the default configuration plus overrides (default options: ``overlap``
``backend.overlap_stages=true``, ``seg_batch16`` / ``seg_batch32`` ``segmentation.batch_size``,
``no_spin`` ``backend.ort_allow_spinning=false``). All are loaded (warmed up) once; each round runs
every option on every file in a rotated order (load from other processes hits all alike), timing the
pipeline call from the WAV path to the annotation (decoding included). Per round, an option's speedup
is the default's summed time / the option's; reported as median [min, max] over rounds. Each option's
RTTMs and arrays are compared with the default's (``identical``: bit-identical segmentation outputs,
embeddings and RTTM). Peak RSS per option is measured by ``benchmarks/scaling.py``, not here.
Default files: three ``synthetic_dev`` conversations (2.6-3.4 min) and one 30 s AMI clip: a dev set,
so that no default is chosen on the test conversations. Timings depend on the machine's load (the
1-min load average before and after each round is recorded): compare ratios only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, environment, load_configuration, quiet, spread, write_results

DEFAULT_OPTIONS = {"overlap": ["backend.overlap_stages=true"], "seg_batch16": ["segmentation.batch_size=16"],
                   "seg_batch32": ["segmentation.batch_size=32"], "no_spin": ["backend.ort_allow_spinning=false"]}
DEV_FILES = ["syndev04_2spk.wav", "syndev06_4spk.wav", "syndev05_3spk.wav"]


def default_files() -> list[Path]:
    from diaropt.assets import asset_path, default_cache_dir

    dev = sorted(Path(default_cache_dir(), "datasets").glob("syndev_*"))
    files = [dev[0] / name for name in DEV_FILES if dev and (dev[0] / name).is_file()]
    return files + [asset_path("ami") / "dev00.wav"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wavs", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-files", type=int, default=None, help="first N default files (smoke runs)")
    parser.add_argument("--option", action="append", default=[], help="NAME=space-separated overrides")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "throughput_options.json")
    args = parser.parse_args()
    quiet()
    options = {"default": []}
    options.update({o.split("=", 1)[0]: o.split("=", 1)[1].split() for o in args.option} if args.option
                   else DEFAULT_OPTIONS)
    files = (args.wavs or default_files())[: args.max_files]
    import soundfile as sf

    from diaropt.data.annotations import write_rttm
    from diaropt.pipeline.timing import StageTimer

    durations = {str(f): sf.info(str(f)).duration for f in files}
    loaded = {name: load_configuration(name, overrides) for name, overrides in options.items()}
    results = {"benchmark": "throughput_options", **environment(), "files": durations, "options": options,
               "rounds": []}
    reference: dict[str, dict] = {}
    identical = {name: True for name in options}
    names = list(options)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        round_result = {"order": order, "load_before": os.getloadavg(), "seconds": {}, "stages": {}}
        for name in order:
            pipeline = loaded[name].pipeline
            total, stages = 0.0, {}
            for f in files:
                timer = StageTimer(pipeline.sync)
                start = time.perf_counter()
                output = pipeline(f, f.stem, keep_arrays=True, timer=timer)
                total += time.perf_counter() - start
                for key, value in timer.seconds.items():
                    stages[key] = stages.get(key, 0.0) + value
                rttm = Path("/tmp") / f"throughput-{os.getpid()}-{name}-{f.stem}.rttm"
                write_rttm(output.annotation, rttm, uri=f.stem)
                check = {"rttm": rttm.read_text(), **{k: output.arrays[k] for k in
                                                     ("logprobs", "segmentations", "embeddings", "hard_clusters")}}
                rttm.unlink()
                if name == "default":
                    reference.setdefault(str(f), check)
                elif str(f) in reference:
                    ref = reference[str(f)]
                    same = ref["rttm"] == check["rttm"] and all(
                        np.array_equal(ref[k], check[k], equal_nan=True) for k in check if k != "rttm")
                    identical[name] = identical[name] and same
            round_result["seconds"][name] = total
            round_result["stages"][name] = stages
        round_result["load_after"] = os.getloadavg()
        results["rounds"].append(round_result)
        write_results("throughput_options", results, args.out)  # rounds so far (a cut-off run keeps them)
        print(f"round {r + 1}: " + "  ".join(f"{n} {round_result['seconds'][n]:.1f}s" for n in names)
              + f"  load {round_result['load_before'][0]:.1f}->{round_result['load_after'][0]:.1f}", flush=True)
    audio_s = sum(durations.values())
    summary = {}
    for name in names:
        seconds = [rr["seconds"][name] for rr in results["rounds"]]
        summary[name] = {"rtfx": spread([audio_s / s for s in seconds]),
                         "speedup_vs_default": spread([rr["seconds"]["default"] / rr["seconds"][name]
                                                       for rr in results["rounds"]]),
                         "identical_to_default": identical[name] if name != "default" else None}
    results["summary"] = summary
    results["load_average_end"] = os.getloadavg()
    for name, s in summary.items():
        print(f"{name:12s} speedup {s['speedup_vs_default']['median']:.2f} [{s['speedup_vs_default']['min']:.2f}, "
              f"{s['speedup_vs_default']['max']:.2f}]  rtfx {s['rtfx']['median']:.1f}  identical {s['identical_to_default']}")
    write_results("throughput_options", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
