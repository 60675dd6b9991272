"""The selection rule: the fp32 baseline, and the fastest child within the DER tolerance whose parity passed."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from diaropt.keys import DER_METRIC, RTFX_METRIC, TAG_OVERRIDES, TAG_SKIP_REASON, TAG_TIMINGS_COMPARABLE
from diaropt.report.load import annotate, comparable_timings, parse_overrides, swept_axes

log = logging.getLogger(__name__)

#: 0.5 DER points; DER metrics are fractions.
DEFAULT_DER_TOLERANCE = 0.005


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


def _quant_mode(row: Mapping[str, object]) -> str | None:
    for key in ("params.quant.mode", "tags.axis.quant"):
        value = row.get(key)
        if isinstance(value, str):
            return value
    return None


def choose_baseline(frame: pd.DataFrame, axes: Sequence[str], defaults: Mapping[str, str]) -> tuple[str | None, str]:
    """(run id, how it was chosen) of the fp32 baseline: the finished fp32 child with the default value
    of every other swept axis (best DER among those), else the best-DER fp32 child, else None (no fp32
    child: the note says so)."""
    usable = frame[(frame["outcome"] == "finished") & frame["der"].notna()]
    if usable.empty:
        return None, "no finished child has a DER: there is no baseline"
    fp32 = usable[[_quant_mode(r) == "fp32" for r in usable.to_dict("records")]]
    if fp32.empty:  # never silently another child: the DER tolerance and speed-ups need an fp32 reference
        return None, ("there is none: no finished fp32 child in this sweep (add quant=fp32 to the sweep, e.g. "
                      "`-m quant=fp32,fp16,int8`, to get one); no configuration is ranked against another")
    others = [a for a in axes if a != "quant"]

    def is_default(row: Mapping[str, object]) -> bool:
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
    #: a recommendation's caveat (its speed lead unchecked against run-to-run spread), "" without one
    caveat: str = ""

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


def _verdict(row: Mapping[str, object], baseline: Mapping[str, object] | None, tolerance: float,
             allow_unchecked: bool) -> str:
    """Why a child is not eligible ("" if it is). Speed is only compared among ``target`` timings of
    the baseline's engine, host and ONNX Runtime optimization levels (``load.comparable_timings``)."""
    der, rtfx = row["der"], row["rtfx"]
    if row["outcome"] != "finished":
        skip = row.get(f"tags.{TAG_SKIP_REASON}")
        return str(row["outcome"]) + (f": {skip}" if isinstance(skip, str) and skip else "")
    if math.isnan(der):
        return f"no {DER_METRIC}"
    if baseline is None:  # say too what would keep it out with one: a proxy timing is never ranked by speed
        also = ["parity flagged"] if row["parity"] == "flagged" else []
        source = row.get("timing_source", "unrecorded")
        if source != "target":
            also.append(f"timing {source}: not ranked by speed")
        return ", ".join(["no baseline", *also])
    base_der = float(baseline["der"])
    if der > base_der + tolerance + 1e-12:
        return f"DER {100 * (der - base_der):+.2f} pts vs baseline (tolerance {100 * tolerance:.2f})"
    if row["parity"] == "flagged":
        flag = row.get("parity_flag")
        return f"parity flagged ({flag})" if isinstance(flag, str) and flag else "parity flagged (parity_ok=0)"
    if row["parity"] == "unchecked" and row["run_id"] != baseline["run_id"] and not allow_unchecked:
        return "parity not checked"
    source = row.get("timing_source", "unrecorded")
    if source != "target":
        return f"timing {source}: not ranked by speed"
    if math.isnan(rtfx):
        return f"no {RTFX_METRIC}"
    if not comparable_timings(row, baseline):
        return f"timed on {row.get('timing_group')}, baseline on {baseline.get('timing_group')}: not comparable"
    if row.get(f"tags.{TAG_TIMINGS_COMPARABLE}") == "false":
        return "timings not comparable (array cache)"
    return ""


