"""Loading a sweep from MLflow (``mlflow.search_runs``) and annotating its children: axes, labels, outcomes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from diaropt.config import REPO_ROOT
from diaropt.keys import (AXIS_TAG_PREFIX, DER_METRIC, RTFX_METRIC, TAG_CLOSED_REASON, TAG_JOBS_PLANNED, TAG_OVERRIDES,
                          TAG_PARENT, TAG_PARITY_FLAG, TAG_ROLE, TAG_SKIPPED, overrides_from_tag)
from diaropt.provenance import NUMERICS_TAG, TIMING_REASON_TAG, TIMING_TAG
from diaropt.tracking import check_run_id, outcome, resolve_tracking_uri, retry_locked, search_runs, sqlite_path

log = logging.getLogger(__name__)

#: Override prefixes that say where results go or how jobs launch, not what runs.
NOT_CONFIG = ("tracking.", "paths.", "hydra.", "hydra/")
#: The order swept axes are listed in (others after, sorted).
_AXIS_ORDER = ("experiment", "quant", "frame_extraction", "fusion", "compute_unit", "backend", "embedding",
               "clustering", "dataset")


@dataclass
class Sweep:
    """The children of one parent run, one row each (``mlflow.search_runs`` column layout)."""

    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    parent_name: str
    runs: pd.DataFrame
    axes: list[str]
    parent_status: str = "FINISHED"
    #: jobs the sweep planned (parent tag ``diaropt.jobs_planned``; None for sweeps logged before it)
    jobs_planned: int | None = None
    closed_reason: str = ""

    @property
    def jobs_never_run(self) -> int:
        """Planned jobs with no child run (distinct ``diaropt.job_num``); 0 if the plan is unknown."""
        column = self.runs.get("tags.diaropt.job_num")
        started = set(column.dropna()) if column is not None else set()
        return max(0, (self.jobs_planned or 0) - len(started))

    @property
    def unfinished(self) -> bool:
        """The sweep was interrupted (or still runs): its parent is not FINISHED/FAILED, or planned jobs never ran."""
        return self.parent_status not in ("FINISHED", "FAILED") or self.jobs_never_run > 0


def open_client(tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client for ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` or the repository's store).

    A SQLite store that does not exist is an error (MLflow would create an empty one).
    """
    uri = resolve_tracking_uri(tracking_uri, REPO_ROOT)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no MLflow store at {path}: run a sweep first (python experiments/sweep.py -m ...)")
    return MlflowClient(uri), uri


def latest_parent(tracking_uri: str, experiment_id: str) -> str | None:
    """The most recently started parent (multirun) run of the experiment, or None."""
    newest_first = ["attributes.start_time DESC"]
    tagged = search_runs(tracking_uri, [experiment_id], f"tags.`{TAG_ROLE}` = 'parent'", newest_first, max_results=1)
    if tagged:
        return tagged[0].info.run_id
    children = search_runs(tracking_uri, [experiment_id], "", newest_first)
    parents = [run.data.tags[TAG_PARENT] for run in children if TAG_PARENT in run.data.tags]
    return parents[0] if parents else None


