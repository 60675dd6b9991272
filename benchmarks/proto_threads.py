"""Phase-1 prototype (issue 19): 1 vs 2 intra-op threads per network, and segmentation || embedding with 1 thread each.

Model paths: the fp32 segmentation and tiled-trunk entries of the model cache (edit SEG, EMB); audio: a
16 kHz WAV of >= 4 min. Ratios within one run, 3 interleaved rounds. Not a benchmark of record."""
import time, threading, numpy as np, onnxruntime as ort, soundfile as sf, json, os
SEG = os.path.expanduser("~/.cache/diaropt/models/78872829256f5c76af28f30d/model.onnx")
EMB = os.path.expanduser("~/.cache/diaropt/models/7109f286c4028355336cd266/model.onnx")
a, _ = sf.read("/root/.cache/diaropt/datasets/peer_wav16/synthetic/synthetic_e7bd761c91af_000.wav", dtype="float32")
def sess(p, t):
    o = ort.SessionOptions(); o.intra_op_num_threads = t; o.inter_op_num_threads = 1
    return ort.InferenceSession(p, o, providers=["CPUExecutionProvider"])
S = {(m, t): sess(p, t) for m, p in (("seg", SEG), ("emb", EMB)) for t in (1, 2)}
xs = np.stack([a[i * 16000:i * 16000 + 160000] for i in range(32)])[:, None, :]
xe = np.stack([a[i * 144000:i * 144000 + 160000] for i in range(8)])
def seg(t): [S[("seg", t)].run(None, {"waveforms": xs[i:i + 8]}) for i in range(0, 32, 8)]
def emb(t): [S[("emb", t)].run(None, {"waveforms": xe[i:i + 4]}) for i in range(0, 8, 4)]
def timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t
def concurrent():
    th = threading.Thread(target=seg, args=(1,)); t = time.perf_counter(); th.start(); emb(1); th.join(); return time.perf_counter() - t
seg(2); emb(2); seg(1); emb(1)
R = {k: [] for k in ("seg1", "seg2", "emb1", "emb2", "seq2", "conc11")}
for r in range(3):
    R["seg1"].append(timed(lambda: seg(1))); R["seg2"].append(timed(lambda: seg(2)))
    R["emb1"].append(timed(lambda: emb(1))); R["emb2"].append(timed(lambda: emb(2)))
    R["seq2"].append(R["seg2"][-1] + R["emb2"][-1]); R["conc11"].append(concurrent())
out = {k: float(np.median(v)) for k, v in R.items()}
out["seg_2thread_speedup_per_round"] = [x / y for x, y in zip(R["seg1"], R["seg2"])]
out["emb_2thread_speedup_per_round"] = [x / y for x, y in zip(R["emb1"], R["emb2"])]
out["concurrent_vs_sequential_2threads_per_round"] = [x / y for x, y in zip(R["seq2"], R["conc11"])]
out["load"] = os.getloadavg()
print(json.dumps(out, indent=1))
json.dump(out, open("/tmp/h19/threads_proto.json", "w"), indent=1)