def inside_spread(faster: Mapping[str, object], slower: Mapping[str, object]) -> bool | None:
    """Whether ``faster``'s RTFx advantage over ``slower`` is inside the measured spread over repeats
    (``faster``'s ``rtfx_min`` <= ``slower``'s ``rtfx_max``); None when either spread was not measured:
    no min/max logged, or one timed pass (``repeats`` 1: a sweep job logs min = max = its one RTFx)."""
    for run in (faster, slower):
        repeats = run.get("metrics.repeats")
        if isinstance(repeats, float) and not math.isnan(repeats) and repeats < 2:
            return None
    lo, hi = faster.get("metrics.rtfx_min"), slower.get("metrics.rtfx_max")
    if not (isinstance(lo, float) and isinstance(hi, float)) or math.isnan(lo) or math.isnan(hi):
        return None
    return lo <= hi


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
    records = {r["run_id"]: r for r in frame.to_dict("records")}
    baseline = records.get(baseline_id) if baseline_id else None
    base_der = float(baseline["der"]) if baseline is not None else math.nan
    rows = []
    for row in records.values():
        reason = _verdict(row, baseline, tolerance, allow_unchecked)
        rows.append({"run_id": row["run_id"], "label": row["label"], "outcome": row["outcome"], "der": row["der"],
                     "der_delta": row["der"] - base_der, "rtfx": row["rtfx"], "parity": row["parity"],
                     "timing_source": row.get("timing_source", "unrecorded"),
                     "is_baseline": row["run_id"] == baseline_id, "eligible": not reason, "reason": reason})
    candidates = pd.DataFrame(rows, columns=["run_id", "label", "outcome", "der", "der_delta", "rtfx", "parity",
                                             "timing_source", "is_baseline", "eligible", "reason"])
    recommended = _best(candidates[candidates["eligible"]])
    alternative = _best(candidates[candidates["eligible"] | (candidates["reason"] == "parity not checked")])
    spread_note = ""
    if recommended is not None and recommended != baseline_id and baseline is not None:
        within = inside_spread(records[recommended], baseline)
        label = records[recommended]["label"]
        if within:
            spread_note = (f"`{label}`'s RTFx advantage over the baseline is inside the measured min-max spread "
                           "over repeats: not a win, so no configuration is preferred to the baseline")
            candidates.loc[candidates["run_id"] == recommended, ["eligible", "reason"]] = (
                False, "RTFx advantage inside the measured spread over repeats")
            recommended = None
        elif within is None:
            spread_note = (f"no spread over repeats was measured for `{label}` or the baseline (repeats=1): "
                           "its speed advantage is not checked against run-to-run noise")
    if recommended is not None:
        best = candidates[candidates["run_id"] == recommended].iloc[0]
        message = (f"recommended: {best['label']} (run {recommended}): RTFx {best['rtfx']:.2f}, "
                   f"DER {100 * best['der']:.2f} % ({100 * best['der_delta']:+.2f} pts vs baseline)")
        if spread_note:
            message += f"; {spread_note}"
    elif spread_note:
        message = f"no configuration qualifies: {spread_note}"
    elif baseline_id is None:
        message = f"no configuration qualifies: without a baseline nothing is ranked (baseline: {note})"
    else:
        message = (f"no configuration qualifies: none of the {len(candidates)} children is finished, within "
                   f"{100 * tolerance:.2f} DER points of the baseline, parity-clean and timed by its own engine "
                   "comparably with the baseline")
    return Selection(baseline_id, note, recommended, tolerance, allow_unchecked, candidates, message,
                     alternative if alternative != recommended else None,
                     caveat=spread_note if recommended is not None else "")


def _best(candidates: pd.DataFrame) -> str | None:
    if candidates.empty:
        return None
    return str(candidates.sort_values(["rtfx", "der"], ascending=[False, True]).iloc[0]["run_id"])
