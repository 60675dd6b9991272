"""MLflow tracking for sweeps: one parent run per multirun, one child run per job.

Every MLflow call goes through an explicit ``MlflowClient`` and ``run_id`` (never the fluent
active-run stack), so several runs can be open in one process. The default store is SQLite under
``<repo>/mlruns`` (MLflow 3.17 refuses the file store). Observed SQLite behaviour:

* The first use of a fresh database runs the schema migrations with no lock; several processes
  doing that at once fail ("table ... already exists", "duplicate column name").
  ``Tracker`` therefore opens the store under a file lock next to the database.
* MLflow sets ``PRAGMA busy_timeout = 20000`` per session, so concurrent writers normally just
  wait. "database is locked" still surfaces after 20 s of contention or when SQLite detects a
  lock-upgrade deadlock; writes here are retried a bounded number of times with backoff.

A store that cannot be opened, or fails mid-run, loses nothing: the run is written to
``<job output dir>/tracking_fallback/<run>/`` (:class:`FileClient`) and
``python -m diaropt.tracking relog DIR [--tracking-uri URI]`` stores it later (:func:`relog`).
"""

from __future__ import annotations

import functools
import enum
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import posixpath
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pandas as pd
from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf

from diaropt.files import atomic_path

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]

#: MLflow limits (mlflow.utils.validation).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_RUN_NAME_CHARS = 250
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

#: Bounded retry of writes that hit a locked SQLite database.
WRITE_ATTEMPTS = 6
_RETRY_FIRST_DELAY_S = 0.2
_RETRY_MAX_DELAY_S = 5.0
#: Waiting for another process to open the store or create a sweep's parent run.
LOCK_TIMEOUT_S = 300.0
_HTTP_PROBE_TIMEOUT_S = 5.0

TAG_SWEEP_ID = "diaropt.sweep_id"
TAG_SWEEP_KEY = "diaropt.sweep_key"  # sha1 of the sweep id: safe inside a filter string
TAG_ROLE = "diaropt.role"  # parent / child / single
TAG_PID = "diaropt.pid"
TAG_PID_START = "diaropt.pid_start_ticks"  # detects a recycled pid on Linux
TAG_HOST = "diaropt.host"
TAG_SKIPPED = "diaropt.skipped"
TAG_SKIP_REASON = "diaropt.skip_reason"
TAG_CLOSED_REASON = "diaropt.closed_reason"
TAG_NONFINITE = "diaropt.nonfinite_metrics"
TAG_ERROR_TYPE = "diaropt.error_type"
TAG_ERROR_MESSAGE = "diaropt.error_message"
TAG_OVERRIDES = "diaropt.overrides"
TAG_PARENT = "mlflow.parentRunId"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: Pipeline order of the ``time_<stage>_s`` metrics in the summary plot (others follow, sorted).
STAGE_ORDER = ("build", "compile", "audio", "segmentation", "preprocessing", "embedding", "clustering",
               "postprocess")
_TRUNCATION_MARKER = "...[truncated {n} chars]"
_RUN_ID_RE = re.compile(r"^[0-9a-zA-Z_-]+$")

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written to."""

    def __init__(self, tracking_uri: str, reason: str) -> None:
        super().__init__(f"MLflow tracking store {tracking_uri!r} is unavailable: {reason}")
        self.tracking_uri = tracking_uri
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# URIs, retries, small helpers
# ----------------------------------------------------------------------------------------------


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


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = WRITE_ATTEMPTS, **kwargs: Any) -> T:
    """Call ``fn`` (an MLflow call); retry on a locked SQLite database with jittered exponential backoff.

    Also counts the calls under way, so the SIGTERM handler never re-enters the store mid-call.
    """
    global _calls_in_flight
    delay_s = _RETRY_FIRST_DELAY_S
    for attempt in range(1, attempts + 1):
        with _calls_lock:
            _calls_in_flight += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_locked_error(exc):
                raise
            log.warning("MLflow store locked (attempt %d/%d), retrying in %.1f s", attempt, attempts, delay_s)
        finally:
            with _calls_lock:
                _calls_in_flight -= 1
        time.sleep(delay_s * random.uniform(1.0, 1.5))
        delay_s = min(2 * delay_s, _RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = _TRUNCATION_MARKER.format(n=len(value) - limit)
    marker = _TRUNCATION_MARKER.format(n=len(value) - (limit - len(marker)))
    return value[: limit - len(marker)] + marker


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _truncate(str(v), MAX_TAG_VALUE_CHARS) for k, v in tags.items() if v is not None}


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return run_id


def _to_jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become null, numpy/Path/sets are converted."""
    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _to_jsonable(obj.tolist())
    return str(obj)


