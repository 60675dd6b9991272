"""Phase-1 prototype (issue 19): segmentation-model ONNX Runtime options, interleaved ratios in one process.

    python benchmarks/proto_segmentation_ort.py AUDIO.wav   (16 kHz mono; >= 74 s; results in /tmp/h19/ort)

int8 dynamic quantization variants (onnxruntime.quantization.quantize_dynamic), batch sizes, thread count,
spinning, and session creation with a cached optimized model; powerset agreement vs fp32 on 8 chunks.
The model path is the fp32 segmentation entry of the model cache (edit SEG). Not a benchmark of record."""
import json, os, sys, time
import numpy as np, onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, QuantType
SEG = os.path.expanduser("~/.cache/diaropt/models/78872829256f5c76af28f30d/model.onnx")
W = "/tmp/h19/ort"
os.makedirs(W, exist_ok=True)
variants = {"int8_all": ["Conv", "MatMul", "Gemm", "LSTM"], "int8_lstm": ["LSTM"], "int8_lstm_gemm": ["LSTM", "MatMul", "Gemm"]}
for name, ops in variants.items():
    out = f"{W}/seg_{name}.onnx"
    if not os.path.exists(out):
        quantize_dynamic(SEG, out, op_types_to_quantize=ops, weight_type=QuantType.QInt8)
rng = np.random.default_rng(0)
import soundfile as sf
audio, _ = sf.read(sys.argv[1], dtype="float32")
def chunks(n):
    starts = np.arange(n) * 16000
    return np.stack([audio[s:s + 160000] for s in starts])[:, None, :]
inp = ort.InferenceSession(SEG).get_inputs()[0].name
def session(path, threads=0, spin=True, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, opt_out=None):
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    o.graph_optimization_level = level
    if not spin: o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if opt_out: o.optimized_model_filepath = opt_out
    t = time.perf_counter(); s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"]); return s, time.perf_counter() - t
configs = {
  "fp32_b8": (SEG, 8, {}), "fp32_b32": (SEG, 32, {}), "fp32_b1": (SEG, 1, {}),
  "fp32_b8_nospin": (SEG, 8, {"spin": False}), "fp32_b8_1thread": (SEG, 8, {"threads": 1}),
  "int8_all_b8": (f"{W}/seg_int8_all.onnx", 8, {}), "int8_lstm_b8": (f"{W}/seg_int8_lstm.onnx", 8, {}),
  "int8_lstm_gemm_b8": (f"{W}/seg_int8_lstm_gemm.onnx", 8, {}), "int8_lstm_b32": (f"{W}/seg_int8_lstm.onnx", 32, {}),
}
sessions = {k: session(p, **kw) for k, (p, b, kw) in configs.items()}
create = {k: v[1] for k, v in sessions.items()}
N = 64
x = chunks(N).astype(np.float32)
ref = sessions["fp32_b8"][0].run(None, {inp: x[:8]})[0]
results = {k: [] for k in configs}
for r in range(3):
    names = list(configs); names = names[r % len(names):] + names[:r % len(names)]
    for k in names:
        s = sessions[k][0]; b = configs[k][1]
        t = time.perf_counter()
        outs = [s.run(None, {inp: x[i:i + b]})[0] for i in range(0, N, b)]
        results[k].append(time.perf_counter() - t)
out = {}
for k in configs:
    s = sessions[k][0]
    y = s.run(None, {inp: x[:8]})[0] if configs[k][1] >= 8 else np.concatenate([s.run(None, {inp: x[i:i+1]})[0] for i in range(8)])
    agree = float((y.argmax(-1) == ref.argmax(-1)).mean())
    per_round = [results["fp32_b8"][i] / results[k][i] for i in range(3)]
    out[k] = {"s_per_64_chunks_median": float(np.median(results[k])), "speedup_vs_fp32_b8_per_round": per_round,
              "powerset_agreement_vs_fp32": agree, "max_abs_logprob_diff": float(np.abs(y - ref).max()), "session_create_s": create[k]}
    print(f"{k:20s} {np.median(results[k]):6.2f} s  speedup {np.median(per_round):.2f} [{min(per_round):.2f},{max(per_round):.2f}]  agree {agree:.4f}  create {create[k]:.2f} s", flush=True)
# session creation with a cached optimized model
s, t_full = session(SEG, opt_out=f"{W}/seg_opt.onnx")
s2, t_cached = session(f"{W}/seg_opt.onnx", level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
s3, t_full2 = session(SEG)
out["_session_create"] = {"all_opt_s": [t_full, t_full2], "from_optimized_file_no_opt_s": t_cached}
print(out["_session_create"])
out["_load"] = os.getloadavg()
json.dump(out, open(f"{W}/ort_proto.json", "w"), indent=1)
