"""Issue 19 phase 4, feasibility of ``quant=w8a8`` on ONNX Runtime: the cached fp32 CAM++ trunk
(``waveforms (B, 160000) -> frame_features (B, 512, 499)``) statically quantized by onnxruntime's own
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations), calibrated on 10 s windows of
the AMI dev clips, timed against fp32 in interleaved rounds (2 intra-op threads, ORT_ENABLE_ALL) and
compared on frame features and pooled embeddings.

Usage: PYTHONPATH=src python benchmarks/results/issue19_phase4/w8a8_feasibility.py TRUNK.onnx POOL.onnx OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import soundfile as sf
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from diaropt.assets import asset_path

WINDOW_SAMPLES = 160_000
ROUNDS = 12
HOP_SAMPLES = 32_000  # 2 s: 11 windows per 30 s clip, 22 in all


def windows(names: tuple[str, ...]) -> np.ndarray:
    """(N, 160000) float32 10 s windows of the AMI clips ``names`` at a 2 s hop."""
    out = []
    for name in names:
        audio, rate = sf.read(str(asset_path("ami") / name), dtype="float32")
        assert rate == 16_000
        for start in range(0, len(audio) - WINDOW_SAMPLES + 1, HOP_SAMPLES):
            out.append(audio[start:start + WINDOW_SAMPLES])
    return np.stack(out)


class Reader(CalibrationDataReader):
    def __init__(self, data: np.ndarray) -> None:
        self.rows = iter(data[i:i + 1] for i in range(len(data)))

    def get_next(self):
        row = next(self.rows, None)
        return None if row is None else {"waveforms": row}


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def quantize(src: Path, dst: Path, calib: np.ndarray, variant: dict) -> dict:
    model = onnx.load(str(src))
    exclude = [n.name for n in model.graph.node if n.name.startswith("/fbank/")]
    start = time.perf_counter()
    quantize_static(str(src), str(dst), Reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=variant["activation_type"], weight_type=variant["weight_type"],
                    per_channel=True, reduce_range=variant["reduce_range"],
                    op_types_to_quantize=variant["op_types"], nodes_to_exclude=exclude,
                    calibrate_method=getattr(CalibrationMethod, variant.get("calibrate_method", "MinMax")),
                    extra_options=variant.get("extra_options", {}))
    counts: dict[str, int] = {}
    for node in onnx.load(str(dst)).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"quantize_s": time.perf_counter() - start, "qdq_nodes": counts}


def main() -> None:
    trunk, pool, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    data = windows(("dev00.wav", "dev01.wav"))
    calib, check = data, data  # calibration = the 22 dev windows; accuracy checked on the same + trn windows
    held_out = windows(("trn00.wav",))
    work = Path(tempfile.mkdtemp(prefix="w8a8_"))
    pre = work / "pre.onnx"
    quant_pre_process(str(trunk), str(pre), skip_symbolic_shape=True)
    variants = {
        "u8s8_reduce_range_conv": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                       reduce_range=True, op_types=["Conv"]),
        "u8u8_conv": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                          reduce_range=False, op_types=["Conv"]),
        "s8s8_conv": dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                          reduce_range=False, op_types=["Conv"]),
        "u8s8_reduce_range_conv_percentile": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                                  reduce_range=True, op_types=["Conv"],
                                                  calibrate_method="Percentile"),
        "u8s8_reduce_range_conv_matmul": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                              reduce_range=True, op_types=["Conv", "MatMul"]),
        "u8s8_conv_concat_relu_add": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                          reduce_range=False, op_types=["Conv", "Concat", "Relu", "Add"]),
        "u8s8_conv_percentile": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                     reduce_range=False, op_types=["Conv"], calibrate_method="Percentile"),
        "u8s8_conv": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                          reduce_range=False, op_types=["Conv"]),
    }
    for extra in sys.argv[4:]:
        variants = {k: v for k, v in variants.items() if k in extra.split(",")}
    results: dict = {"calibration": "AMI dev00.wav + dev01.wav, 22 windows of 10 s at a 2 s hop",
                     "check_held_out": "AMI trn00.wav, 11 windows", "threads": 2, "variants": {}}
    fp32 = session(trunk)
    pool_sess = session(pool)
    batch = held_out[:4]
    ref_feats = fp32.run(None, {"waveforms": held_out})[0]
    masks = np.ones((len(held_out), 589, 3), np.float32)
    ref_emb = pool_sess.run(None, {"frame_features": ref_feats, "masks": masks})[0].reshape(len(held_out), 3, -1)
    sessions = {"fp32": fp32}
    for name, variant in variants.items():
        dst = work / f"{name}.onnx"
        info = quantize(pre, dst, calib, variant)
        opt = ort.SessionOptions()
        opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opt.optimized_model_filepath = str(work / f"{name}.opt.onnx")
        ort.InferenceSession(str(dst), opt, providers=["CPUExecutionProvider"])
        ops: dict[str, int] = {}
        for node in onnx.load(opt.optimized_model_filepath).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        info["optimized_ops"] = dict(sorted(ops.items()))
        sess = session(dst)
        feats = sess.run(None, {"waveforms": held_out})[0]
        emb = pool_sess.run(None, {"frame_features": feats, "masks": masks})[0].reshape(len(held_out), 3, -1)
        rel = float(np.linalg.norm(feats - ref_feats) / np.linalg.norm(ref_feats))
        cos = np.sum(emb * ref_emb, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref_emb, axis=-1))
        info.update(frame_features_rel_l2=rel, embedding_cosine_min=float(cos.min()),
                    embedding_cosine_mean=float(cos.mean()), size_bytes=dst.stat().st_size)
        results["variants"][name] = info
        sessions[name] = sess
        print(name, json.dumps(info), flush=True)
    # interleaved timing at batch 4 (10 s tiles)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"waveforms": batch})
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"waveforms": batch})
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    results["timing_batch4_s"] = {k: {"median": med[k], "all": v} for k, v in times.items()}
    results["speedup_vs_fp32"] = {k: med["fp32"] / med[k] for k in med}
    print(json.dumps(results["speedup_vs_fp32"]), json.dumps(med))
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