# ----------------------------------------------------------------------------------------------
# Processes and host description
# ----------------------------------------------------------------------------------------------


def hostname() -> str:
    return socket.gethostname()


def _proc_start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether ``pid`` is a live process (zombies and recycled pids count as dead on Linux)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] in ("Z", "X"):
        return False
    return not (start_ticks and len(fields) > 19 and fields[19] != start_ticks)


def _process_tags() -> dict[str, str]:
    tags = {TAG_PID: str(os.getpid()), TAG_HOST: hostname()}
    start = _proc_start_ticks(os.getpid())
    if start is not None:
        tags[TAG_PID_START] = start
    return tags


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import cpuinfo  # py-cpuinfo: slow (spawns a process), so only as a fallback

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # noqa: BLE001 - optional, best effort
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_total_bytes() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return str(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _static_host_tags() -> dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    tags = {
        "host.hostname": hostname(),
        "host.os": f"{platform.system()} {platform.release()}",
        "host.platform": platform.platform(),
        "host.machine": platform.machine(),
        "host.cpu_model": _cpu_model(),
        "host.cpu_count_logical": str(os.cpu_count() or 0),
        "host.cpu_count_usable": str(usable),
        "host.memory_total_bytes": _memory_total_bytes(),
        "version.python": platform.python_version(),
    }
    for package in ("torch", "coremltools", "onnxruntime", "onnx", "numpy", "mlflow"):
        tags[f"version.{package}"] = _version(package)
    if sys.platform == "darwin":
        tags["host.macos"] = platform.mac_ver()[0]
    return tags


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_tags(repo_root: Path | None = None) -> dict[str, str]:
    """Commit, branch and dirty flag of ``repo_root`` ("unknown" without git or a repository)."""
    root = repo_root or _REPO_ROOT
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    status = _git(root, "status", "--porcelain")
    branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    tags = {"git.commit": commit or "unknown", "git.branch": branch or "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags


def host_tags(repo_root: Path | None = None) -> dict[str, str]:
    """Host, CPU, package versions and git state, as run tags.

    The host part is computed once per process; git state is re-read on each call.
    """
    return {**_static_host_tags(), **git_tags(repo_root)}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _config_container(cfg: Mapping | DictConfig) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra job
            return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return cfg


def _scalar_str(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = _config_container(value)
    if isinstance(value, Mapping):
        return json.dumps(_to_jsonable(value), sort_keys=True)
    if isinstance(value, (list, tuple)):
        return ",".join(_scalar_str(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.name)
    return str(value)


def flatten_config(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params.

    Interpolations are resolved when possible. A list of scalars is joined with ``,``; a list
    holding mappings is flattened with its indices (``a.0.b``). An empty mapping gives ``{}``.
    Values longer than MLflow's 6000-char limit are truncated with a ``...[truncated N chars]``
    marker.
    """
    flat: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            if not node and key:
                flat[key] = "{}"
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in node):
            for i, v in enumerate(node):
                visit(v, f"{key}.{i}" if key else str(i))
        else:
            flat[key] = _truncate(_scalar_str(node), MAX_PARAM_VALUE_CHARS)

    visit(_config_container(cfg), prefix.rstrip("."))
    return flat


def config_yaml(cfg: Mapping | DictConfig) -> str:
    """The config as YAML, interpolations resolved when possible."""
    return OmegaConf.to_yaml(OmegaConf.create(_to_jsonable(_config_container(cfg))))


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, independent of pyplot's global backend/state
    return figure


def _short_label(name: str, max_chars: int = 48) -> str:
    return name if len(name) <= max_chars else name[: max_chars - 1] + "…"


def _stacked_barh(ax: Any, labels: list[str], stages: list[str], seconds: list[list[float]]) -> None:
    """One horizontal bar per label, one segment per stage; each bar annotated with its total."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    lefts = [0.0] * len(labels)
    for j, stage in enumerate(stages):
        widths = [row[j] for row in seconds]
        bars = ax.barh(range(len(labels)), widths, left=lefts, color=colors[j % len(colors)], label=stage)
        total_s = max(sum(row) for row in seconds) or 1.0
        texts = [f"{w:.2f}" if w >= 0.06 * total_s else "" for w in widths]
        ax.bar_label(bars, labels=texts, label_type="center", fontsize=7)
        lefts = [left + w for left, w in zip(lefts, widths)]
    for i, total in enumerate(lefts):
        ax.text(total, i, f" {total:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.margins(x=0.15)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(4, max(1, len(stages))), fontsize=7)


def timing_figure(timings_s: Mapping[str, float | None], title: str = "time per stage"):
    """A single horizontal stacked bar of the (finite, positive) stage durations."""
    stages = [(k, float(v)) for k, v in timings_s.items() if v is not None and math.isfinite(v) and v > 0]
    figure = _new_figure(9, 2.4)
    ax = figure.add_subplot()
    if not stages:
        ax.text(0.5, 0.5, "no stage timings", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    _stacked_barh(ax, ["job"], [name for name, _ in stages], [[seconds for _, seconds in stages]])
    ax.set_title(f"{title} (total {sum(s for _, s in stages):.2f} s)", fontsize=9, pad=28)
    return figure


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


class JobRun:
    """One MLflow run addressed by id; a context manager ending it FINISHED, or FAILED on error."""

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
        items = [RunTag(k, v) for k, v in _str_tags(tags).items()]
        for chunk in _chunks(items, _PARAMS_TAGS_PER_BATCH):
            retry_locked(self.client.log_batch, self.run_id, tags=chunk)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Stringified, truncated to 6000 chars. Re-logging a key with another value raises."""
        items = [Param(str(k), _truncate(_scalar_str(v), MAX_PARAM_VALUE_CHARS)) for k, v in params.items()]
        for chunk in _chunks(items, _PARAMS_TAGS_PER_BATCH):
            retry_locked(self.client.log_batch, self.run_id, params=chunk)

    def log_config(self, cfg: Mapping | DictConfig, artifact_file: str = "config.yaml") -> None:
        """Flattened params plus the resolved config as a YAML artifact."""
        self.log_params(flatten_config(cfg))
        retry_locked(self.client.log_text, self.run_id, config_yaml(cfg), artifact_file)

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
        for chunk in _chunks(items, _METRICS_PER_BATCH):
            retry_locked(self.client.log_batch, self.run_id, metrics=chunk)
        if dropped - self._nonfinite:
            self._nonfinite |= dropped
            self.set_tags({TAG_NONFINITE: ",".join(sorted(self._nonfinite))})

    # --- artifacts ----------------------------------------------------------------------------

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str, append: bool = False) -> None:
        """Rows as an MLflow table artifact (``.json``; ``mlflow.load_table``, the UI's table view).

        ``MlflowClient.log_table`` appends to an existing table; here an existing table is
        replaced unless ``append``.
        """
        frame = pd.DataFrame([_to_jsonable(row) for row in rows])
        folder = posixpath.dirname(artifact_file) or None
        exists = any(f.path == artifact_file for f in retry_locked(self.client.list_artifacts, self.run_id, folder))
        if exists and not append:  # same format as log_table; the run is already tagged with it
            self.log_text(frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
        else:
            retry_locked(self.client.log_table, self.run_id, frame, artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        """Strict JSON (non-finite floats as null; numpy, paths and sets converted)."""
        text = json.dumps(_to_jsonable(obj), indent=1, allow_nan=False)
        retry_locked(self.client.log_text, self.run_id, text, artifact_file)

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
        self.log_figure(timing_figure(timings, title=_short_label(self.run_name or self.run_id, 80)), artifact_file)

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
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            retry_locked(self.client.log_text, self.run_id, text, "error.txt")
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
        if _calls_in_flight == 0:
            try:
                run.kill("SIGTERM")
            except Exception:  # noqa: BLE001 - exiting matters more
                log.exception("could not end run %s on SIGTERM", run.run_id)
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

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


# ----------------------------------------------------------------------------------------------
# The experiment: parent runs, children, summaries, stale runs
# ----------------------------------------------------------------------------------------------


def job_overrides(overrides: Iterable[str]) -> list[str]:
    """The Hydra overrides that identify a job: all but ``resume=...`` (also ``+``/``++`` forms)."""
    return [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "resume"]


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _outcome(run: Run) -> str:
    status = run.info.status
    if status == "FINISHED":
        return "skipped" if run.data.tags.get(TAG_SKIPPED) == "true" else "finished"
    return {"FAILED": "failed", "KILLED": "killed"}.get(status, "running")


class Tracker:
    """The MLflow experiment of the sweeps; opens (and on first use creates) the store.

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
        return f"Tracker({self.tracking_uri!r}, experiment={self.experiment_name!r} [{self.experiment_id}])"

    # --- opening ------------------------------------------------------------------------------

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
                location = (self.artifact_root / _safe_dir_name(self.experiment_name)).as_uri()
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

    # --- searching ----------------------------------------------------------------------------

    def search(self, filter_string: str = "", order_by: list[str] | None = None,
               experiment_ids: list[str] | None = None) -> list[Run]:
        """All active runs matching ``filter_string`` (paged)."""
        runs: list[Run] = []
        token = None
        while True:
            page = retry_locked(self.client.search_runs, experiment_ids or [self.experiment_id], filter_string,
                                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, order_by=order_by,
                                page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def children(self, parent_run_id: str) -> list[Run]:
        """The child runs of a parent, oldest first."""
        return self.search(f"tags.`{TAG_PARENT}` = '{_check_run_id(parent_run_id)}'",
                           order_by=["attributes.start_time ASC"])

    def find_parent(self, sweep_id: str) -> str | None:
        """The parent run of a sweep (the oldest if several exist), or None."""
        key = hashlib.sha1(sweep_id.encode()).hexdigest()
        runs = self.search(f"tags.`{TAG_SWEEP_KEY}` = '{key}'", order_by=["attributes.start_time ASC"])
        runs = [r for r in runs if r.data.tags.get(TAG_SWEEP_ID) == _truncate(sweep_id, MAX_TAG_VALUE_CHARS)]
        return runs[0].info.run_id if runs else None

    def find_finished_child(self, parent_run_id: str, overrides: list[str]) -> str | None:
        """A FINISHED, not skipped child with the same Hydra overrides (tag ``diaropt.overrides``).

        ``resume=...`` is not part of a job's identity: a sweep re-run with ``resume=true`` finds
        the children of the interrupted run.
        """
        wanted = job_overrides(overrides)
        for run in self.children(parent_run_id):
            if _outcome(run) == "finished" and job_overrides(run.data.tags.get(TAG_OVERRIDES, "").split()) == wanted:
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
                    all_tags = {**(tags or {}), **_process_tags(), TAG_SWEEP_ID: sweep_id, TAG_SWEEP_KEY: key,
                                TAG_ROLE: "parent"}
                    run = retry_locked(self.client.create_run, self.experiment_id,
                                       run_name=name[:MAX_RUN_NAME_CHARS], tags=_str_tags(all_tags))
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
        all_tags = {**(tags or {}), **_process_tags(), TAG_ROLE: "child" if parent_run_id else "single"}
        if parent_run_id:
            all_tags[TAG_PARENT] = _check_run_id(parent_run_id)
        run = retry_locked(self.client.create_run, self.experiment_id, run_name=run_name[:MAX_RUN_NAME_CHARS],
                           tags=_str_tags(all_tags))
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
        children = self.children(parent_run_id)
        rows = []
        for run in children:
            row: dict[str, Any] = {"run_name": run.info.run_name, "run_id": run.info.run_id,
                                   "outcome": _outcome(run), "status": run.info.status,
                                   "skip_reason": run.data.tags.get(TAG_SKIP_REASON, ""),
                                   "error": run.data.tags.get(TAG_ERROR_TYPE, ""),
                                   "duration_s": ((run.info.end_time - run.info.start_time) / 1000
                                                  if run.info.end_time and run.info.start_time else None)}
            for key in param_keys:
                row[key if key not in row else f"param.{key}"] = run.data.params.get(key)
            for key in metric_keys:
                row[key if key not in row else f"metric.{key}"] = run.data.metrics.get(key)
            rows.append(row)
        columns = ["run_name", "run_id", "outcome", "status", "skip_reason", "error", "duration_s"]
        table = pd.DataFrame(rows, columns=list(rows[0]) if rows else columns + param_keys + metric_keys)
        parent = JobRun(self.client, parent_run_id)
        counts = {f"num_{outcome}": sum(r["outcome"] == outcome for r in rows)
                  for outcome in ("finished", "failed", "skipped", "killed", "running")}
        parent.log_metrics({"num_children": len(rows), **counts})
        if rows:
            parent.log_table(rows, "summary/children.json")
        parent.log_text(table.to_csv(index=False), "summary/children.csv")
        if children:
            if y_metric is None:
                y_metric = next((k for k in metric_keys if k.lower().startswith("der")), "der")
            parent.log_figure(self._comparison_figure(children, x_metric, y_metric), "summary/comparison.png")
        return table

    @staticmethod
    def _comparison_figure(children: list[Run], x_metric: str, y_metric: str):
        labels = [_short_label(run.info.run_name or run.info.run_id)
                  + ("" if _outcome(run) == "finished" else f" [{_outcome(run)}]") for run in children]
        found = {k for run in children for k in run.data.metrics
                 if k.startswith("time_") and k.endswith("_s") and k != "time_total_s"}
        order = {f"time_{stage}_s": i for i, stage in enumerate(STAGE_ORDER)}
        stages = sorted(found, key=lambda k: (order.get(k, len(order)), k))
        figure = _new_figure(15, max(3.5, 1.2 + 0.32 * len(children)))
        scatter_ax, bar_ax = figure.subplots(1, 2, width_ratios=[1, 1.6])
        points = [(run.data.metrics.get(x_metric), run.data.metrics.get(y_metric), label)
                  for run, label in zip(children, labels)]
        points = [(x, y, label) for x, y, label in points if x is not None and y is not None]
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
        if stages:
            seconds = [[run.data.metrics.get(stage) or 0.0 for stage in stages] for run in children]
            _stacked_barh(bar_ax, labels, [s.removeprefix("time_").removesuffix("_s") for s in stages], seconds)
        else:
            bar_ax.text(0.5, 0.5, "no time_*_s metrics", ha="center", va="center", transform=bar_ax.transAxes)
            bar_ax.set_axis_off()
        return figure

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


# ----------------------------------------------------------------------------------------------
# Fallback folder: results of a job whose store is unavailable, and `relog` to store them later
# ----------------------------------------------------------------------------------------------

#: Sub-folder of a job's output dir holding the runs that could not be logged to the store.
FALLBACK_DIR = "tracking_fallback"
_FALLBACK_FORMAT = 1
TAG_RELOGGED_FROM = "diaropt.relogged_from"
_INPUT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                      "BAD_REQUEST"}


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_to_jsonable(obj), indent=1, sort_keys=True))


def _safe_artifact_path(root: Path, relative: str | None) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (``..``, absolute paths)."""
    target = (root / (relative or "")).resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise ValueError(f"artifact path {relative!r} leaves {root}")
    return target


class FileClient:
    """The part of ``MlflowClient`` that ``JobRun`` uses, writing one run to a folder instead.

    Layout: ``run.json`` (name, status, times, where it belongs: tracking URI, experiment, sweep,
    the run it continues), ``params.json``, ``tags.json``, ``metrics.jsonl`` (key, value, timestamp,
    step) and ``artifacts/``. ``python -m diaropt.tracking relog`` stores it in MLflow later.
    """

    def __init__(self, folder: Path, meta: Mapping[str, Any], known_params: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.known_params = dict(known_params or {})  # logged to the store before the switch
        (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)
        self.meta = {"format": _FALLBACK_FORMAT, "status": "RUNNING", "start_time_ms": int(time.time() * 1000),
                     "end_time_ms": None, **meta}
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self._save()

    def _save(self) -> None:
        _write_json_atomic(self.folder / "run.json", self.meta)
        _write_json_atomic(self.folder / "params.json", self.params)
        _write_json_atomic(self.folder / "tags.json", self.tags)

    def log_batch(self, run_id: str, metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
                  tags: Iterable[RunTag] = (), synchronous: bool | None = None) -> None:
        params = list(params)
        for param in params:
            previous = self.params.get(param.key, self.known_params.get(param.key))
            if previous is not None and previous != param.value:
                raise ValueError(f"param {param.key!r} already logged as {previous!r}, cannot log {param.value!r}")
        for param in params:
            self.params[param.key] = param.value
        self.tags.update({tag.key: tag.value for tag in tags})
        metrics = list(metrics)
        if metrics:
            with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as f:
                for metric in metrics:
                    f.write(json.dumps({"key": metric.key, "value": metric.value, "timestamp": metric.timestamp,
                                        "step": metric.step}) + "\n")
        self._save()

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        path = _safe_artifact_path(self.folder / "artifacts", artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        import shutil

        folder = _safe_artifact_path(self.folder / "artifacts", artifact_path)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_path, folder / Path(local_path).name)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        import shutil

        shutil.copytree(local_dir, _safe_artifact_path(self.folder / "artifacts", artifact_path), dirs_exist_ok=True)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str, **kwargs: Any) -> None:
        path = _safe_artifact_path(self.folder / "artifacts", artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        self.log_text(run_id, frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
        logged = json.loads(self.tags.get("mlflow.loggedArtifacts", "[]"))
        if not any(item.get("path") == artifact_file for item in logged):
            logged.append({"path": artifact_file, "type": "table"})
        self.tags["mlflow.loggedArtifacts"] = json.dumps(logged)
        self._save()

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[Any]:
        from mlflow.entities import FileInfo

        folder = _safe_artifact_path(self.folder / "artifacts", path)
        if not folder.is_dir():
            return []
        root = self.folder / "artifacts"
        return [FileInfo(p.relative_to(root).as_posix(), p.is_dir(), None if p.is_dir() else p.stat().st_size)
                for p in sorted(folder.iterdir())]

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self.meta.update(status=status or "FINISHED", end_time_ms=end_time or int(time.time() * 1000))
        self._save()

    def get_run(self, run_id: str) -> Any:
        from types import SimpleNamespace

        info = SimpleNamespace(run_id=run_id, status=self.meta["status"],
                               artifact_uri=(self.folder / "artifacts").resolve().as_uri())
        return SimpleNamespace(info=info, data=SimpleNamespace(params=dict(self.params), tags=dict(self.tags),
                                                               metrics={}))


def _is_input_error(error: BaseException) -> bool:
    """An error in what was logged (not in the store): raised, never sent to the fallback."""
    if isinstance(error, MlflowException):
        return error.error_code in _INPUT_ERROR_CODES and not is_locked_error(error)
    return isinstance(error, (TypeError, ValueError, FileNotFoundError)) and not isinstance(error, sqlite3.Error)


class StoreOrFiles:
    """A run's client: the MLflow store while it works, the fallback folder from its first failure on.

    Everything logged after the failure goes to the folder, marked as the continuation of the store's
    run, so ``relog`` completes that run; nothing computed is lost.
    """

    def __init__(self, client: MlflowClient, folder: Path, meta: Mapping[str, Any]) -> None:
        self.store = client
        self.folder = Path(folder)
        self.meta = dict(meta)
        self.files: FileClient | None = None
        self.stored_params: dict[str, str] = {}

    def _call(self, name: str, run_id: str, *args: Any, **kwargs: Any) -> Any:
        if self.files is None:
            try:
                result = retry_locked(getattr(self.store, name), run_id, *args, **kwargs)
                if name == "log_batch":
                    self.stored_params.update({p.key: p.value for p in kwargs.get("params", ())})
                return result
            except Exception as error:
                if _is_input_error(error):
                    raise
                log.error("MLflow store failed (%s: %s); run %s continues in %s (store it later with "
                          "`python -m diaropt.tracking relog %s`)", type(error).__name__, str(error)[:300], run_id,
                          self.folder, self.folder)
                self.files = FileClient(self.folder, {**self.meta, "existing_run_id": run_id,
                                                      "reason": f"{type(error).__name__}: {str(error)[:1000]}"},
                                        known_params=self.stored_params)
        return getattr(self.files, name)(run_id, *args, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in ("log_batch", "log_text", "log_artifact", "log_artifacts", "log_figure", "log_table",
                    "list_artifacts", "set_terminated", "get_run"):
            return functools.partial(self._call, name)
        raise AttributeError(name)


def fallback_meta(tracking_uri: str, experiment_name: str, run_name: str, sweep_id: str | None = None,
                  parent_tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a fallback run belongs, for ``relog``."""
    return {"tracking_uri": tracking_uri, "experiment_name": experiment_name, "run_name": run_name,
            "sweep_id": sweep_id, "parent_tags": dict(parent_tags or {})}


def new_fallback_folder(root: Path) -> Path:
    """A new ``root/<time>-<pid>-<random>/`` for one run."""
    import uuid

    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def start_fallback_run(root: Path, run_name: str, tags: Mapping[str, Any], meta: Mapping[str, Any],
                       reason: str) -> JobRun:
    """A ``JobRun`` written to a new folder under ``root`` (the store could not be opened)."""
    folder = new_fallback_folder(root)
    client = FileClient(folder, {**meta, "reason": reason, "existing_run_id": None})
    run = JobRun(client, f"fallback-{folder.name}", run_name)  # type: ignore[arg-type]
    run.set_tags({**tags, **_process_tags()})
    return run


def fallback_runs(paths: Iterable[Path]) -> list[Path]:
    """The fallback run folders (holding ``run.json``) under ``paths``, oldest first."""
    found: set[Path] = set()
    for path in paths:
        path = Path(path)
        if (path / "run.json").is_file():
            found.add(path)
        if path.name == FALLBACK_DIR:
            found.update(p.parent for p in path.glob("*/run.json"))
        found.update(p.parent for p in path.rglob(f"{FALLBACK_DIR}/*/run.json"))
    return sorted(found, key=lambda p: (json.loads((p / "run.json").read_text()).get("start_time_ms") or 0, str(p)))


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
    if run_id is None:
        parent_id = None
        if meta.get("sweep_id"):
            parent_id = tracker.find_parent(meta["sweep_id"])
            if parent_id is None:
                parent_id = tracker.get_or_create_parent(meta["sweep_id"], meta.get("parent_tags") or {})
                tracker.finish_parent(parent_id, "FINISHED")
        all_tags = {**tags, TAG_RELOGGED_FROM: str(folder.resolve()),
                    TAG_ROLE: "child" if parent_id else tags.get(TAG_ROLE, "single")}
        if parent_id:
            all_tags[TAG_PARENT] = parent_id
        run = retry_locked(client.create_run, tracker.experiment_id, start_time=meta.get("start_time_ms"),
                           tags=_str_tags(all_tags), run_name=meta.get("run_name"))
        run_id = run.info.run_id
        existing_params: dict[str, str] = {}
    else:
        existing_params = dict(retry_locked(client.get_run, run_id).data.params)
        retry_locked(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in
                                                     _str_tags({**tags, TAG_RELOGGED_FROM: str(folder.resolve())}).items()])
    new_params = [Param(k, v) for k, v in params.items() if existing_params.get(k) != v]
    for chunk in _chunks(new_params, _PARAMS_TAGS_PER_BATCH):
        retry_locked(client.log_batch, run_id, params=chunk)
    items = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in metrics]
    for chunk in _chunks(items, _METRICS_PER_BATCH):
        retry_locked(client.log_batch, run_id, metrics=chunk)
    artifacts = folder / "artifacts"
    if artifacts.is_dir() and any(artifacts.iterdir()):
        retry_locked(client.log_artifacts, run_id, str(artifacts))
    status = meta.get("status") or "FAILED"
    if status == "RUNNING":  # the job died before ending its run
        status = "KILLED"
    retry_locked(client.set_terminated, run_id, status, meta.get("end_time_ms"))
    _write_json_atomic(done, {"run_id": run_id, "tracking_uri": uri, "time_ms": int(time.time() * 1000)})
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
        from diaropt.sweep import SUMMARY_METRICS, SUMMARY_PARAMS

        try:
            tracker = Tracker(uri, experiment)
            parent_id = tracker.find_parent(sweep_id)
            if parent_id is not None:
                tracker.summarize_parent(parent_id, SUMMARY_METRICS, SUMMARY_PARAMS)
        except Exception as error:  # noqa: BLE001 - the runs are stored; the summary is a convenience
            print(f"sweep {sweep_id}: parent summary not updated: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
