"""Team review of one sweep: recommendation, Pareto front, timing breakdown, axis effects, parity.

Everything is read from MLflow (``mlflow.search_runs``), so a report can be made from any
tracking store a sweep logged to::

    python experiments/report.py                      # the latest sweep of experiment "diaropt"
    python experiments/report.py diaropt --parent RUN_ID --der-tolerance 0.005

Selection rule (``select_recommended``): among the sweep's finished, non-skipped children, the
highest RTFx whose DER (``der_pyannote``, a fraction) is at most the fp32 baseline's DER plus the
tolerance and whose parity check passed (``parity_ok == 1``). A child without parity metrics was
not checked: it is eligible only if it is the baseline itself or ``allow_unchecked`` is set. A child
whose timings came from the array cache (``diaropt.timings_comparable = false``) is not eligible.

| module | owns |
|---|---|
| ``load``     | reading a sweep's children from MLflow; axes, labels, outcomes, parity status |
| ``select``   | the baseline and the selection rule (``Selection``) |
| ``analysis`` | Pareto front, per-axis effects, timing and parity tables, the reproduce command |
| ``preset``   | the recommended child as a Hydra preset, checked by composing it |
| ``figures``  | the report's figures (drawn with :mod:`diaropt.figures`, shared with the MLflow layer) |
| ``render``   | one function per section, rendered to Markdown/HTML by the Jinja2 templates in ``templates/`` |
| ``cli``      | ``make_report`` (load, select, render, write, publish) and ``experiments/report.py``'s command line |

``notebooks/compare_runs.ipynb`` runs the same analysis interactively with these functions.
"""

from __future__ import annotations

from diaropt.figures import figure_png
from diaropt.report.analysis import (STAGE_GROUPS, axis_effects, pareto_front, parity_table, reproduce_command,
                                     scored, timing_table)
from diaropt.report.cli import main, make_report, publish
from diaropt.report.figures import axis_effects_figure, pareto_figure, sweep_timing_figure
from diaropt.report.load import (Sweep, annotate, axis_value, latest_parent, load_sweep, open_client, parity_status,
                                 parse_overrides, swept_axes)
from diaropt.report.preset import compare_preset, install_preset, preset_check, preset_name, preset_yaml
from diaropt.report.render import Document, Report, Section, build_report
from diaropt.report.select import (DEFAULT_DER_TOLERANCE, Selection, choose_baseline, default_axis_values,
                                   select_recommended)

__all__ = ["DEFAULT_DER_TOLERANCE", "STAGE_GROUPS", "Document", "Report", "Section", "Selection", "Sweep", "annotate",
           "axis_effects", "axis_effects_figure", "axis_value", "build_report", "choose_baseline", "compare_preset",
           "default_axis_values", "figure_png", "install_preset", "latest_parent", "main", "make_report",
           "open_client", "pareto_figure", "pareto_front", "parity_status", "parity_table", "parse_overrides",
           "preset_check", "preset_name", "preset_yaml", "publish", "reproduce_command", "scored",
           "select_recommended", "swept_axes", "sweep_timing_figure", "timing_table"]
