"""The sweeps' experiment: parent runs (one per multirun), child runs, their summary, stale runs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock
from mlflow.entities import Run

from diaropt.figures import comparison_figure, shorten
from diaropt.keys import (TAG_CLOSED_REASON, TAG_ERROR_TYPE, TAG_HOST, TAG_OVERRIDES, TAG_PARENT, TAG_PID,
                          TAG_PID_START, TAG_ROLE, TAG_SKIP_REASON, TAG_SKIPPED, TAG_SWEEP_ID, TAG_SWEEP_KEY,
                          overrides_from_tag)
from diaropt.tracking.flatten import str_tags, truncate
from diaropt.tracking.host import hostname, pid_alive, process_tags
from diaropt.tracking.run import TERMINAL_STATUSES, JobRun
from diaropt.tracking.store import (LOCK_TIMEOUT_S, MAX_RUN_NAME_CHARS, MAX_TAG_VALUE_CHARS, Store, check_run_id,
                                    retry_locked)

log = logging.getLogger(__name__)

_OUTCOMES = ("finished", "failed", "skipped", "killed", "running")


def job_overrides(overrides: Iterable[str]) -> list[str]:
    """The Hydra overrides that identify a job: all but ``resume=...`` (also ``+``/``++`` forms)."""
    return [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "resume"]


def outcome(status: Any, skipped_tag: Any) -> str:
    """finished / skipped / failed / killed / running, from a run's status and ``diaropt.skipped`` tag."""
    if status == "FINISHED":
        return "skipped" if skipped_tag == "true" else "finished"
    return {"FAILED": "failed", "KILLED": "killed", "RUNNING": "running"}.get(str(status), str(status).lower())


def _run_outcome(run: Run) -> str:
    return outcome(run.info.status, run.data.tags.get(TAG_SKIPPED))


