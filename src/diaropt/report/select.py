"""The selection rule: the fp32 baseline, and the fastest child within the DER tolerance whose parity passed."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from diaropt.keys import DER_METRIC, RTFX_METRIC, TAG_OVERRIDES, TAG_SKIP_REASON, TAG_TIMINGS_COMPARABLE
from diaropt.report.load import annotate, parse_overrides, swept_axes

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
    of every other swept axis (best DER among those), else the best-DER fp32 child, else the best-DER child."""
    usable = frame[(frame["outcome"] == "finished") & frame["der"].notna()]
    if usable.empty:
        return None, "no finished child has a DER: there is no baseline"
    fp32 = usable[[_quant_mode(r) == "fp32" for r in usable.to_dict("records")]]
    if fp32.empty:
        best = usable.sort_values(["der", "rtfx"], ascending=[True, False]).iloc[0]
        return best["run_id"], "the child with the best DER: this sweep has no finished fp32 child"
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


def _verdict(row: Mapping[str, object], baseline_id: str | None, base_der: float, tolerance: float,
             allow_unchecked: bool) -> str:
    """Why a child is not eligible ("" if it is)."""
    der, rtfx = row["der"], row["rtfx"]
    if row["outcome"] != "finished":
        skip = row.get(f"tags.{TAG_SKIP_REASON}")
        return str(row["outcome"]) + (f": {skip}" if isinstance(skip, str) and skip else "")
    if math.isnan(der):
        return f"no {DER_METRIC}"
    if math.isnan(rtfx):
        return f"no {RTFX_METRIC}"
    if baseline_id is None:
        return "no baseline"
    if der > base_der + tolerance + 1e-12:
        return f"DER {100 * (der - base_der):+.2f} pts vs baseline (tolerance {100 * tolerance:.2f})"
    if row["parity"] == "flagged":
        flag = row.get("parity_flag")
        return f"parity flagged ({flag})" if isinstance(flag, str) and flag else "parity flagged (parity_ok=0)"
    if row["parity"] == "unchecked" and row["run_id"] != baseline_id and not allow_unchecked:
        return "parity not checked"
    if row.get(f"tags.{TAG_TIMINGS_COMPARABLE}") == "false":
        return "timings not comparable (array cache)"
    return ""


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
        reason = _verdict(row, baseline_id, base_der, tolerance, allow_unchecked)
        rows.append({"run_id": row["run_id"], "label": row["label"], "outcome": row["outcome"], "der": row["der"],
                     "der_delta": row["der"] - base_der, "rtfx": row["rtfx"], "parity": row["parity"],
                     "is_baseline": row["run_id"] == baseline_id, "eligible": not reason, "reason": reason})
    candidates = pd.DataFrame(rows, columns=["run_id", "label", "outcome", "der", "der_delta", "rtfx", "parity",
                                             "is_baseline", "eligible", "reason"])
    recommended = _best(candidates[candidates["eligible"]])
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
