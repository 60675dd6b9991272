"""Where a job's numbers come from: the one place that decides its timing and numerics sources.

Every job is tagged with

- ``diaropt.timing_source``: ``target`` (the configuration's own engine timed it), ``proxy`` (another
  engine stood in for it) or ``not_measured`` (no execution timing is logged), plus
  ``diaropt.timing_source_reason`` when not ``target``;
- ``diaropt.numerics_source``: which engine computed the outputs the DER and parity come from:
  ``coreml_runtime`` (Apple's Core ML on macOS), ``coreml_program`` (``backends.coreml_program``, the
  project's ML-program executor, any OS), ``onnxruntime`` or ``torch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TIMING_TAG = "diaropt.timing_source"
TIMING_REASON_TAG = "diaropt.timing_source_reason"
NUMERICS_TAG = "diaropt.numerics_source"

#: Metric names that are execution timings (or the executing process's memory), dropped from a job
#: whose timing source is ``not_measured``.
TIMING_PREFIXES = ("time_", "share_", "rtfx", "peak_rss")

NOT_MEASURED_REASON = ("Core ML execution needs macOS: the outputs come from diaropt's ML-program executor "
                       "(torch CPU kernels rounding every tensor to the program's dtypes), which is not Apple's "
                       "runtime, so no execution timing is logged")


@dataclass(frozen=True)
class Provenance:
    timing_source: str  # target | proxy | not_measured
    numerics_source: str  # coreml_runtime | coreml_program | onnxruntime | torch
    reason: str | None = None  # why timing_source is not target

    def tags(self) -> dict[str, str]:
        tags = {TIMING_TAG: self.timing_source, NUMERICS_TAG: self.numerics_source}
        if self.reason:
            tags[TIMING_REASON_TAG] = self.reason
        return tags

    @property
    def logs_timings(self) -> bool:
        return self.timing_source != "not_measured"


def provenance(backend: str, quant_mode: str, macos: bool) -> Provenance:
    """The timing and numerics sources of a job from its resolved backend, quant mode and host.

    torch -> target / torch; ONNX Runtime's own variants (fp32, fp16, fp16_selective,
    int8_dynamic, int8_dynamic_lstm) -> target / onnxruntime; ONNX Runtime standing in for a Core ML weight compression
    (int8, int4, palettize*: the Core ML weights read back, computed in fp32) -> proxy / onnxruntime;
    Core ML on macOS -> target / coreml_runtime, elsewhere -> not_measured / coreml_program.

    Raises:
        ValueError: an unknown backend.
    """
    if backend == "torch":
        return Provenance("target", "torch")
    if backend == "onnxruntime":
        from diaropt.variants.quant import ONNX_QUANT

        spec = ONNX_QUANT.get(quant_mode)
        if spec is not None and spec.kind == "faithful_coreml":
            return Provenance("proxy", "onnxruntime",
                              f"quant={quant_mode} is a Core ML weight compression: ONNX Runtime runs its "
                              "dequantized weights in fp32, so timings and activations are ONNX Runtime's, "
                              "not Core ML's")
        return Provenance("target", "onnxruntime")
    if backend == "coreml":
        if macos:
            return Provenance("target", "coreml_runtime")
        return Provenance("not_measured", "coreml_program", NOT_MEASURED_REASON)
    raise ValueError(f"unknown backend {backend!r}")


#: Timed passes over the dataset when ``repeats`` is null and the job's timings are measured: enough for
#: a min-max spread, so a speed difference inside run-to-run noise is not taken for a win (issue 16).
TIMED_REPEATS = 3


def effective_repeats(requested: int | None, source: Provenance) -> int:
    """Passes over the dataset for a job: ``requested`` if set (``repeats=N``), else
    :data:`TIMED_REPEATS` when the job's timings are measured (``target`` or ``proxy``) and 1 when
    they are not (``not_measured``: extra passes would only repeat identical numerics).

    Raises:
        ValueError: ``requested`` < 1.
    """
    if requested is None:
        return TIMED_REPEATS if source.logs_timings else 1
    if int(requested) < 1:
        raise ValueError(f"repeats = {requested}: must be >= 1")
    return int(requested)


def is_timing(metric: str) -> bool:
    return metric.startswith(TIMING_PREFIXES)


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without execution timings (``TIMING_PREFIXES``)."""
    return {key: value for key, value in metrics.items() if not is_timing(key)}
