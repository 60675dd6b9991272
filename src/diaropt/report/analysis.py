"""Analyses of an annotated sweep frame: Pareto front, per-axis effects, timing and parity tables."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from diaropt.keys import PARITY_METRICS, TAG_OVERRIDES, overrides_from_tag, TIME_TOTAL, time_metric
from diaropt.report.load import axis_value, metric, present

#: Categories of the timing breakdown and the ``time_<stage>_s`` metrics each one adds up.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "compile": ("compile",), "audio": ("audio",), "segmentation": ("segmentation",),
    "preprocessing+embedding": ("preprocessing", "embedding"), "clustering": ("clustering",),
    "postprocess": ("postprocess",),
}


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
    """Finished children with both DER and RTFx, plus ``rankable`` (timing source ``target`` and parity
    not flagged) and ``on_front`` (the Pareto front of the rankable ones only: a proxy timing or a
    parity-flagged run is never on it)."""
    done = frame[(frame["outcome"] == "finished") & frame["der"].notna() & frame["rtfx"].notna()].copy()
    source = done["timing_source"] if "timing_source" in done.columns else pd.Series("target", index=done.index)
    done["rankable"] = (source == "target") & (done["parity"] != "flagged")
    front = np.zeros(len(done), dtype=bool)
    rankable = done["rankable"].to_numpy(dtype=bool)
    if rankable.any():
        front[rankable] = pareto_front(done["der"][rankable], done["rtfx"][rankable])
    done["on_front"] = front
    return done


def _timing_source(frame: pd.DataFrame) -> pd.Series:
    return frame["timing_source"] if "timing_source" in frame.columns else pd.Series("target", index=frame.index)


def axis_effects(frame: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Per swept axis and value: runs, median DER and median RTFx (marginal over the other axes); the RTFx
    median is over the runs whose timings are the target's own only (``timed_runs``): a proxy timing
    is not that configuration's speed, so it is never set beside one (NaN when no run is ``target``)."""
    done = scored(frame)
    rows = []
    for axis in axes:
        values = [axis_value(r, axis) for r in done.to_dict("records")]
        groups = pd.Series(values, index=done.index).fillna("(default)")
        for value, index in groups.groupby(groups, sort=False).groups.items():
            part = done.loc[index]
            timed = part[_timing_source(part) == "target"]
            rows.append({"axis": axis, "value": value, "runs": len(part), "timed_runs": len(timed),
                         "rtfx_median": timed["rtfx"].median(), "der_median": part["der"].median()})
    return pd.DataFrame(rows, columns=["axis", "value", "runs", "timed_runs", "rtfx_median", "der_median"])


def timing_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds per stage category (``STAGE_GROUPS``), total and its min/max over repeats, per finished child."""
    done = frame[frame["outcome"] == "finished"]
    rows = []
    for row, source in zip(done.to_dict("records"), _timing_source(done)):
        # as the parent run's summary/comparison.png labels it: a proxy's seconds are not the configuration's
        label = row["label"] + (f" [timing {source}]" if isinstance(source, str) and source != "target" else "")
        entry: dict[str, Any] = {"run_id": row["run_id"], "label": label}
        for group, stages in STAGE_GROUPS.items():
            values = [row.get(f"metrics.{time_metric(s)}") for s in stages]
            entry[group] = sum(float(v) for v in values if present(v))
        for key, name in (("total", TIME_TOTAL), ("total_min", f"{TIME_TOTAL}_min"), ("total_max", f"{TIME_TOTAL}_max")):
            value = row.get(f"metrics.{name}")
            entry[key] = float(value) if present(value) else math.nan
        repeats = row.get("metrics.repeats")
        entry["repeats"] = int(repeats) if present(repeats) else 1
        rows.append(entry)
    return pd.DataFrame(rows, columns=["run_id", "label", *STAGE_GROUPS, "total", "total_min", "total_max",
                                       "repeats"])


def parity_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The parity metrics and flag of every child (NaN / empty where not checked)."""
    table = frame[["run_id", "label", "outcome", "parity"]].copy()
    for name in PARITY_METRICS:
        table[name] = metric(frame, name)
    table["flag"] = frame["parity_flag"].where(frame["parity_flag"].notna(), "")
    return table


def reproduce_command(row: Mapping[str, Any]) -> str:
    """``python experiments/sweep.py <overrides>`` of a child (its ``diaropt.overrides`` tag, no ``hydra.*``)."""
    text = row.get(f"tags.{TAG_OVERRIDES}")
    items = overrides_from_tag(text)
    items = [o for o in items if not o.lstrip("+").startswith(("hydra.", "hydra/"))]
    return " ".join(["python", "experiments/sweep.py", *(shlex.quote(o) for o in items)])
