"""Making a report end to end (load, select, render, write, publish to MLflow) and its command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient

from diaropt.config import REPO_ROOT
from diaropt.quiet import quiet_third_party
from diaropt.keys import TAG_RECOMMENDED, TAG_RECOMMENDED_RUN
from diaropt.report.load import Sweep, column, load_sweep
from diaropt.report.preset import install_preset, preset_check
from diaropt.report.render import Report, build_report
from diaropt.report.select import DEFAULT_DER_TOLERANCE, Selection, default_axis_values, select_recommended
from diaropt.tracking import retry_locked


def publish(sweep: Sweep, selection: Selection, out_dir: Path) -> None:
    """Log ``out_dir`` as the parent's ``report/`` artifacts and tag the recommended child (only it)."""
    client = MlflowClient(sweep.tracking_uri)
    retry_locked(client.log_artifacts, sweep.parent_run_id, str(out_dir), "report")
    for run_id, tag in zip(sweep.runs["run_id"], column(sweep.runs, f"tags.{TAG_RECOMMENDED}")):
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
        report = build_report(sweep, selection, preset_check(paths["preset"], row, report.preset_name))
        paths = report.write(out_dir)
    if log_to_mlflow:
        publish(sweep, selection, out_dir)
    if install and "preset" in paths:
        paths["installed_preset"] = install_preset(paths["preset"])
    return report, paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``experiments/report.py``."""
    quiet_third_party()
    parser = argparse.ArgumentParser(prog="experiments/report.py", description="Team review of one sweep, read "
                                     "from MLflow: recommendation, Pareto front, timing breakdown, axis effects, parity.")
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
