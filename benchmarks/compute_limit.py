"""Compute limit: FLOPs per audio second of each network stage vs this machine's matmul throughput.

    python benchmarks/compute_limit.py [--length-min 5] [--config "quant=int8 ..."]

1. FLOPs of one segmentation chunk and one per-pair embedding (a batch of ``--embedding-batch``
   divided by its size) on the fp32 torch models, with ``torch.utils.flop_counter.FlopCounterMode``
   (matmuls and convolutions; LSTMs, which it does not see, are added analytically: 2 * T * (|W_ih| +
   |W_hh|) per layer and direction). The embedding model includes the configured fbank front end.
2. The FLOPs the configuration really spends on a real file (the AMI long form of ``--length-min``):
   the same configuration on the fp32 torch backend diarizes it under the counter, so the embedding
   stage's count follows what it runs (per pair, once per chunk with ``embedding.shared_trunk``, per
   tile with ``embedding.tiled_trunk``, anchors only with ``embedding.anchor_every``); segmentation
   is chunks x the per-chunk count. The configured backend then diarizes it, and its measured stage
   times give achieved FLOP/s = stage FLOPs / stage time. With ``segmentation.sinc_shared`` the
   sinc convolution's FLOPs are counted per front row the run computed, not per chunk.
3. Attainable fp32 matmul throughput measured in the same run: ``torch.mm`` and an ONNX Runtime
   ``MatMul`` graph, square sizes 256-2048, best of N, default thread counts.
Writes ``benchmarks/results/compute_limit.json`` and one MLflow run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, environment, finish, flat_metrics, load_configuration, log_to_mlflow, quiet, write_results

from diaropt.models.constants import CHUNK_SAMPLES
from diaropt.variants.build import _value

MATMUL_SIZES = (256, 512, 1024, 2048)


def lstm_flops(module: torch.nn.Module, num_steps: int) -> int:
    """Matmul FLOPs of every ``nn.LSTM``/``nn.GRU`` in ``module`` over ``num_steps`` time steps."""
    total = 0
    for rnn in module.modules():
        if isinstance(rnn, (torch.nn.LSTM, torch.nn.GRU)):
            for name, weight in rnn.named_parameters():
                if name.startswith(("weight_ih", "weight_hh")):
                    total += 2 * num_steps * weight.numel()
    return total


def network_flops(frame_extraction: str, embedding_name: str, embedding_batch: int) -> dict[str, Any]:
    """FLOPs of one segmentation chunk and of one embedding, with the counter's per-op breakdown."""
    from torch.utils.flop_counter import FlopCounterMode

    from diaropt.models.embedding import load_embedding_model, load_segmentation_model
    from diaropt.variants.fusion import CHUNK_SAMPLES, NUM_FRAMES

    segmentation, _ = load_segmentation_model()
    embedding, _ = load_embedding_model(embedding_name, frame_extraction=frame_extraction)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        segmentation(torch.zeros(1, 1, CHUNK_SAMPLES))
    seg_counted = counter.get_total_flops()
    seg_ops = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    seg_lstm = lstm_flops(segmentation, NUM_FRAMES)
    waveforms = 0.1 * torch.randn(embedding_batch, CHUNK_SAMPLES, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        embedding(waveforms, torch.ones(embedding_batch, NUM_FRAMES))
    emb_ops = {str(k): int(v) / embedding_batch for k, v in counter.get_flop_counts()["Global"].items()}
    return {"segmentation_per_chunk": seg_counted + seg_lstm, "segmentation_counted_per_chunk": seg_counted,
            "segmentation_breakdown": {**seg_ops, "lstm (analytic)": seg_lstm},
            "embedding_per_item": counter.get_total_flops() / embedding_batch,  # CAM++/ResNet: no recurrent layers
            "embedding_breakdown": emb_ops, "embedding_batch_counted": embedding_batch}


def counted_run_flops(overrides: list[str], dataset: Any, segmentation_per_chunk: float,
                      segmentation_counted_per_chunk: float) -> dict[str, Any]:
    """FLOPs per stage of diarizing ``dataset``'s file with ``overrides`` on the fp32 torch backend,
    counted as run: everything the counter sees, minus the segmentation chunks' counted share, is the
    embedding stage's; segmentation is ``chunks * segmentation_per_chunk`` (LSTM included)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diaropt.runner import run_dataset

    loaded = load_configuration("counted", [*overrides, "backend=torch", "compute_unit=cpu_only", "quant=fp32"])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        result = run_dataset(loaded.pipeline, dataset, None, loaded.compile_timer, repeats=1, show_progress=False)
    row = result.rows[0]
    embedding = counter.get_total_flops() - row["num_chunks"] * segmentation_counted_per_chunk
    return {"segmentation": row["num_chunks"] * segmentation_per_chunk, "embedding": embedding,
            "num_chunks": row["num_chunks"], "num_embedded": row["num_embedded"]}


def best_time_s(fn: Any, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up (best-of catches the moments a core is free)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_throughput(repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` fp32 GFLOP/s of square matmuls, torch and ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    results: dict[str, Any] = {"torch": {}, "onnxruntime": {}, "torch_threads": torch.get_num_threads()}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in MATMUL_SIZES:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            flops = 2.0 * n ** 3
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            with torch.inference_mode():
                results["torch"][n] = flops / best_time_s(lambda: torch.mm(ta, tb), repeats) / 1e9
            graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                                      [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                                       helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
            path = Path(tmp) / f"matmul_{n}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
            options = ort.SessionOptions()
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feeds = {"a": a, "b": b}
            results["onnxruntime"][n] = flops / best_time_s(lambda: session.run(None, feeds), repeats) / 1e9
    results["peak_gflops"] = max(max(results["torch"].values()), max(results["onnxruntime"].values()))
    results["peak_gflops_onnxruntime"] = max(results["onnxruntime"].values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length-min", type=float, default=5.0)
    parser.add_argument("--config", default="", help="space-separated overrides (default: the default config)")
    parser.add_argument("--embedding-batch", type=int, default=8)
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "compute_limit.json")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    quiet()
    start_s = time.perf_counter()
    from diaropt.assets import default_cache_dir
    from diaropt.data.long_form import load_ami_long_form
    from diaropt.runner import run_dataset

    results: dict[str, Any] = {"benchmark": "compute_limit", **environment(), "overrides": args.config.split()}
    print(f"load average at start: {results['load_average_start']}", flush=True)
    loaded = load_configuration("measured", args.config.split())
    cfg = loaded.cfg
    flops = network_flops(str(_value(cfg.frame_extraction.mode)), str(_value(cfg.embedding.name)),
                          args.embedding_batch)
    print(f"FLOPs: segmentation {flops['segmentation_per_chunk'] / 1e9:.2f} GFLOP/chunk, "
          f"embedding {flops['embedding_per_item'] / 1e9:.2f} GFLOP/embedding", flush=True)

    peak_before = matmul_throughput(args.matmul_repeats)
    dataset, _ = load_ami_long_form(60 * args.length_min, Path(default_cache_dir()) / "datasets")
    from diaropt.pipeline.segmentation import SINC_BLOCK_FRAMES, SINC_FILTERS, SINC_TAPS, SharedSinc, sinc_conv_frames

    split = loaded.pipeline.segmentation_model if isinstance(loaded.pipeline.segmentation_model, SharedSinc) else None
    blocks_before = split.blocks_computed if split is not None else 0
    cpu_start_s, wall_start_s = time.process_time(), time.perf_counter()
    result = run_dataset(loaded.pipeline, dataset, None, loaded.compile_timer, repeats=1, show_progress=False)
    cpu_s, wall_s = time.process_time() - cpu_start_s, time.perf_counter() - wall_start_s
    peak_after = matmul_throughput(args.matmul_repeats)
    row, aggregate = result.rows[0], result.aggregate
    print("counting the FLOPs the configuration spends on the file (fp32 torch backend)", flush=True)
    counted = counted_run_flops(args.config.split(), dataset, flops["segmentation_per_chunk"],
                                flops["segmentation_counted_per_chunk"])
    if (counted["num_chunks"], counted["num_embedded"]) != (row["num_chunks"], row["num_embedded"]):
        print(f"note: the torch run embedded {counted['num_embedded']} speakers in {counted['num_chunks']} chunks, "
              f"the measured backend {row['num_embedded']} in {row['num_chunks']}", flush=True)
    duration_s = row["audio_duration_s"]
    if split is not None:  # segmentation.sinc_shared: the sinc convolution ran once per front row, not per chunk
        chunk_conv = 2 * SINC_FILTERS * SINC_TAPS * sinc_conv_frames(CHUNK_SAMPLES)
        rows = split.blocks_computed - blocks_before
        row_conv = 2 * SINC_FILTERS * SINC_TAPS * SINC_BLOCK_FRAMES
        counted["sinc_shared"] = {"front_rows": rows, "sinc_conv_flops_per_chunk": chunk_conv,
                                  "sinc_conv_flops_per_row": row_conv}
        counted["segmentation"] += rows * row_conv - row["num_chunks"] * chunk_conv
        print(f"sinc_shared: {rows} front rows instead of the sinc convolution in {row['num_chunks']} chunks",
              flush=True)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])
    stages: dict[str, Any] = {}
    for stage, count in (("segmentation", row["num_chunks"]), ("embedding", row["num_embedded"])):
        total = counted[stage]
        seconds = aggregate[f"time_{stage}_s"]
        achieved = total / seconds / 1e9
        stages[stage] = {"items": count, "items_per_audio_s": count / duration_s,
                         "gflop_per_item": total / max(count, 1) / 1e9,
                         "gflop_per_audio_s": total / duration_s / 1e9, "gflop_total": total / 1e9,
                         "time_s": seconds, "achieved_gflops": achieved,
                         "fraction_of_peak": achieved / peak,
                         "fraction_of_onnxruntime_peak": achieved / max(peak_before["peak_gflops_onnxruntime"],
                                                                         peak_after["peak_gflops_onnxruntime"]),
                         "rtfx_bound_at_peak": peak * 1e9 / (total / duration_s)}
        print(f"{stage:12s} {stages[stage]['gflop_per_audio_s']:6.2f} GFLOP per audio s, achieved "
              f"{achieved:6.1f} GFLOP/s = {100 * stages[stage]['fraction_of_peak']:.1f} % of the measured peak "
              f"{peak:.0f} GFLOP/s", flush=True)
    network_gflop_per_s = sum(s["gflop_per_audio_s"] for s in stages.values())
    # On a shared machine the wall-clock stage times include waiting for a core; FLOPs per CPU-second
    # (all threads, spinning included) against the per-thread peak is the contention-robust view.
    threads = max(1, peak_before["torch_threads"])
    total_network_gflop = sum(s["gflop_total"] for s in stages.values())
    cpu_view = {"process_cpu_s": cpu_s, "wall_s": wall_s, "cpu_utilisation": cpu_s / wall_s,
                "network_gflop_per_cpu_s": total_network_gflop / cpu_s, "peak_gflops_per_thread": peak / threads,
                "fraction_of_per_thread_peak": total_network_gflop / cpu_s / (peak / threads)}
    results["cpu_time_view"] = cpu_view
    print(f"CPU-time view: {cpu_s:.0f} CPU-s over {wall_s:.0f} s wall; {cpu_view['network_gflop_per_cpu_s']:.1f} GFLOP "
          f"per CPU-s = {100 * cpu_view['fraction_of_per_thread_peak']:.1f} % of the per-thread peak", flush=True)
    results.update({"flops": flops, "counted_run": counted, "matmul_gflops_before": peak_before,
                    "matmul_gflops_after": peak_after,
                    "peak_gflops": peak, "recording": {"uri": row["uri"], "duration_s": duration_s},
                    "measured": {k: aggregate[k] for k in aggregate if k.startswith(("time_", "rtfx", "der_"))},
                    "stages": stages, "networks_gflop_per_audio_s": network_gflop_per_s,
                    "rtfx_bound_networks_at_peak": peak / network_gflop_per_s,
                    "backend": loaded.built.backend})
    finish(results, start_s)
    print(f"networks: {network_gflop_per_s:.1f} GFLOP per audio second -> RTFx bound at the matmul peak: "
          f"{results['rtfx_bound_networks_at_peak']:.0f} (measured RTFx {aggregate['rtfx']:.1f})", flush=True)
    path = write_results("compute_limit", results, args.out)
    if not args.no_mlflow:
        log_to_mlflow("compute_limit", flat_metrics({"stages": stages, "peak_gflops": peak,
                                                     "rtfx_bound_networks_at_peak": results["rtfx_bound_networks_at_peak"],
                                                     "rtfx": aggregate["rtfx"], "cpu_time_view": cpu_view}),
                      {"overrides": args.config or "default", "commit": results["commit"]}, [path])


if __name__ == "__main__":
    main()
