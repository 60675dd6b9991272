"""Figures shared by the MLflow layer (a job's timing plot, a sweep's comparison) and the report.

Matplotlib's object API on an Agg canvas: no pyplot global state, safe in worker processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from diaropt.keys import STAGE_ORDER, stage_of


def new_figure(width_in: float, height_in: float) -> Any:
    """A ``matplotlib.figure.Figure`` (constrained layout) on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, independent of pyplot's global backend/state
    return figure


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (``IPython.display.Image(figure_png(fig))`` in a notebook)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def empty(figure: Any, text: str, ax: Any = None) -> Any:
    """``figure`` (or its axes ``ax``) saying ``text`` instead of a plot."""
    ax = ax if ax is not None else figure.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_axis_off()
    return figure


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stage_bars(ax: Any, labels: Sequence[str], stages: Sequence[str], seconds: Any, *,
               totals: Sequence[float] | None = None, spread: tuple[Any, Any] | None = None,
               notes: Sequence[str] | None = None, colors: Sequence[Any] | None = None) -> None:
    """One horizontal bar per label, one segment per stage (``seconds``: (labels, stages), s).

    Each bar is annotated with its total (``totals``, default the sum of its segments) and
    ``notes``; ``spread`` (lo, hi per label, NaN for none) draws the total's min-max.
    """
    import matplotlib

    seconds = np.clip(np.asarray(seconds, dtype=float).reshape(len(labels), len(stages)), 0.0, None)
    totals_s = np.asarray(totals, dtype=float) if totals is not None else seconds.sum(axis=1)
    colors = list(colors or matplotlib.colormaps["tab20"].colors)
    ypos = np.arange(len(labels))
    lefts = np.zeros(len(labels))
    scale = float(np.nanmax(totals_s)) if len(totals_s) and np.isfinite(totals_s).any() else 1.0
    for j, stage in enumerate(stages):
        widths = seconds[:, j]
        if not (widths > 0).any():
            continue
        bars = ax.barh(ypos, widths, left=lefts, color=colors[j % len(colors)], label=stage, height=0.6)
        ax.bar_label(bars, labels=[f"{w:.2f}" if w >= 0.06 * scale else "" for w in widths], label_type="center",
                     fontsize=8)
        lefts += widths
    ends = totals_s.copy()
    if spread is not None:
        lo, hi = (np.asarray(a, dtype=float) for a in spread)
        shown = ~(np.isnan(lo) | np.isnan(hi))
        if shown.any():
            ax.errorbar(totals_s[shown], ypos[shown], xerr=[totals_s[shown] - lo[shown], hi[shown] - totals_s[shown]],
                        fmt="none", ecolor="black", capsize=4, lw=1.2, label="total min-max over repeats")
            ends[shown] = np.maximum(totals_s[shown], hi[shown])
    for i, (end, total) in enumerate(zip(ends, totals_s)):
        ax.text(end, i, f" {total:.2f} s" + (notes[i] if notes else ""), va="center", fontsize=8)
    ax.set_yticks(ypos, labels=[shorten(label, 48) for label in labels], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.margins(x=0.2)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(4, max(1, len(stages))), fontsize=8)


def timing_figure(labels: Sequence[str], stages: Sequence[str], seconds: Any, *, title: str,
                  xlabel: str = "seconds", width_in: float = 9.0, **bars: Any) -> Any:
    """Stacked stage bars (see :func:`stage_bars`, whose keywords ``bars`` are passed on) in a figure."""
    figure = new_figure(width_in, max(2.4, 1.8 + 0.55 * len(labels)))
    if not len(labels) or not len(stages):
        return empty(figure, "no stage timings")
    ax = figure.add_subplot()
    stage_bars(ax, labels, stages, seconds, **bars)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10, pad=30)
    return figure


def job_timing_figure(timings_s: Mapping[str, float | None], title: str = "time per stage") -> Any:
    """A single stacked bar of one job's (finite, positive) stage durations in seconds."""
    stages = [(k, float(v)) for k, v in timings_s.items() if v is not None and math.isfinite(v) and v > 0]
    total_s = sum(s for _, s in stages)
    return timing_figure(["job"] if stages else [], [name for name, _ in stages], [[s for _, s in stages]],
                         title=f"{title} (total {total_s:.2f} s)")


def _stage_columns(frame: pd.DataFrame) -> list[str]:
    """The ``metrics.time_<stage>_s`` columns of a runs frame, in pipeline order (others after, sorted)."""
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    found = [c for c in frame.columns if c.startswith("metrics.") and stage_of(c.removeprefix("metrics."))]
    return sorted(found, key=lambda c: (order.get(stage_of(c.removeprefix("metrics.")), len(order)), c))


def comparison_figure(frame: pd.DataFrame, labels: Sequence[str], x_metric: str, y_metric: str) -> Any:
    """Runs (an ``mlflow.search_runs`` frame) compared: ``y_metric`` vs ``x_metric`` and their stage times."""
    figure = new_figure(15, max(3.5, 1.2 + 0.32 * len(frame)))
    scatter_ax, bar_ax = figure.subplots(1, 2, width_ratios=[1, 1.6])
    xs = pd.to_numeric(frame.get(f"metrics.{x_metric}", pd.Series(np.nan, index=frame.index)), errors="coerce")
    ys = pd.to_numeric(frame.get(f"metrics.{y_metric}", pd.Series(np.nan, index=frame.index)), errors="coerce")
    points = [(x, y, label) for x, y, label in zip(xs, ys, labels) if not (math.isnan(x) or math.isnan(y))]
    if points:
        scatter_ax.scatter([p[0] for p in points], [p[1] for p in points])
        for x, y, label in points:
            scatter_ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    else:
        scatter_ax.text(0.5, 0.5, f"no child has both {x_metric} and {y_metric}", ha="center", va="center",
                        transform=scatter_ax.transAxes)
    scatter_ax.set_xlabel(x_metric)
    scatter_ax.set_ylabel(y_metric)
    scatter_ax.set_title(f"{y_metric} vs {x_metric}", fontsize=9)
    scatter_ax.grid(alpha=0.3)
    columns = _stage_columns(frame)
    if columns:
        seconds = frame[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy()

        def column(name: str) -> np.ndarray:
            return pd.to_numeric(frame.get(f"metrics.{name}", pd.Series(np.nan, index=frame.index)),
                                 errors="coerce").to_numpy(dtype=float)

        # the total as the report gives it: time_total_s, the median over repeats of each repeat's total
        # (not the sum of the per-stage medians), with its min-max; the stage sum where it is missing
        totals, repeats = column("time_total_s"), np.nan_to_num(column("repeats"), nan=1.0)
        totals = np.where(np.isnan(totals), seconds.sum(axis=1), totals)
        spread = tuple(np.where(repeats > 1, column(f"time_total_s_{end}"), np.nan) for end in ("min", "max"))
        stage_bars(bar_ax, list(labels), [stage_of(c.removeprefix("metrics.")) for c in columns], seconds,
                   totals=totals, spread=spread, notes=[f" (median of {int(r)})" if r > 1 else "" for r in repeats])
    else:
        empty(figure, "no time_*_s metrics", bar_ax)
    return figure