class Tracker(Store):
    """The MLflow experiment of the sweeps (see :class:`Store` for opening it)."""

    def children(self, parent_run_id: str) -> list[Run]:
        """The child runs of a parent, oldest first."""
        return self.search(self._children_filter(parent_run_id), order_by=["attributes.start_time ASC"])

    @staticmethod
    def _children_filter(parent_run_id: str) -> str:
        return f"tags.`{TAG_PARENT}` = '{check_run_id(parent_run_id)}'"

    def find_parent(self, sweep_id: str) -> str | None:
        """The parent run of a sweep (the oldest if several exist), or None."""
        key = hashlib.sha1(sweep_id.encode()).hexdigest()
        runs = self.search(f"tags.`{TAG_SWEEP_KEY}` = '{key}'", order_by=["attributes.start_time ASC"])
        runs = [r for r in runs if r.data.tags.get(TAG_SWEEP_ID) == truncate(sweep_id, MAX_TAG_VALUE_CHARS)]
        return runs[0].info.run_id if runs else None

    def find_finished_child(self, parent_run_id: str, overrides: list[str]) -> str | None:
        """A FINISHED, not skipped child with the same Hydra overrides (tag ``diaropt.overrides``).

        ``resume=...`` is not part of a job's identity: a sweep re-run with ``resume=true`` finds
        the children of the interrupted run.
        """
        wanted = job_overrides(overrides)
        for run in self.children(parent_run_id):
            if _run_outcome(run) == "finished" and job_overrides(overrides_from_tag(run.data.tags.get(TAG_OVERRIDES))) == wanted:
                return run.info.run_id
        return None

    # --- runs ---------------------------------------------------------------------------------

    def get_or_create_parent(self, sweep_id: str, tags: Mapping[str, Any] | None = None,
                             run_name: str | None = None) -> str:
        """The RUNNING parent run of a sweep, created by the first caller.

        Safe across processes on this host: creation is serialized by a file lock and re-checked
        inside it. A parent found terminated (a resumed sweep) is set back to RUNNING.
        """
        parent_id = self.find_parent(sweep_id)
        if parent_id is None:
            key = hashlib.sha1(sweep_id.encode()).hexdigest()
            with FileLock(str(self.lock_dir / f"parent-{key[:16]}.lock"), timeout=LOCK_TIMEOUT_S):
                parent_id = self.find_parent(sweep_id)
                if parent_id is None:
                    name = run_name or "sweep " + "/".join(Path(sweep_id).parts[-2:])
                    all_tags = {**(tags or {}), **process_tags(), TAG_SWEEP_ID: sweep_id, TAG_SWEEP_KEY: key,
                                TAG_ROLE: "parent"}
                    run = retry_locked(self.client.create_run, self.experiment_id,
                                       run_name=name[:MAX_RUN_NAME_CHARS], tags=str_tags(all_tags))
                    return run.info.run_id
        run = retry_locked(self.client.get_run, parent_id)
        if run.info.status != "RUNNING":
            log.info("re-opening parent run %s of sweep %s", parent_id, sweep_id)
            retry_locked(self.client.update_run, parent_id, status="RUNNING")
            if TAG_CLOSED_REASON in run.data.tags:
                retry_locked(self.client.delete_tag, parent_id, TAG_CLOSED_REASON)
        return parent_id

    def start_child(self, run_name: str, parent_run_id: str | None, tags: Mapping[str, Any] | None = None) -> JobRun:
        """A RUNNING run, nested under ``parent_run_id`` (None: a standalone run)."""
        all_tags = {**(tags or {}), **process_tags(), TAG_ROLE: "child" if parent_run_id else "single"}
        if parent_run_id:
            all_tags[TAG_PARENT] = check_run_id(parent_run_id)
        run = retry_locked(self.client.create_run, self.experiment_id, run_name=run_name[:MAX_RUN_NAME_CHARS],
                           tags=str_tags(all_tags))
        return JobRun(self.client, run.info.run_id, run.info.run_name)

    def finish_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        retry_locked(self.client.set_terminated, parent_run_id, status)

    def summarize_parent(self, parent_run_id: str, metric_keys: list[str], param_keys: list[str],
                         x_metric: str = "rtfx", y_metric: str | None = None) -> pd.DataFrame:
        """Compare the children on the parent run; returns the table (one row per child).

        Logs ``summary/children.json`` (MLflow table) and ``summary/children.csv``, the plot
        ``summary/comparison.png`` (``x_metric`` vs ``y_metric`` -- by default the first ``der*``
        metric key -- and the stacked ``time_*_s`` stages per child), and the parent metrics
        ``num_children``, ``num_finished``, ``num_failed``, ``num_skipped``, ``num_killed``,
        ``num_running``.
        """
        runs = self.frame(self._children_filter(parent_run_id), order_by=["attributes.start_time ASC"])
        table = children_table(runs, metric_keys, param_keys)
        parent = JobRun(self.client, parent_run_id)
        parent.log_metrics({"num_children": len(table),
                            **{f"num_{o}": int((table["outcome"] == o).sum()) for o in _OUTCOMES}})
        if len(table):
            parent.log_table(table.to_dict("records"), "summary/children.json")
        parent.log_text(table.to_csv(index=False), "summary/children.csv")
        if len(table):
            if y_metric is None:
                y_metric = next((k for k in metric_keys if k.lower().startswith("der")), "der")
            labels = [shorten(name or run_id, 48) + ("" if o == "finished" else f" [{o}]")
                      for name, run_id, o in zip(table["run_name"], table["run_id"], table["outcome"])]
            parent.log_figure(comparison_figure(runs, labels, x_metric, y_metric), "summary/comparison.png")
        return table

    def close_stale_runs(self, experiment: str | None = None, include_parents: bool = False) -> int:
        """End KILLED the RUNNING runs of this host whose process is dead; returns how many.

        ``experiment`` is a name or id (default: this tracker's). Parent runs are left alone unless
        ``include_parents`` (a parent outlives the worker that created it); then a parent is
        closed when its creator is dead and none of its children is still RUNNING.
        """
        experiment_id = self.experiment_id
        if experiment is not None:
            found = retry_locked(self.client.get_experiment_by_name, experiment)
            if found is None and experiment.isdigit():
                found = retry_locked(self.client.get_experiment, experiment)
            if found is None:
                raise ValueError(f"no MLflow experiment {experiment!r}")
            experiment_id = found.experiment_id
        host = hostname()

        def dead(run: Run) -> bool:
            tags = run.data.tags
            pid = tags.get(TAG_PID, "")
            return tags.get(TAG_HOST) == host and pid.isdigit() and not pid_alive(int(pid), tags.get(TAG_PID_START))

        running = self.search("attributes.status = 'RUNNING'", experiment_ids=[experiment_id])
        closed = 0
        parents = []
        for run in running:
            if run.data.tags.get(TAG_ROLE) == "parent":
                parents.append(run)
            elif dead(run):
                self._close(run, "process died")
                closed += 1
        if include_parents:
            for run in parents:
                if dead(run) and not any(c.info.status == "RUNNING" for c in self.children(run.info.run_id)):
                    self._close(run, "process died; no running child")
                    closed += 1
        return closed

    def _close(self, run: Run, reason: str) -> None:
        log.warning("closing stale run %s (%s, pid %s): %s", run.info.run_id, run.info.run_name,
                    run.data.tags.get(TAG_PID), reason)
        retry_locked(self.client.set_tag, run.info.run_id, TAG_CLOSED_REASON, reason)
        retry_locked(self.client.set_terminated, run.info.run_id, "KILLED")


def children_table(runs: pd.DataFrame, metric_keys: list[str], param_keys: list[str]) -> pd.DataFrame:
    """One row per run of an ``mlflow.search_runs`` frame: name, id, outcome, status, skip reason,
    error type, duration (s), then ``param_keys`` and ``metric_keys`` (a clash gets a ``param.`` /
    ``metric.`` prefix); missing values are None / NaN."""

    def column(name: str, default: Any = None) -> pd.Series:
        return runs[name] if name in runs.columns else pd.Series(default, index=runs.index, dtype=object)

    table = pd.DataFrame({
        "run_name": column("tags.mlflow.runName"), "run_id": column("run_id"),
        "outcome": [outcome(s, k) for s, k in zip(column("status"), column(f"tags.{TAG_SKIPPED}"))],
        "status": column("status"), "skip_reason": column(f"tags.{TAG_SKIP_REASON}").fillna(""),
        "error": column(f"tags.{TAG_ERROR_TYPE}").fillna(""),
        "duration_s": (column("end_time") - column("start_time")).dt.total_seconds() if len(runs) else [],
    }, index=runs.index)
    table["duration_s"] = table["duration_s"].astype(object).where(table["duration_s"].notna(), None)
    for key in param_keys:
        table[key if key not in table.columns else f"param.{key}"] = column(f"params.{key}").where(
            column(f"params.{key}").notna(), None)
    for key in metric_keys:
        table[key if key not in table.columns else f"metric.{key}"] = pd.to_numeric(
            column(f"metrics.{key}", float("nan")), errors="coerce")
    return table.reset_index(drop=True)
