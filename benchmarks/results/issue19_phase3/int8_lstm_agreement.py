"""Powerset agreement of quant=int8_dynamic_lstm's segmentation model with fp32 torch, per AMI clip.

    PYTHONPATH=src python benchmarks/results/issue19_phase3/int8_lstm_agreement.py

Builds the segmentation model in fp32 and int8_dynamic_lstm (``quant_onnx.build_onnx``), runs the
10 s chunks of each annotated AMI clip at the default 1.5 s step through both ONNX Runtime graphs and
fp32 torch, and writes int8_lstm_agreement.json beside this file: per clip, the raw argmax agreement
and the agreement after the best permutation of each chunk's local speakers
(``parity.permutation_invariant_agreement``), and the largest probability change. Source of the
threshold in tests/test_int8_lstm.py.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import soundfile as sf
import torch

from diaropt.assets import fetch
from diaropt.backends.base import TensorSpec
from diaropt.backends.onnxruntime import OnnxRuntimeModel
from diaropt.models.embedding import load_segmentation_model
from diaropt.parity import permutation_invariant_agreement
from diaropt.variants.quant_onnx import build_onnx

CLIPS = ["dev00", "dev01", "trn04", "trn06", "trn09", "tst00", "trn03", "trn05", "trn07", "trn08"]


def main() -> None:
    assets = fetch()
    segmentation = load_segmentation_model()[0]
    inputs, outputs = [TensorSpec("waveforms", (1, 1, 160000))], [TensorSpec("logprobs", (1, 589, 7))]
    example = (torch.zeros(1, 1, 160000),)
    work = Path(tempfile.mkdtemp())
    models = {}
    for mode in ("fp32", "int8_dynamic_lstm"):
        path, info = build_onnx(segmentation, example, inputs, outputs, work / f"{mode}.onnx", mode, probe=False)
        models[mode] = OnnxRuntimeModel(path)
        quantized = info.get("quantized_ops")
    result = {"host": platform.node(), "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
              "load_average_start": os.getloadavg(), "quantized_ops": quantized, "step_s": 1.5, "clips": {}}
    for clip in CLIPS:
        audio, _ = sf.read(assets["ami"] / f"{clip}.wav", dtype="float32")
        chunks = np.stack([audio[s:s + 160000] for s in range(0, len(audio) - 160000 + 1, 24000)])[:, None]
        with torch.inference_mode():
            reference = segmentation(torch.from_numpy(chunks)).numpy()
        frames = reference.shape[0] * reference.shape[1]
        row = {"chunks": int(reference.shape[0])}
        for mode, model in models.items():
            logprobs = model(waveforms=chunks)["logprobs"]
            row[mode] = {"agreement": float((logprobs.argmax(-1) == reference.argmax(-1)).mean()),
                         "agreement_perm": permutation_invariant_agreement(logprobs.argmax(-1),
                                                                          reference.argmax(-1)) / frames,
                         "max_abs_prob_diff": float(np.abs(np.exp(logprobs) - np.exp(reference)).max())}
        result["clips"][clip] = row
        print(clip, row, flush=True)
    result["load_average_end"] = os.getloadavg()
    (Path(__file__).parent / "int8_lstm_agreement.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
