"""The sweeps' experiment: parent runs (one per multirun), child runs, their summary, stale runs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock
from mlflow.entities import Run, RunTag

from diaropt.figures import comparison_figure, shorten
from diaropt.keys import (STAGES, TAG_CLOSED_REASON, TAG_ERROR_TYPE, TAG_HOST, TAG_OVERRIDES, TAG_PARENT, TAG_PID,
                          TAG_PID_START, TAG_ROLE, TAG_SKIP_REASON, TAG_SKIPPED, TAG_SWEEP_ID, TAG_SWEEP_KEY,
                          overrides_from_tag, stage_of)
from diaropt.provenance import TIMING_TAG
from diaropt.tracking.flatten import str_tags, truncate
from diaropt.tracking.host import hostname, pid_alive, process_tags, sweep_process_tags
from diaropt.tracking.run import TERMINAL_STATUSES, JobRun
from diaropt.tracking.store import (LOCK_TIMEOUT_S, MAX_RUN_NAME_CHARS, MAX_TAG_VALUE_CHARS, Store, check_run_id,
                                    retry_locked)

log = logging.getLogger(__name__)

_OUTCOMES = ("finished", "failed", "skipped", "killed", "running")
#: The experiment tag MLflow 3 UIs read to open an experiment on its runs table rather than the
#: GenAI overview (3.17.2 lets its global GenAI / Model training switch decide instead).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Override prefixes that say where results go or how jobs launch, not what runs.
_NOT_CONFIG = ("tracking.", "paths.", "hydra.", "hydra/")


def sweep_run_name(overrides: Iterable[str], started: datetime) -> str:
    """A parent run's name from its children's ``diaropt.overrides`` tags (JSON lists, or the older
    space-joined form): the axes whose value differs,
    each with its values in first-seen order, and the start time: ``quant=fp16,int8 @ 2026-12-01 01:02``.

    A sweep whose children share every override is named by those overrides (``default`` if none).
    """
    jobs = [dict(o.lstrip("+").split("=", 1) for o in overrides_from_tag(text) if "=" in o and not o.startswith("~"))
            for text in overrides]
    jobs = [{k: v for k, v in job.items() if not k.startswith(_NOT_CONFIG) and k != "resume"} for job in jobs]
    keys = list(dict.fromkeys(k for job in jobs for k in job))
    swept = [k for k in keys if len({job.get(k) for job in jobs}) > 1] or keys
    parts = [f"{k}=" + ",".join(dict.fromkeys(job.get(k, "(default)") for job in jobs)) for k in swept]
    return f"{' '.join(parts) or 'default'} @ {started.strftime('%Y-%m-%d %H:%M %Z')}"


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
    """The MLflow experiment of the sweeps (see :class:`Store` for opening it).

    Opening it tags the experiment ``mlflow.experimentKind = custom_model_development`` (new or
    existing): MLflow UIs that read the tag open it on the runs table rather than the GenAI overview.
    MLflow 3.17.2's UI has a global GenAI / Model training switch that takes precedence (seen with
    headless Chromium); ``python -m diaropt ui`` (:mod:`diaropt.tracking.ui`) prints the address that
    lands on the runs table there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        experiment = retry_locked(self.client.get_experiment, self.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            retry_locked(self.client.set_experiment_tag, self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

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
                    all_tags = {**(tags or {}), **sweep_process_tags(), TAG_SWEEP_ID: sweep_id, TAG_SWEEP_KEY: key,
                                TAG_ROLE: "parent"}
                    run = retry_locked(self.client.create_run, self.experiment_id,
                                       run_name=name[:MAX_RUN_NAME_CHARS], tags=str_tags(all_tags))
                    return run.info.run_id
        run = retry_locked(self.client.get_run, parent_id)
        if run.info.status != "RUNNING":
            log.info("re-opening parent run %s of sweep %s", parent_id, sweep_id)
            retry_locked(self.client.update_run, parent_id, status="RUNNING")
            # a resumed sweep: the parent now lives as long as this sweep's process, not the dead one's
            retry_locked(self.client.log_batch, parent_id,
                         tags=[RunTag(k, v) for k, v in sweep_process_tags().items()])
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

        Names the parent by its swept axes (:func:`sweep_run_name`). Logs ``summary/children.json``
        (MLflow table) and ``summary/children.csv``, the plot
        ``summary/comparison.png`` (``x_metric`` vs ``y_metric`` -- by default the first ``der*``
        metric key -- and the stacked ``time_<stage>_s`` of the pipeline ``STAGES`` per child: the
        report's numbers, without model build or warm-up), and the parent metrics
        ``num_children``, ``num_finished``, ``num_failed``, ``num_skipped``, ``num_killed``,
        ``num_running``.
        """
        runs = self.frame(self._children_filter(parent_run_id), order_by=["attributes.start_time ASC"])
        table = children_table(runs, metric_keys, param_keys)
        parent = JobRun(self.client, parent_run_id)
        if len(runs):
            started = datetime.fromtimestamp(retry_locked(self.client.get_run, parent_run_id).info.start_time / 1000,
                                             tz=timezone.utc)
            name = sweep_run_name([o if isinstance(o, str) else "" for o in runs.get(f"tags.{TAG_OVERRIDES}", [])],
                                  started)
            retry_locked(self.client.update_run, parent_run_id, name=name[:MAX_RUN_NAME_CHARS])
        parent.log_metrics({"num_children": len(table),
                            **{f"num_{o}": int((table["outcome"] == o).sum()) for o in _OUTCOMES}})
        if len(table):
            parent.log_table(table.to_dict("records"), "summary/children.json")
        parent.log_text(table.to_csv(index=False), "summary/children.csv")
        if len(table):
            if y_metric is None:
                y_metric = next((k for k in metric_keys if k.lower().startswith("der")), "der")
            timing = runs.get(f"tags.{TIMING_TAG}", pd.Series(None, index=runs.index)).tolist()
            labels = [shorten(name or run_id, 48) + ("" if o == "finished" else f" [{o}]")
                      + (f" [timing {t}]" if isinstance(t, str) and t != "target" else "")  # as the report says
                      for name, run_id, o, t in zip(table["run_name"], table["run_id"], table["outcome"], timing)]
            not_pipeline = [c for c in runs.columns if c.startswith("metrics.")
                            and (stage := stage_of(c.removeprefix("metrics."))) is not None and stage not in STAGES]
            parent.log_figure(comparison_figure(runs.drop(columns=not_pipeline), labels, x_metric, y_metric),
                              "summary/comparison.png")
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
