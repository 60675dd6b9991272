"""Team review of one sweep: recommendation, Pareto front, timing breakdown, axis effects, parity.

Everything is read from MLflow (``MlflowClient.search_runs``), so a report can be made from any
tracking store a sweep logged to::

    python experiments/report.py                      # the latest sweep of experiment "diaropt"
    python experiments/report.py diaropt --parent RUN_ID --der-tolerance 0.005

Selection rule (``select_recommended``): among the sweep's finished, non-skipped children, the
highest RTFx whose DER (``der_pyannote``, a fraction) is at most the fp32 baseline's DER plus the
tolerance and whose parity check passed (``parity_ok == 1``). A child without parity metrics was
not checked: it is eligible only if it is the baseline itself or ``allow_unchecked`` is set. A child
whose timings came from the array cache (``diaropt.timings_comparable = false``) is not eligible.

``notebooks/compare_runs.ipynb`` runs the same analysis interactively with these functions.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from diaropt.config import CONF_DIR, REPO_ROOT
from diaropt.tracking import (TAG_OVERRIDES, TAG_PARENT, TAG_ROLE, TAG_SKIP_REASON, TAG_SKIPPED, flatten_config,
                              resolve_tracking_uri, retry_locked, sqlite_path)

log = logging.getLogger(__name__)

#: 0.5 DER points; DER metrics are fractions.
DEFAULT_DER_TOLERANCE = 0.005
DER_METRIC = "der_pyannote"
RTFX_METRIC = "rtfx"
TAG_RECOMMENDED = "diaropt.recommended"
TAG_RECOMMENDED_RUN = "diaropt.recommended_run_id"
TAG_PARITY_FLAG = "diaropt.parity_flag"
TAG_TIMINGS_COMPARABLE = "diaropt.timings_comparable"
PARITY_METRICS = ("parity_seg_max_abs_diff", "parity_seg_powerset_agreement", "parity_emb_cos_min",
                  "parity_emb_cos_mean", "parity_der_delta", "parity_ok")
#: Categories of the timing breakdown and the ``time_<stage>_s`` metrics each one adds up.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "compile": ("compile",), "audio": ("audio",), "segmentation": ("segmentation",),
    "preprocessing+embedding": ("preprocessing", "embedding"), "clustering": ("clustering",),
    "postprocess": ("postprocess",),
}
_STAGE_COLORS = ("#9e9e9e", "#c7b299", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
#: Override prefixes that say where results go or how jobs launch, not what runs.
_NOT_CONFIG = ("tracking.", "paths.", "hydra.", "hydra/")
_PARAM_NOISE = ("tracking.", "paths.", "weights_sha256.", "dataset.uris", "backend.resolved", "experiment_preset")


# ----------------------------------------------------------------------------------------------
# Reading the sweep
# ----------------------------------------------------------------------------------------------


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


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """Runs as a frame with ``mlflow.search_runs``' columns (``metrics.x``, ``params.x``, ``tags.x``)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "experiment_id": run.info.experiment_id, "artifact_uri": run.info.artifact_uri,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True) if run.info.start_time else pd.NaT,
            "end_time": pd.to_datetime(run.info.end_time, unit="ms", utc=True) if run.info.end_time else pd.NaT,
        }
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _search(client: MlflowClient, experiment_id: str, filter_string: str, order_by: list[str] | None = None,
            max_results: int | None = None) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = retry_locked(client.search_runs, [experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                            max_results=min(1000, max_results or 1000), order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs


def latest_parent(client: MlflowClient, experiment_id: str) -> str | None:
    """The most recently started parent (multirun) run of the experiment, or None."""
    tagged = _search(client, experiment_id, f"tags.`{TAG_ROLE}` = 'parent'", ["attributes.start_time DESC"], 1)
    if tagged:
        return tagged[0].info.run_id
    children = _search(client, experiment_id, "", ["attributes.start_time DESC"])
    parents = [run.data.tags[TAG_PARENT] for run in children if TAG_PARENT in run.data.tags]
    return parents[0] if parents else None


def open_client(tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client for ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` or the repository's store).

    A SQLite store that does not exist is an error (MLflow would create an empty one).
    """
    uri = resolve_tracking_uri(tracking_uri, REPO_ROOT)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no MLflow store at {path}: run a sweep first (python experiments/sweep.py -m ...)")
    return MlflowClient(uri), uri


def load_sweep(experiment_name: str = "diaropt", parent_run_id: str | None = None,
               tracking_uri: str | None = None) -> Sweep:
    """The children of ``parent_run_id`` (default: the latest parent run of the experiment)."""
    client, uri = open_client(tracking_uri)
    experiment = retry_locked(client.get_experiment_by_name, experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {experiment_name!r} in {uri}")
    if parent_run_id is None:
        parent_run_id = latest_parent(client, experiment.experiment_id)
        if parent_run_id is None:
            raise LookupError(f"experiment {experiment_name!r} has no sweep (multirun parent run) to review; a "
                              "report compares configurations of one sweep: run e.g. "
                              "`python experiments/sweep.py -m quant=fp32,fp16,int8` first")
    if not re.fullmatch(r"[0-9A-Za-z_-]+", parent_run_id):
        raise ValueError(f"not a run id: {parent_run_id!r}")
    parent = retry_locked(client.get_run, parent_run_id)
    children = _search(client, parent.info.experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                       ["attributes.start_time ASC"])
    if not children:
        raise LookupError(f"run {parent_run_id} has no child runs")
    frame = runs_frame(children)
    axes = swept_axes(frame)
    return Sweep(uri, experiment_name, parent.info.experiment_id, parent_run_id,
                 parent.info.run_name or parent_run_id, annotate(frame, axes), axes)


# ----------------------------------------------------------------------------------------------
# Overrides, axes, labels
# ----------------------------------------------------------------------------------------------


def parse_overrides(text: Any) -> dict[str, str]:
    """``diaropt.overrides`` ("quant=int8 dataset=sample") -> {key: value}; ``+``/``++`` dropped."""
    if not isinstance(text, str):
        return {}
    result: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            result[key.lstrip("+")] = value
    return result


def _is_config_key(key: str) -> bool:
    return not key.startswith(_NOT_CONFIG)


def swept_axes(frame: pd.DataFrame) -> list[str]:
    """Override keys whose value differs between children (else the ``axis.*`` tags that differ)."""
    overrides = [parse_overrides(v) for v in _column(frame, f"tags.{TAG_OVERRIDES}")]
    keys = sorted({k for o in overrides for k in o if _is_config_key(k)}, key=_axis_order)
    axes = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    if axes or any(overrides):
        return axes
    tag_axes = [c.removeprefix("tags.axis.") for c in frame.columns if c.startswith("tags.axis.")]
    return [a for a in tag_axes if frame[f"tags.axis.{a}"].nunique(dropna=False) > 1]


def _axis_order(key: str) -> tuple[int, str]:
    first = ("experiment", "quant", "frame_extraction", "fusion", "compute_unit", "backend", "embedding",
             "clustering", "dataset")
    head = key.split(".")[0]
    return (first.index(head) if head in first else len(first), key)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame.columns else pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _metric(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_column(frame, f"metrics.{name}"), errors="coerce")


def axis_value(row: Mapping[str, Any], axis: str) -> str | None:
    """The value of a swept axis in one run: its override, else its ``axis.*`` tag, else None."""
    value = parse_overrides(row.get(f"tags.{TAG_OVERRIDES}")).get(axis)
    if value is None:
        tag = row.get(f"tags.axis.{axis}")
        value = tag if isinstance(tag, str) else None
    return value


def _outcome(row: Mapping[str, Any]) -> str:
    status = row.get("status")
    if status == "FINISHED":
        return "skipped" if row.get(f"tags.{TAG_SKIPPED}") == "true" else "finished"
    return {"FAILED": "failed", "KILLED": "killed", "RUNNING": "running"}.get(str(status), str(status).lower())


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def parity_status(row: Mapping[str, Any]) -> str:
    """``ok``, ``flagged`` or ``unchecked`` (no parity metrics: parity disabled or not yet logged)."""
    ok = row.get("metrics.parity_ok")
    flag = row.get(f"tags.{TAG_PARITY_FLAG}")
    flag = flag if isinstance(flag, str) and flag.strip() else None
    if _present(ok):
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
    frame["outcome"] = [_outcome(r) for r in records]
    frame["der"] = _metric(frame, DER_METRIC)
    frame["rtfx"] = _metric(frame, RTFX_METRIC)
    frame["parity"] = [parity_status(r) for r in records]
    frame["parity_flag"] = _column(frame, f"tags.{TAG_PARITY_FLAG}")
    return frame


# ----------------------------------------------------------------------------------------------
# Baseline and selection
# ----------------------------------------------------------------------------------------------


def default_axis_values(axes: Sequence[str]) -> dict[str, str]:
    """The value each axis takes in the default configuration (group choice or scalar).

    Empty if the configuration cannot be composed (e.g. diaropt not installed from its repository).
    """
    try:
        from omegaconf import OmegaConf

        from diaropt.config import compose

        cfg = compose([])
    except Exception as error:  # noqa: BLE001 - the baseline rule then falls back to best DER
        log.warning("cannot compose the default configuration: %s", error)
        return {}
    choices = dict(cfg.hydra.runtime.choices)
    result = {}
    for axis in axes:
        if axis in choices:
            result[axis] = "null" if choices[axis] is None else str(choices[axis])
        else:
            value = OmegaConf.select(cfg, axis, default=None)
            result[axis] = "null" if value is None else str(getattr(value, "value", value))
    return result


def _same_value(a: str, b: str) -> bool:
    a, b = a.strip().strip("'\""), b.strip().strip("'\"")
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a.lower() in (b.lower(), "none" if b.lower() == "null" else b.lower())


def _quant_mode(row: Mapping[str, Any]) -> str | None:
    for key in ("params.quant.mode", "tags.axis.quant"):
        value = row.get(key)
        if isinstance(value, str):
            return value
    return None


def choose_baseline(frame: pd.DataFrame, axes: Sequence[str], defaults: Mapping[str, str]) -> tuple[str | None, str]:
    """(run id, how it was chosen) of the fp32 baseline; see the module docstring."""
    usable = frame[(frame["outcome"] == "finished") & frame["der"].notna()]
    if usable.empty:
        return None, "no finished child has a DER: there is no baseline"
    fp32 = usable[[_quant_mode(r) == "fp32" for r in usable.to_dict("records")]]
    if fp32.empty:
        best = usable.sort_values(["der", "rtfx"], ascending=[True, False]).iloc[0]
        return best["run_id"], "the child with the best DER: this sweep has no finished fp32 child"
    others = [a for a in axes if a != "quant"]

    def is_default(row: Mapping[str, Any]) -> bool:
        overrides = parse_overrides(row.get(f"tags.{TAG_OVERRIDES}"))
        for axis in others:
            value = overrides.get(axis)
            if value is None:
                continue  # not overridden: the default
            if axis not in defaults or not _same_value(value, defaults[axis]):
                return False
        return True

    default = fp32[[is_default(r) for r in fp32.to_dict("records")]]
    if not default.empty:
        best = default.sort_values("der").iloc[0]
        what = "the fp32 child with the default value of every other swept axis" if others else "the fp32 child"
        return best["run_id"], what
    best = fp32.sort_values("der").iloc[0]
    return best["run_id"], "the fp32 child with the best DER (no fp32 child has the default other axes)"


@dataclass
class Selection:
    """The outcome of the selection rule; ``candidates`` has one row per child with its verdict."""

    baseline_run_id: str | None
    baseline_note: str
    recommended_run_id: str | None
    tolerance: float
    allow_unchecked: bool
    candidates: pd.DataFrame
    message: str
    #: what ``allow_unchecked=True`` would recommend, when that differs (None otherwise)
    if_unchecked_allowed: str | None = None

    def row(self, run_id: str | None) -> pd.Series | None:
        if run_id is None:
            return None
        match = self.candidates[self.candidates["run_id"] == run_id]
        return match.iloc[0] if not match.empty else None

    @property
    def recommended(self) -> pd.Series | None:
        return self.row(self.recommended_run_id)

    @property
    def baseline(self) -> pd.Series | None:
        return self.row(self.baseline_run_id)


def select_recommended(frame: pd.DataFrame, tolerance: float = DEFAULT_DER_TOLERANCE, allow_unchecked: bool = False,
                       axes: Sequence[str] | None = None, defaults: Mapping[str, str] | None = None) -> Selection:
    """Apply the selection rule to an annotated frame (``annotate``); never raises on empty input."""
    if tolerance < 0:
        raise ValueError(f"DER tolerance must be >= 0, got {tolerance}")
    if "label" not in frame.columns:
        frame = annotate(frame, axes)
    axes = list(axes) if axes is not None else swept_axes(frame)
    defaults = dict(defaults) if defaults is not None else {}
    baseline_id, note = choose_baseline(frame, axes, defaults) if len(frame) else (None, "the sweep has no child")
    base_der = float(frame.loc[frame["run_id"] == baseline_id, "der"].iloc[0]) if baseline_id else math.nan
    rows = []
    for row in frame.to_dict("records"):
        der, rtfx = row["der"], row["rtfx"]
        reason = ""
        if row["outcome"] != "finished":
            skip = row.get(f"tags.{TAG_SKIP_REASON}")
            reason = row["outcome"] + (f": {skip}" if isinstance(skip, str) and skip else "")
        elif math.isnan(der):
            reason = f"no {DER_METRIC}"
        elif math.isnan(rtfx):
            reason = f"no {RTFX_METRIC}"
        elif baseline_id is None:
            reason = "no baseline"
        elif der > base_der + tolerance + 1e-12:
            reason = f"DER {100 * (der - base_der):+.2f} pts vs baseline (tolerance {100 * tolerance:.2f})"
        elif row["parity"] == "flagged":
            flag = row.get("parity_flag")
            reason = f"parity flagged ({flag})" if isinstance(flag, str) and flag else "parity flagged (parity_ok=0)"
        elif row["parity"] == "unchecked" and row["run_id"] != baseline_id and not allow_unchecked:
            reason = "parity not checked"
        elif row.get(f"tags.{TAG_TIMINGS_COMPARABLE}") == "false":
            reason = "timings not comparable (array cache)"
        rows.append({"run_id": row["run_id"], "label": row["label"], "outcome": row["outcome"], "der": der,
                     "der_delta": der - base_der, "rtfx": rtfx, "parity": row["parity"],
                     "is_baseline": row["run_id"] == baseline_id, "eligible": not reason, "reason": reason})
    candidates = pd.DataFrame(rows, columns=["run_id", "label", "outcome", "der", "der_delta", "rtfx", "parity",
                                             "is_baseline", "eligible", "reason"])
    eligible = candidates[candidates["eligible"]]
    recommended = _best(eligible)
    alternative = _best(candidates[candidates["eligible"] | (candidates["reason"] == "parity not checked")])
    if recommended is not None:
        best = candidates[candidates["run_id"] == recommended].iloc[0]
        message = (f"recommended: {best['label']} (run {recommended}): RTFx {best['rtfx']:.2f}, "
                   f"DER {100 * best['der']:.2f} % ({100 * best['der_delta']:+.2f} pts vs baseline)")
    elif baseline_id is None:
        message = f"no configuration qualifies: {note}"
    else:
        message = (f"no configuration qualifies: none of the {len(candidates)} children is finished, within "
                   f"{100 * tolerance:.2f} DER points of the baseline and parity-clean")
    return Selection(baseline_id, note, recommended, tolerance, allow_unchecked, candidates, message,
                     alternative if alternative != recommended else None)


def _best(candidates: pd.DataFrame) -> str | None:
    if candidates.empty:
        return None
    return str(candidates.sort_values(["rtfx", "der"], ascending=[False, True]).iloc[0]["run_id"])


# ----------------------------------------------------------------------------------------------
# Analyses
# ----------------------------------------------------------------------------------------------


def pareto_front(der: Sequence[float], rtfx: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats (DER lower-or-equal and RTFx higher-or-equal, one strictly).

    Points with a NaN coordinate are never on the front; exact duplicates are both kept.
    """
    d = np.asarray(der, dtype=float)
    r = np.asarray(rtfx, dtype=float)
    if d.shape != r.shape:
        raise ValueError("der and rtfx must have the same length")
    valid = ~(np.isnan(d) | np.isnan(r))
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid & (d <= d[i]) & (r >= r[i]) & ((d < d[i]) | (r > r[i]))
        front[i] = not others.any()
    return front


def scored(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished children with both DER and RTFx, plus an ``on_front`` column."""
    done = frame[(frame["outcome"] == "finished") & frame["der"].notna() & frame["rtfx"].notna()].copy()
    done["on_front"] = pareto_front(done["der"], done["rtfx"]) if len(done) else []
    return done


def axis_effects(frame: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Per swept axis and value: runs, median RTFx and median DER (marginal over the other axes)."""
    done = scored(frame)
    rows = []
    for axis in axes:
        values = [axis_value(r, axis) for r in done.to_dict("records")]
        groups = pd.Series(values, index=done.index).fillna("(default)")
        for value, index in groups.groupby(groups, sort=False).groups.items():
            part = done.loc[index]
            rows.append({"axis": axis, "value": value, "runs": len(part), "rtfx_median": part["rtfx"].median(),
                         "der_median": part["der"].median()})
    return pd.DataFrame(rows, columns=["axis", "value", "runs", "rtfx_median", "der_median"])


def timing_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds per stage category (``STAGE_GROUPS``), total and its min/max over repeats, per finished child."""
    done = frame[frame["outcome"] == "finished"]
    rows = []
    for row in done.to_dict("records"):
        entry: dict[str, Any] = {"run_id": row["run_id"], "label": row["label"]}
        for group, stages in STAGE_GROUPS.items():
            values = [row.get(f"metrics.time_{s}_s") for s in stages]
            entry[group] = sum(float(v) for v in values if _present(v))
        for key, metric in (("total", "time_total_s"), ("total_min", "time_total_s_min"),
                            ("total_max", "time_total_s_max")):
            value = row.get(f"metrics.{metric}")
            entry[key] = float(value) if _present(value) else math.nan
        repeats = row.get("metrics.repeats")
        entry["repeats"] = int(repeats) if _present(repeats) else 1
        rows.append(entry)
    return pd.DataFrame(rows, columns=["run_id", "label", *STAGE_GROUPS, "total", "total_min", "total_max",
                                       "repeats"])


def parity_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The parity metrics and flag of every child (NaN / empty where not checked)."""
    table = frame[["run_id", "label", "outcome", "parity"]].copy()
    for name in PARITY_METRICS:
        table[name] = _metric(frame, name)
    table["flag"] = frame["parity_flag"].where(frame["parity_flag"].notna(), "")
    return table


def reproduce_command(row: Mapping[str, Any]) -> str:
    """``python experiments/sweep.py <overrides>`` of a child (its ``diaropt.overrides`` tag, no ``hydra.*``)."""
    text = row.get(f"tags.{TAG_OVERRIDES}")
    items = text.split() if isinstance(text, str) else []
    items = [o for o in items if not o.lstrip("+").startswith(("hydra.", "hydra/"))]
    return " ".join(["python", "experiments/sweep.py", *(shlex.quote(o) for o in items)])


# ----------------------------------------------------------------------------------------------
# Hydra preset
# ----------------------------------------------------------------------------------------------


def preset_name(parent_run_id: str) -> str:
    return f"recommended_{parent_run_id[:8]}"


def _config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()} if CONF_DIR.is_dir() else set()


def preset_yaml(row: Mapping[str, Any], name: str, comment: str = "") -> str:
    """A ``conf/experiment/<name>.yaml`` preset of a child's configuration overrides.

    Group overrides become ``override /group: option`` defaults (``experiment=X`` includes preset X
    first); other keys become plain (nested) keys. ``tracking.*``, ``paths.*`` and ``hydra.*`` are
    left out: they say where results go, not what runs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    groups = _config_groups()
    text = row.get(f"tags.{TAG_OVERRIDES}")
    items = [o for o in (text.split() if isinstance(text, str) else []) if _is_config_key(o.lstrip("+~"))]
    parsed = OverridesParser.create().parse_overrides(items)
    included: list[str] = []
    overrides: list[str] = []
    scalars = OmegaConf.create({})
    skipped: list[str] = []
    for item, override in zip(items, parsed):
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override() or (key in groups and override.package):
            skipped.append(item)
        elif key == "experiment":
            value = override.value()
            if value is not None:
                included.append(str(value))
        elif key in groups:
            value = override.value()
            overrides.append(f"override /{key}: {'null' if value is None else value!s}")
        else:
            OmegaConf.update(scalars, key, override.value(), force_add=True)
    lines = ["# @package _global_"]
    lines += [f"# {line}".rstrip() for line in comment.splitlines()]
    if skipped:
        lines.append(f"# not representable in a preset, left out: {' '.join(skipped)}")
    lines.append("defaults:")
    lines += [f"  - {entry}" for entry in included + overrides]
    lines.append("  - _self_")
    body = {**OmegaConf.to_container(scalars), "experiment_preset": name}
    lines.append(OmegaConf.to_yaml(OmegaConf.create(body)).rstrip())
    return "\n".join(lines) + "\n"


def compare_preset(preset_file: Path, row: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Compose ``experiment=<preset>`` (the preset's folder on Hydra's search path) and compare it
    with the child's logged params; returns (keys compared, mismatches as "key: logged != preset").

    Raises if the preset does not compose.
    """
    from diaropt.config import compose, to_container

    preset_file = Path(preset_file).resolve()
    if preset_file.parent.name != "experiment":
        raise ValueError(f"{preset_file} must be in a folder named experiment/")
    cfg = compose([f"hydra.searchpath=[file://{preset_file.parent.parent}]", f"experiment={preset_file.stem}"])
    composed = flatten_config(to_container(cfg))
    logged = {k.removeprefix("params."): v for k, v in row.items() if k.startswith("params.") and _present(v)}
    keys = sorted(k for k in set(composed) & set(logged) if not k.startswith(_PARAM_NOISE))
    mismatches = [f"{k}: logged {logged[k]!r} != preset {composed[k]!r}" for k in keys
                  if str(logged[k]) != str(composed[k])]
    return len(keys), mismatches


def install_preset(preset_file: Path, conf_dir: Path = CONF_DIR) -> Path:
    """Copy a preset to ``conf/experiment/`` so ``experiment=<name>`` finds it; returns the target."""
    target = Path(conf_dir) / "experiment" / Path(preset_file).name
    shutil.copyfile(preset_file, target)
    return target


# ----------------------------------------------------------------------------------------------
# Figures (Agg, no pyplot state)
# ----------------------------------------------------------------------------------------------


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (``IPython.display.Image(figure_png(fig))`` in a notebook)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _empty(figure: Any, text: str) -> Any:
    ax = figure.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_axis_off()
    return figure


def pareto_figure(frame: pd.DataFrame, selection: Selection | None = None) -> Any:
    """DER (%) vs RTFx of the finished children: the Pareto front joined, baseline and recommended marked."""
    done = scored(frame)
    if done.empty:
        return _empty(_figure(10, 6), "no finished child with both DER and RTFx")
    x, y = done["rtfx"].to_numpy(), 100 * done["der"].to_numpy()
    crowded = len(done) > 8 or _crowded(x, y)
    if crowded:  # points numbered, labels in a key beside the plot
        figure = _figure(13.5, max(6.0, 1.5 + 0.22 * len(done)))
        ax, key_ax = figure.subplots(1, 2, width_ratios=[2.3, 1])
    else:
        figure = _figure(10, 6)
        ax = figure.add_subplot()
    lo, hi = _metric(done, "rtfx_min").to_numpy(), _metric(done, "rtfx_max").to_numpy()
    spread = ~(np.isnan(lo) | np.isnan(hi)) & (hi > lo)
    if spread.any():
        ax.errorbar(x[spread], y[spread], xerr=[x[spread] - lo[spread], hi[spread] - x[spread]], fmt="none",
                    ecolor="#999999", elinewidth=1, capsize=3, label="RTFx min-max over repeats")
    front = done["on_front"].to_numpy(dtype=bool)
    ax.scatter(x[~front], y[~front], s=55, color="#aaaaaa", zorder=3, label="dominated")
    ax.scatter(x[front], y[front], s=70, color="#1f77b4", zorder=4, label="Pareto front")
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], color="#1f77b4", lw=1.5, zorder=2)
    pad_y = max(0.5, 0.15 * (np.nanmax(y) - np.nanmin(y)))
    ax.set_ylim(max(0.0, np.nanmin(y) - pad_y), np.nanmax(y) + pad_y)
    pad_x = max(0.1, 0.12 * (np.nanmax(x) - np.nanmin(x)))
    ax.set_xlim(max(0.0, np.nanmin(x) - pad_x), np.nanmax(x) + 2.5 * pad_x)
    if selection is not None and selection.baseline is not None:
        base = selection.baseline
        ax.axhspan(ax.get_ylim()[0], 100 * (base["der"] + selection.tolerance), color="#2ca02c", alpha=0.10,
                   zorder=0, label=f"within {100 * selection.tolerance:.2f} DER pts of the baseline")
        ax.scatter([base["rtfx"]], [100 * base["der"]], s=200, facecolors="none", edgecolors="black", lw=1.8,
                   zorder=5, label="fp32 baseline")
    if selection is not None and selection.recommended is not None:
        rec = selection.recommended
        ax.scatter([rec["rtfx"]], [100 * rec["der"]], marker="*", s=380, color="#d62728", zorder=6,
                   label="recommended")
    for number, (label, xi, yi, on) in enumerate(zip(done["label"], x, y, front), 1):
        ax.annotate(str(number) if crowded else _shorten(label, 40), (xi, yi), xytext=(5, 4),
                    textcoords="offset points", fontsize=9, fontweight="bold" if on else "normal")
    if crowded:
        key_ax.set_axis_off()
        lines = [f"{n:>2}{'*' if on else ' '} {_shorten(label, 44)}"
                 for n, (label, on) in enumerate(zip(done["label"], front), 1)]
        key_ax.text(0.0, 1.0, "\n".join(["key (* = on the front)", *lines]), transform=key_ax.transAxes,
                    va="top", ha="left", fontsize=9, family="monospace", linespacing=1.5)
    ax.set_xlabel("RTFx (audio seconds per second of processing; higher is faster)", fontsize=11)
    ax.set_ylabel("DER, pyannote convention (%; lower is better)", fontsize=11)
    ax.set_title("Accuracy vs speed: Pareto front", fontsize=13)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=10)
    ax.legend(fontsize=9, loc="best")
    return figure


def _crowded(x: np.ndarray, y: np.ndarray, min_distance: float = 0.09) -> bool:
    """Whether two points are closer than ``min_distance`` of the plot's extent (labels would collide)."""
    span_x = (np.nanmax(x) - np.nanmin(x)) or 1.0
    span_y = (np.nanmax(y) - np.nanmin(y)) or 1.0
    points = np.stack([x / span_x, y / span_y], axis=1)
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return bool(len(points) > 1 and distances.min() < min_distance)


def timing_figure(frame: pd.DataFrame) -> Any:
    """One horizontal stacked bar per finished child (stage categories); min-max of the total over repeats."""
    table = timing_table(frame)
    table = table[table["total"].notna()].sort_values("total")
    figure = _figure(11, max(3.4, 2.2 + 0.55 * len(table)))
    if table.empty:
        return _empty(figure, "no finished child with stage timings")
    ax = figure.add_subplot()
    ypos = np.arange(len(table))
    lefts = np.zeros(len(table))
    totals = table["total"].to_numpy()
    for group, color in zip(STAGE_GROUPS, _STAGE_COLORS):
        widths = np.clip(table[group].to_numpy(), 0.0, None)
        if not (widths > 0).any():
            continue
        bars = ax.barh(ypos, widths, left=lefts, color=color, label=group, height=0.6)
        texts = [f"{w:.2f}" if w >= 0.07 * totals.max() else "" for w in widths]
        ax.bar_label(bars, labels=texts, label_type="center", fontsize=9, color="white")
        lefts += widths
    lo, hi = table["total_min"].to_numpy(), table["total_max"].to_numpy()
    spread = (table["repeats"].to_numpy() > 1) & ~(np.isnan(lo) | np.isnan(hi))
    if spread.any():
        ax.errorbar(totals[spread], ypos[spread], xerr=[totals[spread] - lo[spread], hi[spread] - totals[spread]],
                    fmt="none", ecolor="black", capsize=4, lw=1.2, label="total min-max over repeats")
    for i, (total, repeats) in enumerate(zip(totals, table["repeats"])):
        note = f" {total:.2f} s" + (f" (median of {repeats})" if repeats > 1 else "")
        ax.text(max(total, hi[i] if spread[i] else total), i, note, va="center", fontsize=9)
    ax.set_yticks(ypos, labels=[_shorten(label, 42) for label in table["label"]], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlabel("seconds for the whole evaluation set (warm-up excluded)", fontsize=11)
    ax.set_title("Where the time goes, per configuration", fontsize=13)
    ax.margins(x=0.22)
    ax.grid(axis="x", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    return figure


def axis_effects_figure(effects: pd.DataFrame) -> Any:
    """Per axis: median RTFx and median DER (%) for each value, side by side."""
    axes = list(dict.fromkeys(effects["axis"])) if len(effects) else []
    if not axes:
        return _empty(_figure(10, 2.5), "no swept axis with finished runs")
    figure = _figure(11, 1.2 + sum(0.5 * max(2, (effects["axis"] == a).sum()) + 0.6 for a in axes))
    grid = figure.subplots(len(axes), 2, squeeze=False)
    for (left, right), axis in zip(grid, axes):
        part = effects[effects["axis"] == axis]
        ypos = np.arange(len(part))
        labels = [f"{v} (n={n})" for v, n in zip(part["value"], part["runs"])]
        panels = ((left, "rtfx_median", 1, "#1f77b4", "median RTFx (higher is faster)"),
                  (right, "der_median", 100, "#d62728", "median DER % (lower is better)"))
        for ax, column, scale, color, title in panels:
            values = scale * part[column].to_numpy()
            bars = ax.barh(ypos, values, color=color, height=0.55)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
            ax.set_yticks(ypos, labels=labels if ax is left else [""] * len(labels), fontsize=10)
            ax.invert_yaxis()
            ax.margins(x=0.2)
            ax.set_title(f"{axis}: {title}", fontsize=10)
            ax.tick_params(axis="x", labelsize=9)
            ax.grid(axis="x", alpha=0.3)
    figure.suptitle("Effect of each swept axis (medians over the runs with that value)", fontsize=12)
    return figure


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# The document: one list of blocks rendered as Markdown and as self-contained HTML
# ----------------------------------------------------------------------------------------------


@dataclass
class Document:
    """Headings, paragraphs, lists, code, tables and PNG images, rendered to Markdown and HTML."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def image(self, name: str, png: bytes, alt: str) -> None:
        self.images[name] = png
        self.blocks.append(("image", (name, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, content in self.blocks:
            if kind == "heading":
                out += ["#" * content[0] + " " + content[1], ""]
            elif kind == "para":
                out += [content, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in content] + [""]
            elif kind == "code":
                out += ["```", content, "```", ""]
            elif kind == "table":
                out += [_markdown_table(content), ""]
            elif kind == "image":
                out += [f"![{content[1]}]({content[0]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{_inline_html(self.title)}</h1>"]
        for kind, content in self.blocks:
            if kind == "heading":
                body.append(f"<h{content[0]}>{_inline_html(content[1])}</h{content[0]}>")
            elif kind == "para":
                body.append(f"<p>{_inline_html(content)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in content) + "</ul>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(content)}</code></pre>")
            elif kind == "table":
                body.append(_html_table(content))
            elif kind == "image":
                data = base64.b64encode(self.images[content[0]]).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(content[1])}">'
                            f"<figcaption>{html.escape(content[1])}</figcaption></figure>")
        return _HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1.5em; color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.7em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }}
h2 {{ font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #eee; }}
table {{ border-collapse: collapse; margin: .8em 0; font-size: .92em; }}
th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
tr:nth-child(even) td {{ background: #fafafa; }}
code {{ background: #f3f3f3; padding: .05em .3em; border-radius: 3px; font-size: .92em; }}
pre {{ background: #f6f8fa; padding: .8em 1em; overflow-x: auto; border-radius: 4px; }}
pre code {{ background: none; padding: 0; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #666; font-size: .9em; }}
.scroll {{ overflow-x: auto; }}
</style></head>
<body>
{body}
</body></html>
"""


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(none)_"
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_inline_html(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _pct(value: Any, signed: bool = False) -> str:
    if not _present(value):
        return ""
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _present(value) else ""


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    """A rendered report; ``write`` puts it in a folder."""

    document: Document
    selection: Selection
    preset_name: str | None
    preset_text: str | None

    def write(self, out_dir: Path) -> dict[str, Path]:
        """``report.md``, ``report.html``, the PNGs and ``conf/experiment/<preset>.yaml``; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
        paths["markdown"].write_text(self.document.markdown())
        paths["html"].write_text(self.document.html())
        for name, png in self.document.images.items():
            (out_dir / name).write_bytes(png)
        if self.preset_text is not None and self.preset_name is not None:
            paths["preset"] = out_dir / "conf" / "experiment" / f"{self.preset_name}.yaml"
            paths["preset"].parent.mkdir(parents=True, exist_ok=True)
            paths["preset"].write_text(self.preset_text)
        return paths


def build_report(sweep: Sweep, selection: Selection, preset_check: str | None = None) -> Report:
    """The Markdown/HTML document of a sweep and its selection (figures included as PNGs)."""
    frame = sweep.runs
    counts = frame["outcome"].value_counts().to_dict()
    doc = Document(f"Report: {sweep.parent_name}")
    first = frame.iloc[0]
    host = first.get("tags.host.cpu_model")
    doc.bullets([
        f"parent run `{sweep.parent_run_id}` in experiment `{sweep.experiment_name}` ({sweep.tracking_uri})",
        f"{len(frame)} children: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())),
        "swept axes: " + (", ".join(f"`{a}`" for a in sweep.axes) or "none (a single configuration)"),
        f"host: {host if isinstance(host, str) else 'unknown'}; git commit "
        f"`{str(first.get('tags.git.commit', 'unknown'))[:12]}`",
        f"generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `python experiments/report.py`",
    ])

    doc.heading("Recommendation")
    base, rec = selection.baseline, selection.recommended
    rule = (f"Rule: the highest RTFx among finished, non-skipped children whose DER ({DER_METRIC}) is at most the "
            f"baseline's plus {100 * selection.tolerance:.2f} points and whose parity check passed "
            f"(`parity_ok = 1`); children without parity metrics count as unchecked and are "
            + ("eligible (`--allow-unchecked`)." if selection.allow_unchecked
               else "not eligible unless they are the baseline."))
    if rec is not None:
        speedup = rec["rtfx"] / base["rtfx"] if base is not None and base["rtfx"] > 0 else math.nan
        doc.para(f"**Recommended: `{rec['label']}`** (run `{rec['run_id']}`): RTFx **{rec['rtfx']:.2f}**"
                 + (f" ({speedup:.2f}x the baseline)" if _present(speedup) else "")
                 + f", DER **{_pct(rec['der'])} %** ({_pct(rec['der_delta'], True)} points vs the baseline), "
                 f"parity: {rec['parity']}.")
    else:
        doc.para(f"**No configuration qualifies.** {selection.message[len('no configuration qualifies: '):]}."
                 if selection.message.startswith("no configuration") else f"**{selection.message}**")
    alternative = selection.row(selection.if_unchecked_allowed)
    if alternative is not None:
        doc.para(f"With `--allow-unchecked` (accepting runs whose parity was not checked) the recommendation would be "
                 f"`{alternative['label']}` (run `{alternative['run_id'][:8]}`): RTFx {alternative['rtfx']:.2f}, "
                 f"DER {_pct(alternative['der'])} % ({_pct(alternative['der_delta'], True)} points).")
    if base is not None:
        doc.para(f"Baseline: `{base['label']}` (run `{base['run_id']}`), DER {_pct(base['der'])} %, "
                 f"RTFx {_num(base['rtfx'])}: {selection.baseline_note}.")
    else:
        doc.para(f"Baseline: {selection.baseline_note}.")
    doc.para(rule)
    if rec is not None:
        row = frame[frame["run_id"] == rec["run_id"]].iloc[0]
        doc.heading("Reproduce the recommended run", 3)
        doc.code(reproduce_command(row))
        name = preset_name(sweep.parent_run_id)
        doc.para(f"The same configuration as a Hydra preset, `conf/experiment/{name}.yaml` in this folder (copy it "
                 f"to the repository's `conf/experiment/`, or run the report with `--install-preset`), then:")
        doc.code(f"python experiments/sweep.py experiment={name}")
        if preset_check:
            doc.para(preset_check)
    not_eligible = selection.candidates[~selection.candidates["eligible"]]
    if len(not_eligible):
        doc.para("Why the others were not chosen: " + "; ".join(
            f"`{r.label}`: {r.reason}" for r in not_eligible.itertuples()) + ".")

    doc.heading("All configurations")
    table = frame[["run_id", "label", "outcome"]].copy()
    cand = selection.candidates.set_index("run_id")
    table["DER %"] = [_pct(v) for v in frame["der"]]
    table["ΔDER pts"] = [_pct(cand.loc[r, "der_delta"], True) for r in frame["run_id"]]
    table["DER % (FluidAudio)"] = [_pct(v) for v in _metric(frame, "der_fluidaudio")]
    table["RTFx"] = [_num(v) for v in frame["rtfx"]]
    lo, hi = _metric(frame, "rtfx_min"), _metric(frame, "rtfx_max")
    table["RTFx min-max"] = [f"{a:.2f}-{b:.2f}" if _present(a) and _present(b) and b > a else ""
                             for a, b in zip(lo, hi)]
    table["peak RSS MB"] = [_num(v / 2**20, 0) if _present(v) else "" for v in _metric(frame, "peak_rss_bytes")]
    table["parity"] = frame["parity"]
    table["verdict"] = ["baseline" + (" (eligible)" if cand.loc[r, "eligible"] else f": {cand.loc[r, 'reason']}")
                        if cand.loc[r, "is_baseline"] else
                        ("**recommended**" if r == selection.recommended_run_id else
                         "eligible" if cand.loc[r, "eligible"] else cand.loc[r, "reason"])
                        for r in frame["run_id"]]
    table["run_id"] = [f"`{r[:8]}`" for r in table["run_id"]]
    doc.table(table.rename(columns={"run_id": "run"}))

    doc.heading("Pareto front: DER vs RTFx")
    done = scored(frame)
    doc.image("pareto.png", figure_png(pareto_figure(frame, selection)), "DER vs RTFx; Pareto front joined")
    if len(done):
        front = done[done["on_front"]].sort_values("rtfx")
        doc.para("On the front (no other configuration is both at least as fast and at least as accurate): "
                 + ", ".join(f"`{r.label}` (RTFx {r.rtfx:.2f}, DER {100 * r.der:.2f} %)" for r in front.itertuples())
                 + ".")

    doc.heading("Timing breakdown")
    timings = timing_table(frame)
    doc.image("timing.png", figure_png(timing_figure(frame)), "seconds per stage category and configuration")
    if len(timings):
        shown = timings[["label", *STAGE_GROUPS, "total", "repeats"]].copy()
        for column in [*STAGE_GROUPS, "total"]:
            shown[column] = [_num(v, 3) for v in shown[column]]
        spread = [f"{a:.3f}-{b:.3f}" if r > 1 and _present(a) and _present(b) else ""
                  for a, b, r in zip(timings["total_min"], timings["total_max"], timings["repeats"])]
        shown.insert(len(shown.columns) - 1, "total min-max", spread)
        doc.para("Seconds over the whole evaluation set (median over repeats; compile counted once per repeat; "
                 "warm-up excluded, as in `time_total_s`).")
        doc.table(shown)

    doc.heading("Effect of each axis")
    effects = axis_effects(frame, sweep.axes)
    if effects.empty:
        doc.para("No swept axis has finished runs to compare.")
    else:
        doc.image("axes.png", figure_png(axis_effects_figure(effects)), "median RTFx and DER per axis value")
        shown = effects.copy()
        shown["rtfx_median"] = [_num(v) for v in shown["rtfx_median"]]
        shown["der_median"] = [_pct(v) for v in shown["der_median"]]
        doc.para("Marginal medians: each value's median over all finished runs with that value, whatever the "
                 "other axes were.")
        doc.table(shown.rename(columns={"rtfx_median": "median RTFx", "der_median": "median DER %"}))

    doc.heading("Parity")
    parity = parity_table(frame)
    if (parity["parity"] == "unchecked").all():
        doc.para("No child has parity metrics (parity disabled, or the sweep predates the check): every child counts "
                 "as unchecked.")
    shown = parity.drop(columns=["run_id"]).copy()
    for name in PARITY_METRICS:
        shown[name] = [_num(v, 4) for v in shown[name]]
    doc.para("Columns are the `parity_*` metrics (prefix dropped) and the `diaropt.parity_flag` tag.")
    doc.table(shown.rename(columns={n: n.removeprefix("parity_") for n in PARITY_METRICS}))

    doc.heading("Notes")
    doc.bullets([
        "DER metrics are fractions in MLflow; this report shows percent. The tolerance "
        f"{selection.tolerance:g} is {100 * selection.tolerance:.2f} DER points.",
        "RTFx = audio seconds / processing seconds (compile, audio decoding and every stage), median over repeats.",
        "Runs tagged `diaropt.timings_comparable = false` reused cached network outputs: their timings are not "
        "comparable and they are never recommended.",
        f"The recommended child is tagged `{TAG_RECOMMENDED} = true` in MLflow (filter: "
        f"`tags.\"{TAG_RECOMMENDED}\" = 'true'`); this report is an artifact of the parent run under `report/`.",
    ])
    preset_text = None
    if rec is not None:
        row = frame[frame["run_id"] == rec["run_id"]].iloc[0]
        name = preset_name(sweep.parent_run_id)
        comment = (f"Recommended by experiments/report.py from {sweep.parent_name!s} (parent run "
                   f"{sweep.parent_run_id}), child run {rec['run_id']}:\nDER {_pct(rec['der'])} %, RTFx "
                   f"{rec['rtfx']:.2f}. Re-run: python experiments/sweep.py experiment={name}")
        preset_text = preset_yaml(row, preset_name(sweep.parent_run_id), comment)
    return Report(doc, selection, preset_name(sweep.parent_run_id) if rec is not None else None, preset_text)


def publish(sweep: Sweep, selection: Selection, out_dir: Path) -> None:
    """Log ``out_dir`` as the parent's ``report/`` artifacts and tag the recommended child (only it)."""
    client = MlflowClient(sweep.tracking_uri)
    retry_locked(client.log_artifacts, sweep.parent_run_id, str(out_dir), "report")
    for run_id, tag in zip(sweep.runs["run_id"], _column(sweep.runs, f"tags.{TAG_RECOMMENDED}")):
        if tag == "true" and run_id != selection.recommended_run_id:
            retry_locked(client.delete_tag, run_id, TAG_RECOMMENDED)
    if selection.recommended_run_id is not None:
        retry_locked(client.set_tag, selection.recommended_run_id, TAG_RECOMMENDED, "true")
    retry_locked(client.set_tag, sweep.parent_run_id, TAG_RECOMMENDED_RUN, selection.recommended_run_id or "none")


def make_report(experiment_name: str = "diaropt", parent_run_id: str | None = None, tracking_uri: str | None = None,
                der_tolerance: float = DEFAULT_DER_TOLERANCE, out_dir: Path | None = None,
                allow_unchecked: bool = False, log_to_mlflow: bool = True,
                install: bool = False) -> tuple[Report, dict[str, Path]]:
    """Load, select, render, write (and by default publish to MLflow) the report of one sweep."""
    sweep = load_sweep(experiment_name, parent_run_id, tracking_uri)
    selection = select_recommended(sweep.runs, der_tolerance, allow_unchecked, sweep.axes,
                                   default_axis_values(sweep.axes))
    out_dir = Path(out_dir) if out_dir is not None else REPO_ROOT / "outputs" / "reports" / sweep.parent_run_id
    report = build_report(sweep, selection)
    paths = report.write(out_dir)
    if "preset" in paths:  # re-render with the preset's composition check
        row = sweep.runs[sweep.runs["run_id"] == selection.recommended_run_id].iloc[0]
        try:
            compared, mismatches = compare_preset(paths["preset"], row)
            check = (f"Preset check: `experiment={report.preset_name}` composes to the recommended run's logged "
                     f"configuration ({compared} keys compared)." if not mismatches else
                     "Preset check: composes, but differs from the logged params (the configuration schema may "
                     "have changed since the sweep): " + "; ".join(f"`{m}`" for m in mismatches[:10]))
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            check = f"Preset check FAILED: the preset does not compose: `{type(error).__name__}: {error}`"
        report = build_report(sweep, selection, check)
        paths = report.write(out_dir)
    if log_to_mlflow:
        publish(sweep, selection, out_dir)
    if install and "preset" in paths:
        paths["installed_preset"] = install_preset(paths["preset"])
    return report, paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``experiments/report.py``."""
    parser = argparse.ArgumentParser(prog="experiments/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default="diaropt", help="MLflow experiment name (default diaropt)")
    parser.add_argument("--parent", metavar="RUN_ID", help="parent (multirun) run id; default: the latest one")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns/mlflow.db")
    parser.add_argument("--der-tolerance", type=float, default=DEFAULT_DER_TOLERANCE,
                        help="allowed DER increase over the fp32 baseline, as a fraction (default 0.005 = 0.5 points)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/reports/<parent run id>/)")
    parser.add_argument("--allow-unchecked", action="store_true",
                        help="runs without parity metrics may be recommended")
    parser.add_argument("--install-preset", action="store_true",
                        help="copy the recommended preset to conf/experiment/")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log the report to the parent run nor tag the recommended child")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report, paths = make_report(args.experiment, args.parent, args.tracking_uri, args.der_tolerance, args.out,
                                    args.allow_unchecked, not args.no_mlflow, args.install_preset)
    except (LookupError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.selection.message)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
