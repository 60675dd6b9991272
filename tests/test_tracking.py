"""MLflow tracking against a temporary SQLite store (never the user's ``mlruns``)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from enum import Enum
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diaropt import tracking
from diaropt.tracking import store as tracking_store
from diaropt.tracking import JobRun, Tracker, TrackingUnavailable, flatten_config, host_tags, resolve_tracking_uri

DEAD_PID = 999999


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store with MLflow's schema, migrated once (a fresh database costs 1-5 s)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{path}", "template")
    return path


@pytest.fixture
def store_uri(tmp_path: Path, migrated_db: Path, monkeypatch: pytest.MonkeyPatch):
    """A per-test SQLite store (copy of the migrated one), also the global one for ``mlflow.search_runs``."""
    shutil.copyfile(migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def tracker(store_uri: str) -> Tracker:
    return Tracker(store_uri, "test-exp")


def _artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    """All artifact file paths of a run, recursively."""
    client = MlflowClient()
    found: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_paths(run_id, info.path) if info.is_dir else {info.path}
    return found


# --- configuration ----------------------------------------------------------------------------


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None, tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert resolve_tracking_uri("", tmp_path) == "http://tracking.example:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    # a relative SQLite path in the config is relative to the repo, not the (Hydra) cwd
    assert resolve_tracking_uri("sqlite:///other/m.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/other/m.db"


class Mode(Enum):
    FAST = 1


def test_flatten_config_nested_omegaconf() -> None:
    cfg = OmegaConf.create({
        "backend": {"name": "onnx", "threads": 4, "extra": {}},
        "dataset": {"uris": ["dev00", "dev01"], "root": "/data", "path": "${dataset.root}/ami"},
        "stages": [{"name": "seg", "step_s": 0.5}, {"name": "emb"}],
        "mode": Mode.FAST,
        "missing_ok": None,
        "long": "x" * 7000,
    })
    flat = flatten_config(cfg)
    assert flat["backend.name"] == "onnx"
    assert flat["backend.threads"] == "4"
    assert flat["backend.extra"] == "{}"
    assert flat["dataset.uris"] == "dev00,dev01"
    assert flat["dataset.path"] == "/data/ami"  # interpolation resolved
    assert flat["stages.0.step_s"] == "0.5" and flat["stages.1.name"] == "emb"
    assert flat["mode"] == "FAST"
    assert flat["missing_ok"] == "None"
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE_CHARS
    assert flat["long"].endswith("chars]") and "truncated" in flat["long"]
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


def test_host_tags_versions_and_git() -> None:
    tags = host_tags()
    for key in ("version.python", "version.torch", "version.coremltools", "version.onnxruntime", "version.numpy",
                "version.mlflow", "host.cpu_model", "host.cpu_count_logical", "host.hostname", "host.os",
                "git.commit", "git.dirty"):
        assert tags[key], key
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["host.hostname"] == socket.gethostname()
    assert int(tags["host.cpu_count_logical"]) >= 1
    assert tags["git.dirty"] in ("true", "false", "unknown")
    assert all(isinstance(v, str) for v in tags.values())
    # no git repository: tolerated
    assert tracking.git_tags(Path("/"))["git.commit"] == "unknown"


def test_cpu_simd_flags_name_the_vector_extensions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``host.cpu_simd``: the listed flags the CPU reports, in SIMD_FLAGS order; none and unknown said so."""
    from diaropt.tracking import host

    real_read_text = Path.read_text

    def fake_cpuinfo(flags: str):
        def read_text(self: Path, *args, **kwargs) -> str:
            if str(self) == "/proc/cpuinfo":
                return f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n"
            return real_read_text(self, *args, **kwargs)
        return read_text

    monkeypatch.setattr(Path, "read_text", fake_cpuinfo("avx512_vnni fma avx2 avx512f"))
    assert host.cpu_simd_flags() == "avx2 fma avx512f avx512_vnni"
    monkeypatch.setattr(Path, "read_text", fake_cpuinfo("mmx"))
    assert host.cpu_simd_flags() == "none"

    def no_procfs(self: Path, *args, **kwargs) -> str:
        raise FileNotFoundError(str(self))

    monkeypatch.setattr(Path, "read_text", no_procfs)
    assert host.cpu_simd_flags() == "unknown"


