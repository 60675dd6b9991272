"""Store access: where the MLflow store is, opening it safely, retrying writes on a locked SQLite database.

Every MLflow call goes through an explicit ``MlflowClient`` and ``run_id`` (never the fluent
active-run stack), so several runs can be open in one process. The default store is SQLite under
``<repo>/mlruns`` (MLflow 3.17 refuses the file store). Observed SQLite behaviour:

* The first use of a fresh database runs the schema migrations with no lock; several processes
  doing that at once fail ("table ... already exists", "duplicate column name").
  :class:`Store` therefore opens the store under a file lock next to the database.
* MLflow sets ``PRAGMA busy_timeout = 20000`` per session, so concurrent writers normally just
  wait. "database is locked" still surfaces after 20 s of contention or when SQLite detects a
  lock-upgrade deadlock; writes here are retried a bounded number of times with backoff
  (:func:`retry_locked`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from filelock import FileLock, Timeout
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

#: MLflow limits (mlflow.utils.validation). ``MlflowClient.log_batch`` splits long batches itself.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_RUN_NAME_CHARS = 250

#: Bounded retry of writes that hit a locked SQLite database.
WRITE_ATTEMPTS = 6
_RETRY_FIRST_DELAY_S = 0.2
_RETRY_MAX_DELAY_S = 5.0
#: Waiting for another process to open the store or create a sweep's parent run.
LOCK_TIMEOUT_S = 300.0
_HTTP_PROBE_TIMEOUT_S = 5.0
_RUN_ID_RE = re.compile(r"^[0-9a-zA-Z_-]+$")

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written to."""

    def __init__(self, tracking_uri: str, reason: str) -> None:
        super().__init__(f"MLflow tracking store {tracking_uri!r} is unavailable: {reason}")
        self.tracking_uri = tracking_uri
        self.reason = reason


# --- where the store is -------------------------------------------------------------------------


def default_tracking_uri(repo_root: Path) -> str:
    """SQLite store under ``<repo_root>/mlruns``."""
    return f"sqlite:///{Path(repo_root).resolve()}/mlruns/mlflow.db"


def default_artifact_root(repo_root: Path) -> Path:
    return Path(repo_root).resolve() / "mlruns" / "artifacts"


