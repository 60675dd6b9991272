"""Which CAM++ trunk convolutions to keep fp32 under w8a8 (issue 19 phase 4, after the dev sweep
flagged parity: min embedding cosine 0.888). U8S8 QDQ (the mode's options), excluding the fbank plus
the named node-name parts; accuracy on 11 AMI trn00 windows with *short* masks (each slot active on
one random stretch of 15 to 60 of the 589 frames, seed 0) as well as full ones, since the parity
minimum comes from (chunk, speaker) pairs with little speech.

Usage: PYTHONPATH=src python w8a8_exclusions.py TRUNK.onnx POOL.onnx OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).parent))
from w8a8_feasibility import Reader, session, windows  # noqa: E402

EXCLUSIONS = {"fbank_only": (), "head_conv1": ("/head/conv1/",), "head": ("/head/",),
              "cam_mask_branch": ("/cam_layer/linear1/", "/cam_layer/linear2/"), "transit3": ("/transit3/",)}


def main() -> None:
    trunk, pool, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    calib, held = windows(("dev00.wav", "dev01.wav")), windows(("trn00.wav",))
    work = Path(tempfile.mkdtemp(prefix="w8a8x_"))
    pre = work / "pre.onnx"
    quant_pre_process(str(trunk), str(pre), skip_symbolic_shape=True)
    names = [n.name for n in onnx.load(str(pre)).graph.node]
    rng = np.random.default_rng(0)
    short = np.zeros((len(held), 589, 3), np.float32)
    for b in range(len(held)):
        for s in range(3):
            length = rng.integers(15, 61)
            start = rng.integers(0, 589 - length)
            short[b, start:start + length, s] = 1
    full = np.ones_like(short)
    fp32, pool_sess = session(trunk), session(pool)
    ref = fp32.run(None, {"waveforms": held})[0]
    ref_emb = {k: pool_sess.run(None, {"frame_features": ref, "masks": m})[0] for k, m in (("full", full), ("short", short))}
    results = {}
    for name, parts in EXCLUSIONS.items():
        exclude = [n for n in names if any(p in n for p in ("/fbank/", *parts))]
        dst = work / f"{name}.onnx"
        quantize_static(str(pre), str(dst), Reader(calib), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=False, op_types_to_quantize=["Conv"], nodes_to_exclude=exclude)
        feats = session(dst).run(None, {"waveforms": held})[0]
        r = {"excluded_nodes": len(exclude),
             "frame_features_rel_l2": float(np.linalg.norm(feats - ref) / np.linalg.norm(ref))}
        for k, m in (("full", full), ("short", short)):
            e = pool_sess.run(None, {"frame_features": feats, "masks": m})[0]
            cos = np.sum(e * ref_emb[k], -1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(ref_emb[k], axis=-1))
            r[f"cos_{k}_min"], r[f"cos_{k}_mean"] = float(cos.min()), float(cos.mean())
        results[name] = r
        print(name, json.dumps(r), flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
