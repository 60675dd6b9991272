"""Peak RSS of the default configuration per ``segmentation.batch_size`` (issue 19 phase 2).

    python benchmarks/batch_rss.py [WAV] [--batch-sizes 8 16 32] [--override KEY=VALUE ...]

Each batch size runs in a fresh process (so one run's arena does not raise the next one's peak):
load the configuration (warm-up included), diarize the file once, report the process's peak RSS
(``ru_maxrss``) and its RSS after loading. ONNX Runtime's CPU arena keeps a session's largest
activations, which grow with the batch, not with the recording; ``benchmarks/scaling.py`` measures
the growth with the recording's length. Default file: the longest ``synthetic_dev`` conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS_DIR, environment, write_results

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from common import load_configuration, quiet
quiet()
loaded = load_configuration("rss", sys.argv[3:])
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
output = loaded.pipeline(sys.argv[2], "rss")
print("BATCH_RSS " + json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 "peak_rss_after_load_bytes": after_load, "audio_duration_s": output.audio_duration_s,
                                 "num_chunks": output.num_chunks}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", nargs="?", type=Path, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "batch_rss.json")
    args = parser.parse_args()
    wav = args.wav
    if wav is None:
        from diaropt.assets import default_cache_dir

        import soundfile as sf

        candidates = sorted(Path(default_cache_dir(), "datasets").glob("syndev_*/*.wav"))
        wav = max(candidates, key=lambda p: sf.info(str(p)).duration)
    runs = {}
    for batch in args.batch_sizes:
        done = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(wav),
                               f"segmentation.batch_size={batch}", *args.override], capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("BATCH_RSS ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"batch {batch} failed: {done.stderr[-2000:]}")
        runs[batch] = json.loads(line.split(" ", 1)[1])
        print(f"segmentation.batch_size={batch}: peak RSS {runs[batch]['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"(after load {runs[batch]['peak_rss_after_load_bytes'] / 2**20:.0f} MiB)", flush=True)
    write_results("batch_rss", {"benchmark": "batch_rss", **environment(), "audio": str(wav),
                                "overrides": args.override, "runs": runs, "load_average_end": os.getloadavg()},
                  args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
