"""Run lifecycle: one MLflow run addressed by id (:class:`JobRun`) and ending it on SIGTERM."""

from __future__ import annotations

import logging
import math
import posixpath
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from diaropt.figures import job_timing_figure, shorten
from diaropt.keys import (TAG_CLOSED_REASON, TAG_ERROR_MESSAGE, TAG_ERROR_TYPE, TAG_NONFINITE, TAG_SKIP_REASON,
                          TAG_SKIPPED)
from diaropt.tracking.flatten import config_dict, flatten_config, param_str, str_tags, to_jsonable
from diaropt.tracking.store import calls_in_flight, interrupt_after_call, interrupt_pending, retry_locked

log = logging.getLogger(__name__)

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class JobRun:
    """One MLflow run addressed by id; a context manager ending it FINISHED, or FAILED on error.

    ``client`` is an ``MlflowClient``, or a client with the same methods writing elsewhere
    (:class:`diaropt.tracking.fallback.FileClient`, :class:`~diaropt.tracking.fallback.StoreOrFiles`).
    """

    def __init__(self, client: MlflowClient, run_id: str, run_name: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.run_name = run_name
        self.status: str | None = None  # the terminal status once ended
        self._nonfinite: set[str] = set()
        self._terminated_by: str | None = None  # set by the SIGTERM handler

    def __repr__(self) -> str:
        return f"JobRun({self.run_name!r}, run_id={self.run_id!r}, status={self.status or 'RUNNING'})"

    @property
    def ended(self) -> bool:
        return self.status is not None

    @property
    def artifact_uri(self) -> str:
        return retry_locked(self.client.get_run, self.run_id).info.artifact_uri

    # --- data ---------------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """String tags (MLflow's client splits long batches)."""
        retry_locked(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in str_tags(tags).items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Stringified, truncated to 6000 chars. Re-logging a key with another value raises."""
        retry_locked(self.client.log_batch, self.run_id, params=[Param(str(k), param_str(v)) for k, v in params.items()])

    def log_config(self, cfg: Mapping | DictConfig, artifact_file: str = "config.yaml") -> None:
        """Flattened params plus the resolved config as a YAML artifact."""
        self.log_params(flatten_config(cfg))
        retry_locked(self.client.log_dict, self.run_id, config_dict(cfg), artifact_file)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite values; None/NaN/inf are dropped and their keys listed in a tag.

        (MLflow would store NaN as NaN and clamp inf to +-1.8e308, which misleads comparisons.)
        """
        timestamp_ms = int(time.time() * 1000)
        items: list[Metric] = []
        dropped: set[str] = set()
        for key, value in metrics.items():
            if value is None:
                dropped.add(key)
                continue
            if hasattr(value, "item"):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} is not a number: {value!r}")
            if not math.isfinite(value):
                dropped.add(key)
                continue
            items.append(Metric(str(key), float(value), timestamp_ms, step or 0))
        if items:
            retry_locked(self.client.log_batch, self.run_id, metrics=items)
        if dropped - self._nonfinite:
            self._nonfinite |= dropped
            self.set_tags({TAG_NONFINITE: ",".join(sorted(self._nonfinite))})

    # --- artifacts ----------------------------------------------------------------------------

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str, append: bool = False) -> None:
        """Rows as an MLflow table artifact (``.json``; ``mlflow.load_table``, the UI's table view).

        ``MlflowClient.log_table`` appends to an existing table; here an existing table is
        replaced unless ``append``.
        """
        frame = pd.DataFrame([to_jsonable(row) for row in rows])
        folder = posixpath.dirname(artifact_file) or None
        exists = any(f.path == artifact_file for f in retry_locked(self.client.list_artifacts, self.run_id, folder))
        if exists and not append:  # same format as log_table; the run is already tagged with it
            self.log_text(frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
        else:
            retry_locked(self.client.log_table, self.run_id, frame, artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        """Strict JSON (non-finite floats as null; numpy, paths and sets converted)."""
        retry_locked(self.client.log_dict, self.run_id, to_jsonable(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry_locked(self.client.log_text, self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file to log: {path}")
        retry_locked(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dir(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no directory to log: {path}")
        retry_locked(self.client.log_artifacts, self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        retry_locked(self.client.log_figure, self.run_id, figure, artifact_file)

    def log_timing_plot(self, timings: Mapping[str, float | None],
                        artifact_file: str = "timing_breakdown.png") -> None:
        """A horizontal stacked bar of the stage durations in seconds."""
        self.log_figure(job_timing_figure(timings, title=shorten(self.run_name or self.run_id, 80)), artifact_file)

    # --- outcome ------------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run; later calls are no-ops."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self.ended:
            return
        retry_locked(self.client.set_terminated, self.run_id, status)
        self.status = status

    def skip(self, reason: str) -> None:
        """A configuration this host cannot run: tagged skipped, ended FINISHED."""
        self.set_tags({TAG_SKIPPED: "true", TAG_SKIP_REASON: reason})
        self.end("FINISHED")

    def fail(self, exc: BaseException) -> None:
        """Tag the error, log its traceback as ``error.txt`` and end FAILED (best effort)."""
        if self.ended:
            return
        try:
            self.set_tags({TAG_ERROR_TYPE: type(exc).__qualname__, TAG_ERROR_MESSAGE: str(exc)[:1000]})
            self.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "error.txt")
        except Exception:  # noqa: BLE001 - the status matters more than the details
            log.exception("could not log the error of run %s", self.run_id)
        self.end("FAILED")

    def kill(self, reason: str) -> None:
        """End KILLED with ``diaropt.closed_reason``."""
        if self.ended:
            return
        try:
            self.set_tags({TAG_CLOSED_REASON: reason})
        except Exception:  # noqa: BLE001
            log.exception("could not tag run %s", self.run_id)
        self.end("KILLED")

    def __enter__(self) -> JobRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if self.ended:
            return False
        try:
            if exc is None:
                self.end("FINISHED")
            elif isinstance(exc, Exception):
                self.fail(exc)
            elif isinstance(exc, SystemExit) and exc.code in (0, None) and self._terminated_by is None:
                self.end("FINISHED")
            else:  # KeyboardInterrupt, SystemExit (e.g. from the SIGTERM handler)
                self.kill(self._terminated_by or type(exc).__name__)
        except Exception:  # noqa: BLE001 - never mask the body's exception
            if exc is None:
                raise
            log.exception("could not end run %s", self.run_id)
        return False


def install_sigterm_handler(run: JobRun) -> Callable[[], None]:
    """On SIGTERM end ``run`` KILLED and exit (``SystemExit(143)``); returns a restore function.

    If an MLflow call is under way when the signal arrives, the run is ended by ``JobRun.__exit__``
    or by the restore function as ``SystemExit`` unwinds (so no SQLite session is re-entered).
    The previous handler is reinstated by the restore function, or at the first SIGTERM. A no-op
    outside the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, previous)
        run._terminated_by = "SIGTERM"
        if calls_in_flight() == 0:
            try:
                run.kill("SIGTERM")
            except Exception:  # noqa: BLE001 - exiting matters more
                log.exception("could not end run %s on SIGTERM", run.run_id)
        if callable(previous):
            previous(signum, frame)  # the sweep's handler raises, or defers the exit past an MLflow call
            if interrupt_pending():
                return
        error = SystemExit(128 + signum)
        if not interrupt_after_call(error):  # an MLflow call under way: exit as it returns
            raise error

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)
        if run._terminated_by and not run.ended:
            try:
                run.kill(run._terminated_by)
            except Exception:  # noqa: BLE001
                log.exception("could not end run %s after SIGTERM", run.run_id)

    return restore

