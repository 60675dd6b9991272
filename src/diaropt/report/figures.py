"""The report's figures (Pareto front, timing per configuration, axis effects), drawn with :mod:`diaropt.figures`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from diaropt.figures import empty, new_figure, shorten, timing_figure
from diaropt.report.analysis import STAGE_GROUPS, scored, timing_table
from diaropt.report.load import metric
from diaropt.report.select import Selection

#: One colour per ``STAGE_GROUPS`` category.
_STAGE_COLORS = ("#9e9e9e", "#c7b299", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def pareto_figure(frame: pd.DataFrame, selection: Selection | None = None) -> Any:
    """DER (%) vs RTFx of the finished children: the Pareto front joined, baseline and recommended marked."""
    done = scored(frame)
    if done.empty:
        return empty(new_figure(10, 6), "no finished child with both DER and RTFx")
    x, y = done["rtfx"].to_numpy(), 100 * done["der"].to_numpy()
    crowded = len(done) > 8 or _crowded(x, y)
    if crowded:  # points numbered, labels in a key beside the plot
        figure = new_figure(13.5, max(6.0, 1.5 + 0.22 * len(done)))
        ax, key_ax = figure.subplots(1, 2, width_ratios=[2.3, 1])
    else:
        figure = new_figure(10, 6)
        ax = figure.add_subplot()
    lo, hi = metric(done, "rtfx_min").to_numpy(), metric(done, "rtfx_max").to_numpy()
    spread = ~(np.isnan(lo) | np.isnan(hi)) & (hi > lo)
    if spread.any():
        ax.errorbar(x[spread], y[spread], xerr=[x[spread] - lo[spread], hi[spread] - x[spread]], fmt="none",
                    ecolor="#999999", elinewidth=1, capsize=3, label="RTFx min-max over repeats")
    front = done["on_front"].to_numpy(dtype=bool)
    rankable = done["rankable"].to_numpy(dtype=bool)
    flagged = (done["parity"] == "flagged").to_numpy(dtype=bool)
    unranked = ~rankable & ~flagged
    dominated = rankable & ~front
    if dominated.any():
        ax.scatter(x[dominated], y[dominated], s=55, color="#aaaaaa", zorder=3, label="dominated")
    if flagged.any():
        ax.scatter(x[flagged], y[flagged], marker="x", s=80, color="#d62728", zorder=3,
                   label="parity flagged (never on the front)")
    if unranked.any():
        ax.scatter(x[unranked], y[unranked], marker="^", s=70, facecolors="none", edgecolors="#8c564b", zorder=3,
                   label="timing proxy / not target (not ranked by speed)")
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
                   zorder=5, label=f"baseline ({shorten(str(base['label']), 30)})")
    if selection is not None and selection.recommended is not None:
        rec = selection.recommended
        ax.scatter([rec["rtfx"]], [100 * rec["der"]], marker="*", s=380, color="#d62728", zorder=6,
                   label="recommended")
    for number, (label, xi, yi, on) in enumerate(zip(done["label"], x, y, front), 1):
        ax.annotate(str(number) if crowded else shorten(label, 40), (xi, yi), xytext=(5, 4),
                    textcoords="offset points", fontsize=9, fontweight="bold" if on else "normal")
    if crowded:
        key_ax.set_axis_off()
        lines = [f"{n:>2}{'*' if on else ' '} {shorten(label, 44)}"
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


def sweep_timing_figure(frame: pd.DataFrame) -> Any:
    """One horizontal stacked bar per finished child (stage categories); min-max of the total over repeats."""
    table = timing_table(frame)
    table = table[table["total"].notna()].sort_values("total")
    repeats = table["repeats"].to_numpy()
    lo = np.where(repeats > 1, table["total_min"].to_numpy(), np.nan)
    hi = np.where(repeats > 1, table["total_max"].to_numpy(), np.nan)
    return timing_figure(list(table["label"]), list(STAGE_GROUPS), table[list(STAGE_GROUPS)].to_numpy(),
                         title="Where the time goes, per configuration", width_in=11,
                         xlabel="seconds for the whole evaluation set (warm-up excluded)",
                         totals=table["total"].to_numpy(), spread=(lo, hi), colors=_STAGE_COLORS,
                         notes=[f" (median of {r})" if r > 1 else "" for r in repeats])


def axis_effects_figure(effects: pd.DataFrame) -> Any:
    """Per axis: median RTFx and median DER (%) for each value, side by side."""
    axes = list(dict.fromkeys(effects["axis"])) if len(effects) else []
    if not axes:
        return empty(new_figure(10, 2.5), "no swept axis with finished runs")
    figure = new_figure(11, 1.2 + sum(0.5 * max(2, (effects["axis"] == a).sum()) + 0.6 for a in axes))
    grid = figure.subplots(len(axes), 2, squeeze=False)
    for (left, right), axis in zip(grid, axes):
        part = effects[effects["axis"] == axis]
        ypos = np.arange(len(part))
        labels = [f"{v} (n={n})" for v, n in zip(part["value"], part["runs"])]
        panels = ((left, "rtfx_median", 1, "#1f77b4", "median RTFx (higher is faster)"),
                  (right, "der_median", 100, "#d62728", "median DER % (lower is better)"))
        for ax, column, scale, color, title in panels:
            values = scale * part[column].to_numpy(dtype=float)
            bars = ax.barh(ypos, np.nan_to_num(values), color=color, height=0.55)
            # RTFx is NaN for a value with no run timed by its own engine (proxy / not measured)
            ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "not timed by its own engine"
                                       for v in values], padding=3, fontsize=9)
            ax.set_yticks(ypos, labels=labels if ax is left else [""] * len(labels), fontsize=10)
            ax.invert_yaxis()
            ax.margins(x=0.2)
            ax.set_title(f"{axis}: {title}", fontsize=10)
            ax.tick_params(axis="x", labelsize=9)
            ax.grid(axis="x", alpha=0.3)
    figure.suptitle("Effect of each swept axis (medians over the runs with that value)", fontsize=12)
    return figure