def load_sweep(experiment_name: str = "diaropt", parent_run_id: str | None = None,
               tracking_uri: str | None = None) -> Sweep:
    """The children of ``parent_run_id`` (default: the latest parent run of the experiment)."""
    client, uri = open_client(tracking_uri)
    experiment = retry_locked(client.get_experiment_by_name, experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {experiment_name!r} in {uri}")
    if parent_run_id is None:
        parent_run_id = latest_parent(uri, experiment.experiment_id)
        if parent_run_id is None:
            raise LookupError(f"experiment {experiment_name!r} has no sweep (multirun parent run) to review; a "
                              "report compares configurations of one sweep: run e.g. "
                              "`python experiments/sweep.py -m quant=fp32,fp16,int8` first")
    check_run_id(parent_run_id)
    parent = retry_locked(client.get_run, parent_run_id)
    frame = search_runs(uri, [parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                        ["attributes.start_time ASC"], output_format="pandas")
    if frame.empty:
        raise LookupError(f"run {parent_run_id} has no child runs")
    frame.insert(1, "run_name", frame.get("tags.mlflow.runName"))
    axes = swept_axes(frame)
    planned = parent.data.tags.get(TAG_JOBS_PLANNED, "")
    return Sweep(uri, experiment_name, parent.info.experiment_id, parent_run_id,
                 parent.info.run_name or parent_run_id, annotate(frame, axes), axes, parent.info.status,
                 int(planned) if planned.isdigit() else None, parent.data.tags.get(TAG_CLOSED_REASON, ""))


# --- overrides, axes, labels ----------------------------------------------------------------------


def parse_overrides(text: Any) -> dict[str, str]:
    """``diaropt.overrides`` ('["quant=int8", "dataset=sample"]') -> {key: value}; ``+``/``++`` dropped."""
    result: dict[str, str] = {}
    for item in overrides_from_tag(text):  # a JSON list, or the older space-joined form
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            result[key.lstrip("+")] = value
    return result


def is_config_key(key: str) -> bool:
    """Whether an override key says what runs (not where results go or how jobs launch)."""
    return not key.startswith(NOT_CONFIG)


def swept_axes(frame: pd.DataFrame) -> list[str]:
    """Override keys whose value differs between children (else the ``axis.*`` tags that differ)."""
    overrides = [parse_overrides(v) for v in column(frame, f"tags.{TAG_OVERRIDES}")]
    keys = sorted({k for o in overrides for k in o if is_config_key(k)}, key=_axis_order)
    axes = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    if axes or any(overrides):
        return axes
    prefix = f"tags.{AXIS_TAG_PREFIX}"
    tag_axes = [c.removeprefix(prefix) for c in frame.columns if c.startswith(prefix)]
    return [a for a in tag_axes if frame[f"{prefix}{a}"].nunique(dropna=False) > 1]


def _axis_order(key: str) -> tuple[int, str]:
    head = key.split(".")[0]
    return (_AXIS_ORDER.index(head) if head in _AXIS_ORDER else len(_AXIS_ORDER), key)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or a column of None when the frame has no such column."""
    return frame[name] if name in frame.columns else pd.Series([None] * len(frame), index=frame.index, dtype=object)


def metric(frame: pd.DataFrame, name: str) -> pd.Series:
    """The metric ``name`` of every run as floats (NaN where missing)."""
    return pd.to_numeric(column(frame, f"metrics.{name}"), errors="coerce")


def axis_value(row: Mapping[str, Any], axis: str) -> str | None:
    """The value of a swept axis in one run: its override, else its ``axis.*`` tag, else None."""
    value = parse_overrides(row.get(f"tags.{TAG_OVERRIDES}")).get(axis)
    if value is None:
        tag = row.get(f"tags.{AXIS_TAG_PREFIX}{axis}")
        value = tag if isinstance(tag, str) else None
    return value


def present(value: Any) -> bool:
    """Not None and not NaN."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def parity_status(row: Mapping[str, Any]) -> str:
    """``ok``, ``flagged`` or ``unchecked`` (no parity metrics: parity disabled or not yet logged)."""
    ok = row.get("metrics.parity_ok")
    flag = row.get(f"tags.{TAG_PARITY_FLAG}")
    flag = flag if isinstance(flag, str) and flag.strip() else None
    if present(ok):
        return "ok" if float(ok) >= 0.5 and flag in (None, "ok") else "flagged"
    if flag is not None:
        return "ok" if flag == "ok" else "flagged"
    return "unchecked"


def annotate(frame: pd.DataFrame, axes: Sequence[str] | None = None) -> pd.DataFrame:
    """Adds ``label``, ``outcome``, ``der``, ``rtfx``, ``parity``, ``parity_flag`` columns."""
    frame = frame.copy().reset_index(drop=True)
    axes = list(axes) if axes is not None else swept_axes(frame)
    records = frame.to_dict("records")
    labels = []
    for row in records:
        parts = [f"{a}={v}" for a in axes if (v := axis_value(row, a)) is not None]
        labels.append(",".join(parts) or str(row.get("run_name") or row["run_id"][:8]))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # repeated configurations get #2, #3, ...
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    frame["label"] = labels
    frame["outcome"] = [outcome(r.get("status"), r.get(f"tags.{TAG_SKIPPED}")) for r in records]
    frame["der"] = metric(frame, DER_METRIC)
    frame["rtfx"] = metric(frame, RTFX_METRIC)
    frame["parity"] = [parity_status(r) for r in records]
    frame["parity_flag"] = column(frame, f"tags.{TAG_PARITY_FLAG}")
    frame["timing_source"] = [_text(r.get(f"tags.{TIMING_TAG}"), "unrecorded") for r in records]
    frame["timing_reason"] = [_text(r.get(f"tags.{TIMING_REASON_TAG}"), "") for r in records]
    frame["numerics_source"] = [_text(r.get(f"tags.{NUMERICS_TAG}"), "unrecorded") for r in records]
    frame["timing_group"] = [timing_group(r) for r in records]
    return frame


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


def timing_group(row: Mapping[str, Any]) -> str:
    """The conditions a run was timed under, for display: engine (``backend.resolved``), host (CPU
    model, else host name) and every model's ONNX Runtime optimization level. Two runs' timings are
    compared when :func:`comparable_timings` says so."""
    levels = [f"{kind}={level}" for kind, level in sorted(ort_levels(row).items())]
    return "; ".join([_engine_host(row), *(["ORT " + ",".join(levels)] if levels else [])])


def _engine_host(row: Mapping[str, Any]) -> str:
    backend = _text(row.get("params.backend.resolved"), "backend ?")
    host = _text(row.get("tags.host.cpu_model"), _text(row.get("tags.diaropt.host"), "host ?"))
    return f"{backend}; {host}"


def ort_levels(row: Mapping[str, Any]) -> dict[str, str]:
    """Model kind -> its ONNX Runtime optimization level (``params.ort_optimization_level.<kind>``)."""
    prefix = "params.ort_optimization_level."
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix) and isinstance(v, str)}


def comparable_timings(row: Mapping[str, Any], baseline: Mapping[str, Any]) -> bool:
    """Whether the timings of ``row`` (a run record or a row of ``annotate``'s frame) may be compared
    with ``baseline``'s: the same engine and host, and the same ONNX Runtime optimization level for
    every model kind both runs have. A model only one of them builds (``segmentation_sinc`` with
    ``segmentation.sinc_shared``, ``embedding_pool`` with a shared trunk) is part of the configuration
    being compared, not a condition of its timing."""
    if _engine_host(row) != _engine_host(baseline):
        return False
    mine, theirs = ort_levels(row), ort_levels(baseline)
    return all(mine[kind] == theirs[kind] for kind in mine.keys() & theirs.keys())
