"""``relog``: store the runs kept in fallback folders in MLflow; ``python -m diaropt.tracking relog``."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from diaropt.keys import SUMMARY_METRICS, SUMMARY_PARAMS, TAG_PARENT, TAG_RELOGGED_FROM, TAG_ROLE
from diaropt.tracking.experiment import Tracker
from diaropt.tracking.fallback import fallback_runs, write_json_atomic
from diaropt.tracking.flatten import str_tags
from diaropt.tracking.store import TrackingUnavailable, retry_locked

log = logging.getLogger(__name__)


def relog(folder: Path, tracking_uri: str | None = None, experiment_name: str | None = None) -> str | None:
    """Store one fallback run folder in MLflow; returns the run id (None if it was relogged before).

    The run continues its store run (if it had one and that run exists) or is created, under its
    sweep's parent (found by sweep id, or created and ended FINISHED). Params already in the run with
    the same value are skipped. Writes ``relogged.json``, so running it twice stores nothing twice.
    """
    folder = Path(folder)
    done = folder / "relogged.json"
    if done.is_file():
        log.info("%s: already relogged as run %s", folder, json.loads(done.read_text())["run_id"])
        return None
    meta = json.loads((folder / "run.json").read_text())
    params = json.loads((folder / "params.json").read_text())
    tags = json.loads((folder / "tags.json").read_text())
    metrics = []
    if (folder / "metrics.jsonl").is_file():
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    uri = tracking_uri or meta["tracking_uri"]
    tracker = Tracker(uri, experiment_name or meta["experiment_name"])
    client = tracker.client
    run_id = meta.get("existing_run_id")
    if run_id:
        try:
            existing = retry_locked(client.get_run, run_id)
        except MlflowException:
            existing = None
        run_id = run_id if existing is not None else None
    relogged_from = {TAG_RELOGGED_FROM: str(folder.resolve())}
    if run_id is None:
        parent_id = None
        if meta.get("sweep_id"):
            parent_id = tracker.find_parent(meta["sweep_id"])
            if parent_id is None:
                parent_id = tracker.get_or_create_parent(meta["sweep_id"], meta.get("parent_tags") or {})
                tracker.finish_parent(parent_id, "FINISHED")
        all_tags = {**tags, **relogged_from, TAG_ROLE: "child" if parent_id else tags.get(TAG_ROLE, "single")}
        if parent_id:
            all_tags[TAG_PARENT] = parent_id
        run = retry_locked(client.create_run, tracker.experiment_id, start_time=meta.get("start_time_ms"),
                           tags=str_tags(all_tags), run_name=meta.get("run_name"))
        run_id = run.info.run_id
        existing_params: dict[str, str] = {}
    else:
        existing_params = dict(retry_locked(client.get_run, run_id).data.params)
        retry_locked(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in str_tags({**tags, **relogged_from}).items()])
    # MlflowClient.log_batch splits the lists into batches within the store's limits
    retry_locked(client.log_batch, run_id, params=[Param(k, v) for k, v in params.items() if existing_params.get(k) != v],
                 metrics=[Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in metrics])
    artifacts = folder / "artifacts"
    if artifacts.is_dir() and any(artifacts.iterdir()):
        retry_locked(client.log_artifacts, run_id, str(artifacts))
    status = meta.get("status") or "FAILED"
    if status == "RUNNING":  # the job died before ending its run
        status = "KILLED"
    retry_locked(client.set_terminated, run_id, status, meta.get("end_time_ms"))
    write_json_atomic(done, {"run_id": run_id, "tracking_uri": uri, "time_ms": int(time.time() * 1000)})
    return run_id


def main(argv: list[str] | None = None) -> int:
    """``python -m diaropt.tracking relog DIR... [--tracking-uri URI] [--experiment NAME]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diaropt.tracking",
                                     description="Store results kept in tracking_fallback/ folders in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    relog_parser = sub.add_parser("relog", help="log fallback run folders (searched recursively) to MLflow")
    relog_parser.add_argument("paths", nargs="+", type=Path)
    relog_parser.add_argument("--tracking-uri", default=None, help="default: the URI each run was meant for")
    relog_parser.add_argument("--experiment", default=None, help="default: the experiment each run was meant for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    folders = fallback_runs(args.paths)
    if not folders:
        print(f"no fallback run under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    failures = 0
    sweeps: set[tuple[str, str, str]] = set()  # (tracking URI, experiment, sweep id) to summarise again
    for folder in folders:
        try:
            run_id = relog(folder, args.tracking_uri, args.experiment)
        except (TrackingUnavailable, MlflowException, OSError, ValueError, KeyError) as error:
            print(f"{folder}: not relogged: {error}", file=sys.stderr)
            failures += 1
            continue
        print(f"{folder}: {'already relogged' if run_id is None else f'run {run_id}'}")
        meta = json.loads((folder / "run.json").read_text())
        if run_id is not None and meta.get("sweep_id"):
            sweeps.add((args.tracking_uri or meta["tracking_uri"], args.experiment or meta["experiment_name"],
                        meta["sweep_id"]))
    for uri, experiment, sweep_id in sorted(sweeps):
        try:
            tracker = Tracker(uri, experiment)
            closed = tracker.close_stale_runs(include_parents=True)  # e.g. the parent of a killed sweep
            if closed:
                print(f"closed {closed} run(s) left RUNNING by a dead process (KILLED)")
            parent_id = tracker.find_parent(sweep_id)
            if parent_id is not None:
                tracker.summarize_parent(parent_id, SUMMARY_METRICS, SUMMARY_PARAMS)
        except Exception as error:  # noqa: BLE001 - the runs are stored; the summary is a convenience
            print(f"sweep {sweep_id}: parent summary not updated: {error}", file=sys.stderr)
    return 1 if failures else 0
