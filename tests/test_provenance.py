"""Timing / numerics source of a job (``diaropt.provenance``)."""

from __future__ import annotations

import pytest

from diaropt.provenance import provenance, without_timings


@pytest.mark.parametrize("backend, quant, macos, timing, numerics", [
    ("torch", "fp32", False, "target", "torch"),
    ("onnxruntime", "fp32", False, "target", "onnxruntime"),
    ("onnxruntime", "fp16", False, "target", "onnxruntime"),
    ("onnxruntime", "int8_dynamic", False, "target", "onnxruntime"),
    ("onnxruntime", "int8", False, "proxy", "onnxruntime"),
    ("onnxruntime", "palettize4", True, "proxy", "onnxruntime"),
    ("coreml", "fp16", False, "not_measured", "coreml_program"),
    ("coreml", "fp16", True, "target", "coreml_runtime"),
])
def test_provenance(backend, quant, macos, timing, numerics):
    source = provenance(backend, quant, macos)
    tags = source.tags()
    assert tags["diaropt.timing_source"] == timing and tags["diaropt.numerics_source"] == numerics
    assert ("diaropt.timing_source_reason" in tags) == (timing != "target")


def test_without_timings_drops_timings_only():
    kept = without_timings({"time_total_s": 1.0, "rtfx": 3.0, "rtfx_min": 2.0, "share_embedding": 0.4,
                            "peak_rss_bytes": 1.0, "der_pyannote": 0.1, "parity_ok": 1.0})
    assert kept == {"der_pyannote": 0.1, "parity_ok": 1.0}