# --- runs -------------------------------------------------------------------------------------


def test_parent_and_two_children_logged(tracker: Tracker, tmp_path: Path) -> None:
    parent_id = tracker.get_or_create_parent(str(tmp_path / "multirun/2025-01-01/00-00-00"), {"diaropt.note": "p"})
    assert tracker.get_or_create_parent(str(tmp_path / "multirun/2025-01-01/00-00-00"), {}) == parent_id
    rttm = tmp_path / "rttm"
    rttm.mkdir()
    (rttm / "dev00.rttm").write_text("SPEAKER dev00 1 0.00 1.00 <NA> <NA> spk0 <NA> <NA>\n")
    cfg = OmegaConf.create({"backend": {"name": "torch"}, "quant": {"mode": "fp32"}})
    for i, backend in enumerate(["torch", "onnx"]):
        with tracker.start_child(f"backend={backend}", parent_id, {"axis.backend": backend}) as run:
            run.log_config(cfg)
            run.log_params({"backend.resolved": backend})
            run.log_metrics({"der_pyannote": 0.2 + i / 10, "rtfx": 50.0 * (i + 1), "time_embedding_s": 1.5,
                             "bad": float("nan"), "missing": None})
            run.log_table([{"uri": "dev00", "der": 0.2}, {"uri": "dev01", "der": float("nan")}],
                          "results/per_file.json")
            run.log_json({"ops": {"conv": 3}, "nan": float("nan")}, "models/info.json")
            run.log_file(rttm / "dev00.rttm", "files")
            run.log_dir(rttm, "rttm")
            run.log_timing_plot({"segmentation": 1.0, "embedding": 2.0, "clustering": 0.1})
    children = mlflow.search_runs(experiment_ids=[tracker.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    assert set(children["params.backend.resolved"]) == {"torch", "onnx"}
    assert set(children["params.quant.mode"]) == {"fp32"}
    assert sorted(children["metrics.rtfx"]) == [50.0, 100.0]
    assert set(children["status"]) == {"FINISHED"}
    assert "metrics.bad" not in children.columns  # non-finite values are not logged...
    assert set(children["tags.diaropt.nonfinite_metrics"]) == {"bad,missing"}  # ...but recorded
    assert set(children["tags.diaropt.pid"]) == {str(os.getpid())}
    parent = mlflow.search_runs(experiment_ids=[tracker.experiment_id], filter_string="tags.`diaropt.role` = 'parent'")
    assert list(parent["run_id"]) == [parent_id] and list(parent["status"]) == ["RUNNING"]

    run_id = children["run_id"][0]
    assert _artifact_paths(run_id) == {"config.yaml", "results/per_file.json", "models/info.json", "files/dev00.rttm",
                                       "rttm/dev00.rttm", "timing_breakdown.png"}
    table = MlflowClient().load_table(tracker.experiment_id, "results/per_file.json", run_ids=[run_id])
    assert list(table["uri"]) == ["dev00", "dev01"] and table["der"][0] == pytest.approx(0.2)
    local = Path(MlflowClient().download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert json.loads((local / "models/info.json").read_text()) == {"ops": {"conv": 3}, "nan": None}
    assert OmegaConf.load(local / "config.yaml").backend.name == "torch"
    assert (local / "timing_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # artifacts live under the experiment's folder next to the database
    assert MlflowClient().get_run(run_id).info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())


def test_summarize_parent_counts_and_artifacts(tracker: Tracker) -> None:
    parent_id = tracker.get_or_create_parent("sweep-A", {})
    with tracker.start_child("ok", parent_id, {"diaropt.overrides": "backend=torch"}) as run:
        run.log_params({"backend.resolved": "torch"})
        run.log_metrics({"der_pyannote": 0.21, "rtfx": 80.0, "time_segmentation_s": 1.0, "time_embedding_s": 3.0,
                         "time_total_s": 4.0})
    with pytest.raises(RuntimeError):
        with tracker.start_child("boom", parent_id, {"diaropt.overrides": "backend=onnx"}) as run:
            raise RuntimeError("kaput")
    with tracker.start_child("coreml", parent_id, {"diaropt.overrides": "backend=coreml"}) as run:
        run.skip("Core ML execution needs macOS")

    table = tracker.summarize_parent(parent_id, ["der_pyannote", "rtfx"], ["backend.resolved"])
    assert list(table["run_name"]) == ["ok", "boom", "coreml"]
    assert list(table["outcome"]) == ["finished", "failed", "skipped"]
    assert table.loc[0, "rtfx"] == 80.0 and table.loc[0, "backend.resolved"] == "torch"
    assert math.isnan(table.loc[1, "rtfx"])
    assert table.loc[2, "skip_reason"] == "Core ML execution needs macOS"
    assert table.loc[1, "error"] == "RuntimeError"

    metrics = MlflowClient().get_run(parent_id).data.metrics
    assert {k: metrics[k] for k in ("num_finished", "num_failed", "num_skipped", "num_killed", "num_children")} == {
        "num_finished": 1, "num_failed": 1, "num_skipped": 1, "num_killed": 0, "num_children": 3}
    assert _artifact_paths(parent_id) == {"summary/children.json", "summary/children.csv", "summary/comparison.png"}
    logged = MlflowClient().load_table(tracker.experiment_id, "summary/children.json", run_ids=[parent_id])
    assert list(logged["outcome"]) == ["finished", "failed", "skipped"]
    # summarising again replaces the table (MlflowClient.log_table alone would append)
    tracker.summarize_parent(parent_id, ["der_pyannote", "rtfx"], ["backend.resolved"])
    logged = MlflowClient().load_table(tracker.experiment_id, "summary/children.json", run_ids=[parent_id])
    assert len(logged) == 3

    # resume support: the finished child is found by its overrides, the skipped one is not
    assert tracker.find_finished_child(parent_id, ["backend=torch"]) == table.loc[0, "run_id"]
    assert tracker.find_finished_child(parent_id, ["backend=coreml"]) is None
    tracker.finish_parent(parent_id, "FAILED")
    assert MlflowClient().get_run(parent_id).info.status == "FAILED"
    assert tracker.find_parent("sweep-A") == parent_id
    # a resumed sweep re-opens its parent rather than creating a second one
    assert tracker.get_or_create_parent("sweep-A", {}) == parent_id
    assert MlflowClient().get_run(parent_id).info.status == "RUNNING"


def test_child_failing_inside_with_ends_failed(tracker: Tracker, tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        with tracker.start_child("bad", None, {}) as run:
            run.log_metrics({"time_build_s": 0.5})
            1 / 0  # noqa: B018
    info = MlflowClient().get_run(run.run_id)
    assert info.info.status == "FAILED" and run.status == "FAILED"
    assert info.data.tags["diaropt.error_type"] == "ZeroDivisionError"
    assert "mlflow.parentRunId" not in info.data.tags  # parent None: a plain run
    assert "error.txt" in _artifact_paths(run.run_id)
    text = Path(MlflowClient().download_artifacts(run.run_id, "error.txt", str(tmp_path))).read_text()
    assert "ZeroDivisionError" in text and "Traceback" in text
    # ending again is a no-op; an invalid status is refused
    run.end("FINISHED")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    with pytest.raises(ValueError):
        run.end("DONE")


def test_close_stale_runs_closes_only_dead_local_runs(tracker: Tracker) -> None:
    assert not tracking.pid_alive(DEAD_PID)
    dead = tracker.start_child("dead", None, {})
    MlflowClient().set_tag(dead.run_id, "diaropt.pid", str(DEAD_PID))
    alive = tracker.start_child("alive", None, {})  # this process
    remote = tracker.start_child("remote", None, {})
    MlflowClient().set_tag(remote.run_id, "diaropt.pid", str(DEAD_PID))
    MlflowClient().set_tag(remote.run_id, "diaropt.host", "some-other-host")
    parent_id = tracker.get_or_create_parent("sweep-stale", {})
    MlflowClient().set_tag(parent_id, "diaropt.pid", str(DEAD_PID))

    assert tracker.close_stale_runs() == 1
    run = MlflowClient().get_run(dead.run_id)
    assert run.info.status == "KILLED" and run.data.tags["diaropt.closed_reason"] == "process died"
    for run_id in (alive.run_id, remote.run_id, parent_id):
        assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert tracker.close_stale_runs("test-exp") == 0
    # parents only on request (a parent outlives the worker that created it)
    assert tracker.close_stale_runs(include_parents=True) == 1
    assert MlflowClient().get_run(parent_id).info.status == "KILLED"


# --- concurrency, signals, failures -----------------------------------------------------------


def _parent_worker(uri: str, barrier, queue) -> None:
    barrier.wait()  # race the store's first use (schema migrations)...
    tracker = Tracker(uri, "test-exp")
    barrier.wait()  # ...and the parent's creation
    queue.put(tracker.get_or_create_parent("multirun/concurrent", {"diaropt.worker": str(os.getpid())}))


def test_concurrent_get_or_create_parent_yields_one(tmp_path: Path) -> None:
    store_uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"  # not migrated yet: the workers race to create it
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4, timeout=40), ctx.Queue()  # a crashed worker breaks the barrier
    workers = [ctx.Process(target=_parent_worker, args=(store_uri, barrier, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 50
    try:
        for worker in workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    ids = {queue.get(timeout=5) for _ in workers}
    assert len(ids) == 1
    tracker = Tracker(store_uri, "test-exp")
    parents = tracker.search("tags.`diaropt.role` = 'parent'")
    assert [run.info.run_id for run in parents] == list(ids)
    assert parents[0].data.tags["diaropt.sweep_id"] == "multirun/concurrent"


def test_sigterm_ends_run_killed_and_exits(tmp_path: Path, store_uri: str) -> None:
    tracker = Tracker(store_uri, "test-exp")  # the store exists before the child process starts
    ready = tmp_path / "run_id"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from diaropt.tracking import Tracker, install_sigterm_handler
        run = Tracker({store_uri!r}, "test-exp").start_child("sleeper", None, {{}})
        restore = install_sigterm_handler(run)
        try:
            with run:
                Path({str(ready)!r}).write_text(run.run_id)
                time.sleep(60)
        finally:
            restore()
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 40
    while not ready.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "child process did not start its run"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    run = tracker.client.get_run(ready.read_text())
    assert run.info.status == "KILLED"
    assert run.data.tags["diaropt.closed_reason"] == "SIGTERM"


def test_sigterm_handler_is_restored(tracker: Tracker) -> None:
    before = signal.getsignal(signal.SIGTERM)
    run = tracker.start_child("x", None, {})
    restore = tracking.install_sigterm_handler(run)
    assert signal.getsignal(signal.SIGTERM) is not before
    restore()
    assert signal.getsignal(signal.SIGTERM) is before
    run.end()


def test_unreachable_or_unusable_store_raises(tmp_path: Path) -> None:
    with pytest.raises(TrackingUnavailable, match="cannot create"):
        Tracker("sqlite:////proc/diaropt-no/mlflow.db", "x")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TrackingUnavailable, match="no answer"):
        Tracker(f"http://127.0.0.1:{port}", "x", lock_dir=tmp_path)
    with pytest.raises(TrackingUnavailable, match="filesystem tracking backend"):  # refused by MLflow 3.17
        Tracker((tmp_path / "mlruns").as_uri(), "x", lock_dir=tmp_path)
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_text("this is not sqlite " * 100)
    with pytest.raises(TrackingUnavailable):
        Tracker(f"sqlite:///{not_a_db}", "x")


def test_retry_locked_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking_store.time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry_locked(flaky) == "ok" and len(calls) == 3

    def always_locked() -> None:
        calls.append(1)
        raise MlflowException("database is locked")

    calls.clear()
    with pytest.raises(MlflowException):
        tracking.retry_locked(always_locked, attempts=4)
    assert len(calls) == 4

    def other_error() -> None:
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST")

    calls.clear()
    with pytest.raises(MlflowException):
        tracking.retry_locked(other_error)
    assert len(calls) == 1  # only lock errors are retried


def test_log_metrics_rejects_non_numbers(tracker: Tracker) -> None:
    with tracker.start_child("m", None, {}) as run:
        with pytest.raises(TypeError):
            run.log_metrics({"der": "0.2"})
        run.log_metrics({"loss": 1.0}, step=3)
        run.log_metrics({"loss": 0.5}, step=4)
    history = tracker.client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.0), (4, 0.5)]
    assert isinstance(run, JobRun) and run.status == "FINISHED"
    assert pd.api.types.is_number(tracker.client.get_run(run.run_id).data.metrics["loss"])


# --- what the MLflow UI shows -------------------------------------------------------------------


def test_experiment_opens_on_runs_table(store_uri: str) -> None:
    """New and existing experiments get ``mlflow.experimentKind = custom_model_development``."""
    from diaropt.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(store_uri)
    existing = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(existing).tags
    for name in ("made-elsewhere", "brand-new"):
        tracker = Tracker(store_uri, name)
        assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_parent_named_by_swept_axes_and_plot_without_build(tracker: Tracker,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from diaropt.tracking import experiment

    drawn: list[pd.DataFrame] = []
    real = experiment.comparison_figure
    labels: list[list[str]] = []
    monkeypatch.setattr(experiment, "comparison_figure",
                        lambda frame, names, *a: drawn.append(frame) or labels.append(names) or real(frame, names, *a))
    parent_id = tracker.get_or_create_parent("sweep-names", {})
    for quant in ("fp16", "int8"):
        with tracker.start_child(f"quant={quant}", parent_id,
                                 {"diaropt.overrides": f"quant={quant} tracking.tracking_uri=x",
                                  "diaropt.timing_source": "target" if quant == "fp16" else "proxy"}) as run:
            run.log_metrics({"der_pyannote": 0.2, "rtfx": 3.0, "time_build_s": 300.0, "time_warmup_s": 5.0,
                             "time_segmentation_s": 1.0, "time_embedding_s": 2.0})
    tracker.summarize_parent(parent_id, ["der_pyannote", "rtfx"], [])
    name = MlflowClient().get_run(parent_id).info.run_name
    assert name.startswith("quant=fp16,int8 @ ") and name.endswith(" UTC")
    columns = set(drawn[0].columns)
    assert {"metrics.time_segmentation_s", "metrics.time_embedding_s"} <= columns
    assert not {"metrics.time_build_s", "metrics.time_warmup_s"} & columns
    assert labels[0] == ["quant=fp16", "quant=int8 [timing proxy]"]


def test_sweep_run_name_reads_json_and_space_joined_override_tags() -> None:
    from datetime import datetime, timezone

    from diaropt.keys import overrides_tag
    from diaropt.tracking.experiment import sweep_run_name

    started = datetime(2026, 12, 1, 1, 2, tzinfo=timezone.utc)
    tags = [overrides_tag(["quant=fp16", "dataset.audio_dir=/data/my set"]),
            overrides_tag(["quant=int8", "dataset.audio_dir=/data/my set"])]
    assert sweep_run_name(tags, started) == "quant=fp16,int8 @ 2026-12-01 01:02 UTC"
    assert sweep_run_name(["quant=fp16 seed=1", "quant=int8 seed=1"], started) == "quant=fp16,int8 @ 2026-12-01 01:02 UTC"
