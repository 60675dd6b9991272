"""MLflow tracking for sweeps: one parent run per multirun, one child run per job.

| module | owns |
|---|---|
| ``store``      | where the store is (URIs), opening it under a file lock, SQLite retries, ``mlflow.search_runs`` |
| ``flatten``    | configs flattened to params, values made JSON/MLflow-safe |
| ``host``       | host, CPU, versions, git state and process tags |
| ``run``        | one run's lifecycle: ``JobRun`` (log, end, skip, fail, kill) and the SIGTERM handler |
| ``experiment`` | ``Tracker``: parent/child runs of a sweep, the parent's summary, stale runs |
| ``fallback``   | a run kept in a folder (``FileClient``) when the store is unavailable or tracking is off |
| ``relog``      | storing fallback folders in MLflow later: ``python -m diaropt.tracking relog DIR`` |
| ``ui``         | ``python -m diaropt ui``: MLflow's server on the store, the address of the runs table |

Names of tags and metrics: :mod:`diaropt.keys`; figures: :mod:`diaropt.figures`.
"""

from __future__ import annotations

from diaropt.tracking.experiment import Tracker, job_overrides, outcome
from diaropt.tracking.fallback import (FALLBACK_DIR, LOCAL_RUN_DIR, FileClient, StoreOrFiles, fallback_meta,
                                       fallback_runs, new_fallback_folder, start_fallback_run, start_file_run)
from diaropt.tracking.flatten import flatten_config, to_jsonable
from diaropt.tracking.host import git_tags, host_tags, hostname, pid_alive, process_tags
from diaropt.tracking.relog import main, relog
from diaropt.tracking.run import TERMINAL_STATUSES, JobRun, install_sigterm_handler
from diaropt.tracking.store import (MAX_PARAM_VALUE_CHARS, MAX_RUN_NAME_CHARS, MAX_TAG_VALUE_CHARS, Store, check_run_id,
                                    TrackingUnavailable, default_artifact_root, default_tracking_uri, is_locked_error,
                                    resolve_tracking_uri, retry_locked, safe_dir_name, search_runs, sqlite_path)

__all__ = ["FALLBACK_DIR", "LOCAL_RUN_DIR", "MAX_PARAM_VALUE_CHARS", "MAX_RUN_NAME_CHARS", "MAX_TAG_VALUE_CHARS",
           "TERMINAL_STATUSES", "check_run_id",
           "FileClient", "JobRun", "Store", "StoreOrFiles", "Tracker", "TrackingUnavailable", "default_artifact_root",
           "default_tracking_uri", "fallback_meta", "fallback_runs", "flatten_config", "git_tags", "host_tags",
           "hostname", "install_sigterm_handler", "is_locked_error", "job_overrides", "main", "new_fallback_folder",
           "outcome", "pid_alive", "process_tags", "relog", "resolve_tracking_uri", "retry_locked", "safe_dir_name",
           "search_runs", "sqlite_path", "start_fallback_run", "start_file_run", "to_jsonable"]
