"""Timing / numerics source of a job (``diaropt.provenance``)."""

from __future__ import annotations

import pytest

from diaropt.provenance import effective_repeats, provenance, without_timings


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


@pytest.mark.parametrize("requested, backend, quant, macos, expected", [
    (None, "onnxruntime", "fp16", False, 3),  # target: timed, 3 passes give a min-max spread
    (None, "onnxruntime", "int8", False, 3),  # proxy: timed too
    (None, "torch", "fp32", False, 3),
    (None, "coreml", "fp16", False, 1),  # not_measured: more passes would repeat the same numerics
    (None, "coreml", "fp16", True, 3),
    (1, "onnxruntime", "fp16", False, 1),  # an explicit repeats=N is kept
    (5, "coreml", "fp16", False, 5),
])
def test_effective_repeats(requested, backend, quant, macos, expected):
    assert effective_repeats(requested, provenance(backend, quant, macos)) == expected


def test_effective_repeats_refuses_less_than_one():
    with pytest.raises(ValueError, match="repeats = 0"):
        effective_repeats(0, provenance("torch", "fp32", False))


def test_repeats_default_is_auto_and_explicit_values_compose():
    from diaropt.config import compose, validate

    assert compose([]).repeats is None
    cfg = compose(["repeats=2"])
    validate(cfg)
    assert cfg.repeats == 2
    with pytest.raises(ValueError, match="repeats"):
        validate(compose(["repeats=0"]))
