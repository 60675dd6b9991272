"""Slow accuracy regression: the default configuration's DER on the ``test`` set is pinned.

The value was measured with the default configuration (ONNX Runtime CPU, fp32, ``segmentation.step_s=1.5``,
``clustering=vbx`` with Fa = 0.1 x 1.5) on ``dataset=test`` (ami_test + synthetic_test) by the array-cache fill of
``experiments/recluster.py`` (benchmarks/results/clustering/test.json: 0.15052837054). The pipeline is
deterministic: two runs that computed the networks independently (that cache fill and a fresh run of this test,
0.150528371) gave the same DER to every printed digit (spread 0; the same held at the former step 1.0), so the
tolerance is only the pin's rounding. On
another host, ONNX Runtime / BLAS summation order may flip a few frames: if this test then fails by a
hair, measure that host's run-to-run spread before widening it. Never tune anything on ``test``: re-pin only after a
change chosen on ``dev``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LIBRISPEECH = Path("/work/shared/data/librispeech_test-other")
#: DER (pyannote convention: collar 0, overlap scored) of the default configuration on dataset=test
PINNED_TEST_DER = 0.150528
#: run-to-run spread measured on the pinning host: two independent runs gave 0.15052837054 and 0.150528371 (this
#: test), i.e. no variation; the tolerance is the pinned value's rounding (1e-6) with margin
TOLERANCE = 1e-5


def test_default_configuration_test_set_der_is_pinned(tmp_path: Path) -> None:
    import os

    from diaropt.config import compose
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import dataset_from_config, load_pipeline, run_dataset
    from diaropt.variants.build import build_models

    source = Path(os.environ.get("DIAROPT_SYNTHETIC_SOURCE", LIBRISPEECH))
    if not source.is_dir():
        pytest.skip(f"{source} (LibriSpeech readers of the synthetic test conversations) not on this machine")
    cfg = compose(["dataset=test", f"dataset.source_dir={source}", "cache_arrays=false", "parity.enabled=false",
                   "tracking.enabled=false"])
    try:
        built = build_models(cfg)
        timer = StageTimer()
        pipeline = load_pipeline(cfg, built, timer)
        dataset = dataset_from_config(cfg)
    except Exception as error:
        if "asset" in type(error).__name__.lower() or "BackendUnavailable" in type(error).__name__:
            pytest.skip(f"cannot run the default configuration here: {error}")
        raise
    result = run_dataset(pipeline, dataset, None, timer, show_progress=False)
    der = result.aggregate["der_pyannote"]
    print(f"test DER {der:.9f}")
    assert der == pytest.approx(PINNED_TEST_DER, abs=TOLERANCE)
