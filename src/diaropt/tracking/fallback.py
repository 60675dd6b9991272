"""File fallback: a run kept in a folder when the store cannot be opened or fails mid-run.

A store that cannot be opened, or fails mid-run, loses nothing: the run is written to
``<job output dir>/tracking_fallback/<run>/`` (:class:`FileClient`) and
``python -m diaropt.tracking relog DIR [--tracking-uri URI]`` stores it later
(:func:`diaropt.tracking.relog.relog`). A job run with tracking disabled writes its run the same way.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import yaml
from mlflow.entities import FileInfo, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diaropt.files import atomic_path
from diaropt.tracking.flatten import to_jsonable
from diaropt.tracking.host import process_tags
from diaropt.tracking.run import JobRun
from diaropt.tracking.store import is_locked_error, retry_locked

log = logging.getLogger(__name__)

#: Sub-folder of a job's output dir holding the runs that could not be logged to the store.
FALLBACK_DIR = "tracking_fallback"
#: Sub-folder of a job's output dir holding its run when tracking is disabled (``tracking.enabled=false``).
LOCAL_RUN_DIR = "local_run"
_FALLBACK_FORMAT = 1
_INPUT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                      "BAD_REQUEST"}
#: The ``MlflowClient`` methods a ``JobRun`` calls (all that ``FileClient`` implements).
CLIENT_METHODS = ("log_batch", "log_text", "log_dict", "log_artifact", "log_artifacts", "log_figure", "log_table",
                  "list_artifacts", "set_terminated", "get_run")


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=1, sort_keys=True))


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
        self.metric_lines: list[str] = []  # metrics.jsonl, rewritten whole (atomically) on each batch
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.folder / "run.json", self.meta)
        write_json_atomic(self.folder / "params.json", self.params)
        write_json_atomic(self.folder / "tags.json", self.tags)

    def _artifact(self, artifact_file: str | None) -> Path:
        """The path of an artifact (its folder created); refuses paths leaving ``artifacts/``."""
        path = _safe_artifact_path(self.folder / "artifacts", artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

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
        if metrics:  # rewritten whole: a failed write leaves the previous complete file, never a cut line
            self.metric_lines += [json.dumps({"key": metric.key, "value": metric.value, "timestamp": metric.timestamp,
                                              "step": metric.step}) + "\n" for metric in metrics]
            with atomic_path(self.folder / "metrics.jsonl") as tmp:
                tmp.write_text("".join(self.metric_lines), encoding="utf-8")
        self._save()

    # Every artifact is written to a temporary file and renamed (diaropt.files.atomic_path): a failed
    # write (full disk) leaves the previous file or nothing, never a partial one for relog to store.

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with atomic_path(self._artifact(artifact_file)) as tmp:
            tmp.write_text(text, encoding="utf-8")

    def log_dict(self, run_id: str, dictionary: Any, artifact_file: str) -> None:
        """YAML for ``.yaml``/``.yml``, JSON otherwise, formatted as ``MlflowClient.log_dict`` does."""
        if Path(artifact_file).suffix in (".yaml", ".yml"):
            text = yaml.dump(dictionary, indent=2, default_flow_style=False)
        else:
            text = json.dumps(dictionary, indent=2, default=str)
        self.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        folder = _safe_artifact_path(self.folder / "artifacts", artifact_path)
        with atomic_path(folder / Path(local_path).name) as tmp:
            shutil.copy2(local_path, tmp)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        target = _safe_artifact_path(self.folder / "artifacts", artifact_path)
        for source in sorted(Path(local_dir).rglob("*")):
            if source.is_file():
                with atomic_path(target / source.relative_to(local_dir)) as tmp:
                    shutil.copy2(source, tmp)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str, **kwargs: Any) -> None:
        path = self._artifact(artifact_file)
        with atomic_path(path) as tmp:  # the temporary name keeps the suffix: matplotlib infers the format
            figure.savefig(tmp)

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        self.log_text(run_id, frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
        logged = json.loads(self.tags.get("mlflow.loggedArtifacts", "[]"))
        if not any(item.get("path") == artifact_file for item in logged):
            logged.append({"path": artifact_file, "type": "table"})
        self.tags["mlflow.loggedArtifacts"] = json.dumps(logged)
        self._save()

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[Any]:
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
        if name in CLIENT_METHODS:
            return functools.partial(self._call, name)
        raise AttributeError(name)


def fallback_meta(tracking_uri: str, experiment_name: str, run_name: str, sweep_id: str | None = None,
                  parent_tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a fallback run belongs, for ``relog``."""
    return {"tracking_uri": tracking_uri, "experiment_name": experiment_name, "run_name": run_name,
            "sweep_id": sweep_id, "parent_tags": dict(parent_tags or {})}


def new_fallback_folder(root: Path) -> Path:
    """A new ``root/<time>-<pid>-<random>/`` for one run."""
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def start_file_run(folder: Path, run_name: str, tags: Mapping[str, Any], meta: Mapping[str, Any]) -> JobRun:
    """A ``JobRun`` written to ``folder`` (a :class:`FileClient`), tagged with ``tags`` and this process."""
    client = FileClient(folder, {"existing_run_id": None, **meta})
    run = JobRun(client, f"fallback-{Path(folder).name}", run_name)  # type: ignore[arg-type]
    run.set_tags({**tags, **process_tags()})
    return run


def start_fallback_run(root: Path, run_name: str, tags: Mapping[str, Any], meta: Mapping[str, Any],
                       reason: str) -> JobRun:
    """A ``JobRun`` written to a new folder under ``root`` (the store could not be opened)."""
    return start_file_run(new_fallback_folder(root), run_name, tags, {**meta, "reason": reason})


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
