"""Names shared by the pipeline's timer, the sweep, the MLflow layer, parity and the report, defined once.

Stage names become metric keys ``time_<stage>_s`` (:func:`time_metric`); tag names are MLflow run
tags; metric names are MLflow metric keys. Nothing here imports another diaropt module, so any
module may import it without a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

# --- stages (pipeline order; diaropt.pipeline.timing times them) ------------------------------------

#: The design note's categories, in pipeline order. "audio" (decode + resample) and "preprocessing"
#: (masks, clean frames) are timed separately rather than hidden in a neighbour.
STAGES = ("compile", "audio", "segmentation", "preprocessing", "embedding", "clustering", "postprocess")
#: Order of the ``time_<stage>_s`` metrics in plots: the model build first, then ``STAGES``.
STAGE_ORDER = ("build", *STAGES)
WARMUP_STAGE = "warmup"


def time_metric(stage: str) -> str:
    """The metric key of a stage's seconds: ``time_<stage>_s``."""
    return f"time_{stage}_s"


def stage_of(metric: str) -> str | None:
    """The stage of a ``time_<stage>_s`` key (None for other keys and ``time_total_s``)."""
    if metric.startswith("time_") and metric.endswith("_s") and metric != TIME_TOTAL:
        return metric.removeprefix("time_").removesuffix("_s")
    return None


# --- metrics ---------------------------------------------------------------------------------------

DER_METRIC = "der_pyannote"  # a fraction, pyannote's convention (collar 0, overlap scored)
DER_PCT_METRIC = "der_pyannote_pct"  # the same DER in percent, for the MLflow UI's columns
DER_FLUIDAUDIO_METRIC = "der_fluidaudio"
RTFX_METRIC = "rtfx"
TIME_TOTAL = "time_total_s"
TIME_BUILD = time_metric("build")
PEAK_RSS = "peak_rss_bytes"
PARITY_OK = "parity_ok"
#: The parity metrics the report shows (diaropt.parity logs these and a few more).
PARITY_METRICS = ("parity_seg_max_abs_diff", "parity_seg_powerset_agreement", "parity_emb_cos_min",
                  "parity_emb_cos_mean", "parity_der_delta", PARITY_OK)

#: The metrics the parent run's comparison table shows.
SUMMARY_METRICS = [DER_METRIC, DER_PCT_METRIC, DER_FLUIDAUDIO_METRIC, "jer_pyannote", RTFX_METRIC, TIME_TOTAL,
                   *(time_metric(s) for s in ("compile", "segmentation", "embedding", "clustering", "postprocess")),
                   "embedding_coreml_slice_by_index_ops", "embedding_model_size_bytes", PEAK_RSS,
                   "parity_emb_cos_min", "parity_seg_powerset_agreement", "parity_der_delta", PARITY_OK]
#: The params the parent run's comparison table shows.
SUMMARY_PARAMS = ["backend.resolved", "frame_extraction.mode", "frame_extraction.batch_size", "quant.mode",
                  "quant.realized", "compute_unit.resolved", "embedding.name", "clustering.method",
                  "segmentation.step_s"]

# --- tags ------------------------------------------------------------------------------------------

TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_ID = "diaropt.sweep_id"
TAG_SWEEP_KEY = "diaropt.sweep_key"  # sha1 of the sweep id: safe inside a filter string
TAG_SWEEP_DIR = "diaropt.sweep_dir"
TAG_ROLE = "diaropt.role"  # parent / child / single
TAG_PID = "diaropt.pid"
TAG_PID_START = "diaropt.pid_start_ticks"  # detects a recycled pid on Linux
TAG_HOST = "diaropt.host"
TAG_SKIPPED = "diaropt.skipped"
TAG_SKIP_REASON = "diaropt.skip_reason"
TAG_CLOSED_REASON = "diaropt.closed_reason"
TAG_JOBS_PLANNED = "diaropt.jobs_planned"  # on a parent: the jobs its sweep planned (basic: the product; Optuna: n_trials)
TAG_NONFINITE = "diaropt.nonfinite_metrics"
TAG_ERROR_TYPE = "diaropt.error_type"
TAG_ERROR_MESSAGE = "diaropt.error_message"
TAG_OVERRIDES = "diaropt.overrides"


def overrides_tag(overrides: Iterable[str]) -> str:
    """The ``diaropt.overrides`` tag of a job: its Hydra overrides as a JSON list (a value may hold spaces)."""
    return json.dumps(list(overrides))


def overrides_from_tag(text: object) -> list[str]:
    """The overrides in a ``diaropt.overrides`` tag: a JSON list, or the older space-joined form."""
    if not isinstance(text, str):
        return []
    if text.startswith("["):  # no Hydra override starts with "["
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return text.split()
TAG_JOB_NUM = "diaropt.job_num"
TAG_RELOGGED_FROM = "diaropt.relogged_from"
TAG_PARITY_FLAG = "diaropt.parity_flag"
TAG_TIMINGS_COMPARABLE = "diaropt.timings_comparable"
TAG_TIMINGS_NOTE = "diaropt.timings_note"
TAG_RECOMMENDED = "diaropt.recommended"
TAG_RECOMMENDED_RUN = "diaropt.recommended_run_id"
#: Prefix of the swept-axis tags (``axis.quant``, ``axis.backend``, ...).
AXIS_TAG_PREFIX = "axis."