def resolve_tracking_uri(configured: str | None, repo_root: Path) -> str:
    """Config value > ``$MLFLOW_TRACKING_URI`` > SQLite under ``<repo_root>/mlruns``.

    A relative SQLite path in the config is taken relative to ``repo_root`` (Hydra may change the
    working directory); the environment variable is used verbatim.
    """
    if configured and configured.strip():
        uri = configured.strip()
        path = sqlite_path(uri)
        if path is not None and not path.is_absolute():
            uri = f"sqlite:///{(Path(repo_root) / path).resolve()}"
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or default_tracking_uri(repo_root)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory SQLite)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a run id (safe inside a filter string); raises ``ValueError`` otherwise."""
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return run_id


def safe_dir_name(name: str) -> str:
    """``name`` as one folder name (no separators, no ``..``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


# --- retries ------------------------------------------------------------------------------------


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_locked_error(exc: BaseException) -> bool:
    """A transient SQLite lock error, possibly wrapped by MLflow/SQLAlchemy."""
    needles = ("database is locked", "database table is locked", "database schema is locked", "sqlite_busy")
    return any(needle in str(e).lower() for e in _exception_chain(exc) for needle in needles)


_calls_lock = threading.Lock()
_calls_in_flight = 0  # MLflow calls under way in this process (the SIGTERM handler avoids re-entry)
_main_calls_in_flight = 0  # those of the main thread (where signal handlers run); changed by it only
_pending_interrupt: BaseException | None = None  # raised when the main thread's MLflow call returns


def calls_in_flight() -> int:
    """How many MLflow calls made through :func:`retry_locked` are under way in this process."""
    return _calls_in_flight


def interrupt_after_call(error: BaseException) -> bool:
    """From a signal handler: defer ``error`` (``KeyboardInterrupt``, ``SystemExit``) while the main
    thread is inside an MLflow call, so the call is not cut mid-transaction (an SQLite write
    transaction cut by ``KeyboardInterrupt`` kept the database locked for the process's own closing
    writes); :func:`retry_locked` raises it as the call returns. Returns False when nothing is under
    way or an interrupt is already pending (a second Ctrl-C): the caller raises at once.
    """
    global _pending_interrupt
    if _main_calls_in_flight > 0 and _pending_interrupt is None:
        _pending_interrupt = error
        return True
    return False


def interrupt_pending() -> bool:
    """An interrupt deferred by :func:`interrupt_after_call` waits for the main thread's MLflow call."""
    return _pending_interrupt is not None


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = WRITE_ATTEMPTS, **kwargs: Any) -> T:
    """Call ``fn`` (an MLflow call); retry on a locked SQLite database with jittered exponential backoff.

    Also counts the calls under way, so the SIGTERM handler never re-enters the store mid-call, and
    raises an interrupt deferred by :func:`interrupt_after_call` once the main thread's call returns.
    """
    global _calls_in_flight, _main_calls_in_flight, _pending_interrupt
    main = threading.current_thread() is threading.main_thread()
    delay_s = _RETRY_FIRST_DELAY_S
    for attempt in range(1, attempts + 1):
        with _calls_lock:
            _calls_in_flight += 1
        if main:
            _main_calls_in_flight += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_locked_error(exc):
                raise
            log.warning("MLflow store locked (attempt %d/%d), retrying in %.1f s", attempt, attempts, delay_s)
        finally:
            with _calls_lock:
                _calls_in_flight -= 1
            if main:
                _main_calls_in_flight -= 1
                if _main_calls_in_flight == 0 and _pending_interrupt is not None:
                    error, _pending_interrupt = _pending_interrupt, None
                    raise error
        time.sleep(delay_s * random.uniform(1.0, 1.5))
        delay_s = min(2 * delay_s, _RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


# --- searching ----------------------------------------------------------------------------------


def search_runs(tracking_uri: str, experiment_ids: list[str], filter_string: str = "",
                order_by: list[str] | None = None, max_results: int | None = None,
                output_format: str = "list") -> Any:
    """``mlflow.search_runs`` (active runs, every page) against ``tracking_uri``.

    ``output_format="pandas"`` gives MLflow's frame (``run_id``, ``status``, ``start_time``,
    ``metrics.*``, ``params.*``, ``tags.*``); ``"list"`` the ``Run`` entities. ``mlflow.search_runs``
    reads the process-wide tracking URI, so it is set for the call (MLflow's own
    ``_use_tracking_uri``) and restored after; sweeps run one job per process, so nothing else
    reads it meanwhile.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    def search() -> Any:
        with _use_tracking_uri(tracking_uri):
            kwargs = {} if max_results is None else {"max_results": max_results}
            return mlflow.search_runs(experiment_ids, filter_string, order_by=order_by,
                                      output_format=output_format, **kwargs)

    return retry_locked(search)


# --- opening ------------------------------------------------------------------------------------


class Store:
    """An MLflow experiment in a store; opens (and on first use creates) both.

    Raises ``TrackingUnavailable`` when the store cannot be reached or written to.

    ``artifact_root`` (a local folder) is used when the experiment is created; it defaults to
    ``artifacts/`` next to a SQLite database. ``lock_dir`` holds the inter-process lock files; it
    defaults to the database's folder (or the artifact root, or a temp folder for remote stores);
    the locks only serialize processes sharing that filesystem.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None,
                 lock_dir: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        db_path = sqlite_path(tracking_uri)
        if artifact_root is None and db_path is not None:
            artifact_root = db_path.resolve().parent / "artifacts"
        self.artifact_root = Path(artifact_root).resolve() if artifact_root is not None else None
        if lock_dir is None:
            if db_path is not None:
                lock_dir = db_path.resolve().parent
            elif self.artifact_root is not None:
                lock_dir = self.artifact_root
            else:
                import tempfile

                digest = hashlib.sha1(tracking_uri.encode()).hexdigest()[:12]
                lock_dir = Path(tempfile.gettempdir()) / f"diaropt-locks-{digest}"
        self.lock_dir = Path(lock_dir) / ".diaropt-locks"
        self._check_reachable(db_path)
        try:
            with FileLock(str(self.lock_dir / "store.lock"), timeout=LOCK_TIMEOUT_S):
                self.client = MlflowClient(tracking_uri)
                self.experiment_id = self._get_or_create_experiment()
        except TrackingUnavailable:
            raise
        except Timeout as error:
            raise TrackingUnavailable(tracking_uri, f"timed out waiting for {error.lock_file}") from error
        except Exception as error:  # noqa: BLE001 - anything here means "cannot track"
            raise TrackingUnavailable(tracking_uri, f"{type(error).__name__}: {error}") from error

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tracking_uri!r}, experiment={self.experiment_name!r} [{self.experiment_id}])"

    def _check_reachable(self, db_path: Path | None) -> None:
        uri = self.tracking_uri
        folders = [self.lock_dir] + ([self.artifact_root] if self.artifact_root is not None else [])
        if db_path is not None:
            folders.append(db_path.resolve().parent)
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrackingUnavailable(uri, f"cannot create {folder}: {error}") from error
            if not os.access(folder, os.W_OK | os.X_OK):
                raise TrackingUnavailable(uri, f"{folder} is not writable")
        if db_path is not None and db_path.exists():
            if not os.access(db_path, os.R_OK | os.W_OK):
                raise TrackingUnavailable(uri, f"{db_path} is not writable")
            try:  # take (and drop) the write lock: fails at once on a read-only database
                connection = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True, timeout=1.0)
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    connection.rollback()
                finally:
                    connection.close()
            except sqlite3.Error as error:
                if not is_locked_error(error):  # busy means another writer: writable
                    raise TrackingUnavailable(uri, f"{db_path}: {error}") from error
        if uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_HTTP_PROBE_TIMEOUT_S).close()
            except urllib.error.HTTPError:
                pass  # reachable; the server may not expose /health
            except (urllib.error.URLError, OSError) as error:
                raise TrackingUnavailable(uri, f"no answer from the server: {error}") from error

    def _get_or_create_experiment(self) -> str:
        experiment = retry_locked(self.client.get_experiment_by_name, self.experiment_name)
        if experiment is None:
            location = None
            if self.artifact_root is not None:
                location = (self.artifact_root / safe_dir_name(self.experiment_name)).as_uri()
            try:
                return retry_locked(self.client.create_experiment, self.experiment_name, artifact_location=location)
            except MlflowException as error:
                if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = retry_locked(self.client.get_experiment_by_name, self.experiment_name)
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r", self.experiment_name)
            retry_locked(self.client.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id

    def search(self, filter_string: str = "", order_by: list[str] | None = None,
               experiment_ids: list[str] | None = None) -> list[Run]:
        """All active runs of the experiment (or ``experiment_ids``) matching ``filter_string``."""
        return search_runs(self.tracking_uri, experiment_ids or [self.experiment_id], filter_string, order_by)

    def frame(self, filter_string: str = "", order_by: list[str] | None = None):
        """The same as :meth:`search`, as ``mlflow.search_runs``' pandas frame."""
        return search_runs(self.tracking_uri, [self.experiment_id], filter_string, order_by, output_format="pandas")
