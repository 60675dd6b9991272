"""Interleaved model-level timing of ONNX graphs on one (B, 160000) batch of AMI trn00 audio (2 intra-op
threads, ORT_ENABLE_ALL): median and min seconds per call and speedup vs the first graph.

Usage: python w8a8_timing.py ROUNDS BATCH NAME=PATH [NAME=PATH ...]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime as ort
import soundfile as sf

from diaropt.assets import asset_path


def main() -> None:
    rounds, batch = int(sys.argv[1]), int(sys.argv[2])
    graphs = dict(arg.split("=", 1) for arg in sys.argv[3:])
    audio, _ = sf.read(str(asset_path("ami") / "trn00.wav"), dtype="float32")
    rows = np.stack([audio[i * 32000:i * 32000 + 160000] for i in range(batch)])
    sessions, outputs = {}, {}
    for name, path in graphs.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        rank = len(sessions[name].get_inputs()[0].shape)
        feed = {"waveforms": rows.reshape(batch, *([1] * (rank - 2)), -1)}
        outputs[name] = sessions[name].run(None, feed)[0]
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    first = next(iter(times))
    errors = {k: {"rel_l2_vs_first": float(np.linalg.norm(v - outputs[first]) / np.linalg.norm(outputs[first])),
                  "max_abs_vs_first": float(np.abs(v - outputs[first]).max()),
                  "argmax_agreement_last_axis": float((v.argmax(-1) == outputs[first].argmax(-1)).mean())}
              for k, v in outputs.items()}
    out = {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
               "speedup_median": float(np.median(times[first]) / np.median(v)),
               "speedup_min": float(np.min(times[first]) / np.min(v))} for k, v in times.items()}
    # paired per-round ratios (same round, adjacent calls): robust to load drifting between rounds
    for k in times:
        out[k]["speedup_paired_median"] = float(np.median(np.array(times[first]) / np.array(times[k])))
    print(json.dumps({"rounds": rounds, "batch": batch, "results": out, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
