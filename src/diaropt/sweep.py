"""One sweep job (one configuration) logged to MLflow, and the Hydra callback closing a multirun.

A job never takes the sweep down: a failure ends its run FAILED, a configuration this host cannot
run (Core ML execution off macOS, a missing GPU) ends it as *skipped* with the reason, and the job
returns so the launcher goes on. Each job writes its outcome to ``<sweep dir>/.diaropt/<num>.json``;
``SweepCallback.on_multirun_end`` reads them, summarises the parent run, prints one line with the
counts and exits non-zero only if a job failed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diaropt.config import REPO_ROOT, to_container, validate
from diaropt.keys import (AXIS_TAG_PREFIX, DER_FLUIDAUDIO_METRIC, DER_METRIC, DER_PCT_METRIC, PARITY_OK, PEAK_RSS,
                          RTFX_METRIC, STAGES, SUMMARY_METRICS, SUMMARY_PARAMS, TAG_CLOSED_REASON, TAG_ERROR_MESSAGE,
                          TAG_ERROR_TYPE, TAG_JOB_NUM, TAG_PID,
                          TAG_JOBS_PLANNED, TAG_OVERRIDES, TAG_PARITY_FLAG, TAG_SWEEP_DIR, TAG_TIMINGS_COMPARABLE,
                          TAG_TIMINGS_NOTE, TIME_BUILD, overrides_tag, time_metric)

log = logging.getLogger(__name__)

STATUS_DIR = ".diaropt"
PLANNED_FILE = ".diaropt-planned"  # in the sweep dir: the number of jobs the sweep plans


class PeakMemory:
    """Peak resident memory of this process while the ``with`` body runs (sampled every 20 ms).

    Job-local, unlike ``ru_maxrss``, which keeps the process-lifetime peak across sequential jobs.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def current_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best we have
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = self.current_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    def reset(self) -> None:
        """Restart the running peak from the current RSS (e.g. one peak per pipeline stage)."""
        self.peak_bytes = self.current_bytes()


def _hydra_context() -> dict[str, Any]:
    """Run mode, sweep dir, job number, overrides and output dir of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return {"multirun": multirun, "sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None,
            "job_num": int(hydra_cfg.job.num) if multirun else 0,
            "overrides": list(hydra_cfg.overrides.task), "output_dir": Path(hydra_cfg.runtime.output_dir)}


def _write_status(context: dict[str, Any], status: str, **details: Any) -> None:
    """Write the job's outcome to ``<sweep dir>/.diaropt/<num>.json`` atomically (temp + rename).

    Never raises: the outcome is already in MLflow (or its fallback folder); a status file that
    cannot be written (full disk, read-only folder) is logged and costs only the sweep's summary line.
    """
    if not context["multirun"]:
        return
    from diaropt.files import atomic_path

    path = Path(context["sweep_dir"]) / STATUS_DIR / f"{context['job_num']}.json"
    payload = {"status": status, "job_num": context["job_num"], "overrides": context["overrides"], **details}
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, default=str))
    except Exception as error:  # noqa: BLE001 - a status file must not take the job or the sweep down
        log.error("could not write the sweep status file %s (job %s %s): %s: %s", path, context["job_num"],
                  status, type(error).__name__, error)


def _provenance(cfg: DictConfig, backend: str):
    """The job's timing / numerics sources (``diaropt.provenance``)."""
    from diaropt.backends.base import is_macos
    from diaropt.provenance import provenance

    return provenance(backend, to_container(cfg)["quant"]["mode"], is_macos())


def _axis_tags(cfg: DictConfig, backend: str) -> dict[str, str]:
    from diaropt.variants.build import resolve_compute_unit

    container = to_container(cfg)
    return {"backend": backend, "quant": container["quant"]["mode"],
            "frame_extraction": container["frame_extraction"]["mode"],
            "compute_unit": resolve_compute_unit(container["compute_unit"]["name"], backend), "embedding": container["embedding"]["name"],
            "clustering": container["clustering"]["method"], "dataset": container["dataset"]["name"],
            "experiment_preset": str(container.get("experiment_preset"))}


def run_job(cfg: DictConfig, context: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one configuration, log it, and return its metrics ({} if it did not finish).

    With ``tracking.enabled=false`` the job runs the same code, its run written to
    ``<output dir>/local_run/`` (:class:`diaropt.tracking.FileClient`) instead of MLflow, and its
    metrics to ``<output dir>/metrics.json``.
    """
    from diaropt.backends.base import BackendUnavailable
    from diaropt.tracking import (FALLBACK_DIR, LOCAL_RUN_DIR, StoreOrFiles, Tracker, TrackingUnavailable,
                                  fallback_meta, host_tags, install_sigterm_handler, job_overrides, new_fallback_folder,
                                  resolve_tracking_uri, start_fallback_run, start_file_run)
    from diaropt.variants.build import _value, resolve_backend, resolve_compute_unit
    from diaropt.variants.quant import realization

    validate(cfg)
    context = context or _hydra_context()
    output_dir = Path(cfg.paths.output_dir or context["output_dir"])
    backend = resolve_backend(_value(cfg.backend.name))
    if cfg.torch_threads > 0:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    tracked = bool(cfg.tracking.enabled)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, REPO_ROOT)
    sweep_id = (context["sweep_id"] if "sweep_id" in context else context["sweep_dir"]) if context["multirun"] else None
    parent_tags = {TAG_SWEEP_DIR: context["sweep_dir"]} if context["multirun"] else {}
    planned = _planned_jobs(context)
    if planned:
        parent_tags[TAG_JOBS_PLANNED] = str(planned)
    fallback_root = output_dir / FALLBACK_DIR
    tracker: Tracker | None = None
    if tracked:
        try:
            tracker = Tracker(tracking_uri, cfg.tracking.experiment_name)
        except TrackingUnavailable as error:  # keep every result in files; `relog` stores them later
            log.error("%s; this job's results go to %s (store them later with `python -m diaropt.tracking relog "
                      "%s`)", error, fallback_root, fallback_root)
            unavailable = str(error)
    if tracker is not None:
        closed = tracker.close_stale_runs(include_parents=True)  # parents of killed sweeps too
        if closed:
            log.warning("closed %d run(s) left RUNNING by a dead process", closed)
    parent_id = None
    if tracker is not None and context["multirun"]:
        parent_id = tracker.get_or_create_parent(sweep_id, parent_tags)
        if cfg.resume:
            finished = tracker.find_finished_child(parent_id, context["overrides"])
            if finished is not None:
                log.info("resume: job %s already finished as run %s", context["overrides"], finished)
                _write_status(context, "finished", run_id=finished, resumed=True)
                return dict(tracker.client.get_run(finished).data.metrics)
    # the axes in the name; where results go (tracking.*, paths.*, hydra.*) is not part of it
    overrides = job_overrides(context["overrides"])  # resume=true is not part of a job's identity
    run_name = ",".join(o for o in overrides if not o.startswith(("tracking.", "paths.", "hydra.")))
    run_name = run_name or "default"
    tags = {**host_tags(), **{f"{AXIS_TAG_PREFIX}{k}": v for k, v in _axis_tags(cfg, backend).items()},
            **_provenance(cfg, backend).tags(),
            TAG_OVERRIDES: overrides_tag(overrides), TAG_JOB_NUM: str(context["job_num"])}
    meta = fallback_meta(tracking_uri, cfg.tracking.experiment_name, run_name, sweep_id, parent_tags)
    if not tracked:
        run = start_file_run(output_dir / LOCAL_RUN_DIR, run_name, tags, {**meta, "reason": "tracking.enabled=false"})
    elif tracker is None:
        run = start_fallback_run(fallback_root, run_name, tags, meta, unavailable)
    else:
        run = tracker.start_child(run_name, parent_id, tags)
        run.client = StoreOrFiles(run.client, new_fallback_folder(fallback_root), meta)  # if the store fails mid-run
    restore = install_sigterm_handler(run)
    try:
        with run:
            run.log_config(cfg)
            run.log_params({"backend.resolved": backend, "compute_unit.resolved":
                            resolve_compute_unit(_value(cfg.compute_unit.name), backend),
                            "quant.realized": realization(_value(cfg.quant.mode), backend)})
            try:
                metrics = _run_logged(cfg, run, output_dir, backend)
            except BackendUnavailable as error:
                log.warning("skipped: %s", error.reason)
                run.skip(error.reason)
                _write_status(context, "skipped", run_id=run.run_id, reason=error.reason)
                return {}
        if not tracked:
            from diaropt.files import atomic_path

            with atomic_path(output_dir / "metrics.json") as tmp:  # a failed write leaves no partial result
                tmp.write_text(json.dumps(metrics, indent=1))
        _write_status(context, "finished", run_id=run.run_id, der_pyannote=metrics[DER_METRIC])
        return metrics
    except Exception as error:  # noqa: BLE001 - the run is FAILED already; the sweep goes on
        log.error("job failed: %s: %s", type(error).__name__, error)
        _write_status(context, "failed", run_id=run.run_id, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc())
        if not context["multirun"]:
            raise
        return {}
    except (KeyboardInterrupt, SystemExit) as error:  # Ctrl-C, or SystemExit(143) from the SIGTERM handler
        restore()  # the child ends KILLED first (if an MLflow call was in flight when the signal came)
        if tracker is not None and parent_id is not None and not (isinstance(error, SystemExit) and error.code in (0, None)):
            reason = run._terminated_by or ("SIGINT" if isinstance(error, KeyboardInterrupt) else f"exit {error.code}")
            _close_interrupted_parent(tracker, parent_id, context, planned, reason)
        raise
    finally:
        restore()


def _planned_jobs(context: dict[str, Any]) -> int | None:
    """The number of jobs the sweep plans (written by ``SweepCallback.on_multirun_start``), or None."""
    if not context["multirun"]:
        return None
    try:
        return int((Path(context["sweep_dir"]) / PLANNED_FILE).read_text())
    except (OSError, ValueError):
        return None


def _close_interrupted_parent(tracker, parent_id: str, context: dict[str, Any], planned: int | None,
                              reason: str) -> None:
    """End an interrupted sweep's parent KILLED (FINISHED if every planned job finished), then summarise it.

    Best effort: never masks the interrupt. Hydra's ``on_multirun_end`` does not run after an
    interrupt, so without this the parent would stay RUNNING until a later sweep closes it as stale.
    """
    try:
        statuses = read_statuses(Path(context["sweep_dir"]))
        done = sum(1 for s in statuses if s["status"] in ("finished", "skipped"))
        status = "FINISHED" if planned and done >= planned else "KILLED"
        from diaropt.tracking import retry_locked

        retry_locked(tracker.client.set_tag, parent_id, TAG_CLOSED_REASON, f"{reason} during job {context['job_num']}")
        tracker.finish_parent(parent_id, status)
        log.warning("sweep interrupted (%s): parent run %s ended %s; %d of %s planned job(s) done", reason,
                    parent_id, status, done, planned if planned else "?")
        tracker.summarize_parent(parent_id, SUMMARY_METRICS, SUMMARY_PARAMS)
    except Exception as error:  # noqa: BLE001 - exiting matters more; a later sweep closes it as stale
        log.error("could not close the parent run %s of the interrupted sweep: %s", parent_id, error)


def _run_logged(cfg: DictConfig, run, output_dir: Path, backend: str) -> dict[str, float]:
    """Build, run and score one configuration, logging everything on ``run`` (a ``JobRun``)."""
    from diaropt.parity import parity_flag, run_parity
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import ChunkProgress, dataset_from_config, dataset_sha256, load_pipeline, run_dataset
    from diaropt.backends import coreml_program
    from diaropt.provenance import effective_repeats, without_timings
    from diaropt.variants.build import build_models

    source = _provenance(cfg, backend)
    coreml_program.reset_stats()
    with PeakMemory() as memory:
        start = time.perf_counter()
        built = build_models(cfg)
        run.log_metrics({TIME_BUILD: time.perf_counter() - start, **built.graph_metrics()})
        run.log_params({f"weights_sha256.{k}": v for k, v in built.weights_sha256.items()})
        if backend == "onnxruntime":  # the level each session runs at (the build's probe may lower it)
            run.log_params({f"ort_optimization_level.{m.kind}": m.info.get("ort_level", cfg.backend.ort_optimization_level)
                            for m in built.models() if m.path is not None})
        for model in built.models():
            run.log_json(model.info, f"models/{model.kind}_info.json")
            if model.path is not None and (model.path.parent / "op_histogram.json").is_file():
                run.log_file(model.path.parent / "op_histogram.json", f"models/{model.kind}")
            if cfg.tracking.log_models and model.path is not None:
                (run.log_dir if model.path.is_dir() else run.log_file)(model.path, f"models/{model.kind}")
        dataset = dataset_from_config(cfg)
        run.log_params({"dataset.uris": ",".join(item.uri for item in dataset),
                        "dataset.sha256": dataset_sha256(dataset)})
        timer = StageTimer()
        progress = ChunkProgress(enabled=sys.stderr.isatty())
        pipeline = load_pipeline(cfg, built, timer, progress)  # BackendUnavailable: skipped upstream
        repeats = effective_repeats(cfg.repeats, source)  # null: 3 if timed, else 1
        log.info("repeats: %d timed pass(es) over %d file(s) (%s; timing source %s)", repeats, len(dataset),
                 "repeats=null: auto" if cfg.repeats is None else f"repeats={cfg.repeats}", source.timing_source)
        result = run_dataset(pipeline, dataset, output_dir / "rttm", timer, repeats=repeats,
                             max_duration_s=cfg.dataset.max_duration_s, show_progress=sys.stderr.isatty(),
                             keep_arrays=cfg.parity.enabled)
        progress.close()
    metrics = {**result.aggregate, PEAK_RSS: float(memory.peak_bytes)}
    metrics[DER_PCT_METRIC] = 100 * metrics[DER_METRIC]  # the UI shows percent without arithmetic
    executor_rtfx = metrics.get(RTFX_METRIC)
    if not source.logs_timings:  # numbers from the executor: its timings are not the target's
        metrics = without_timings(metrics)
        result.rows = [without_timings(row) for row in result.rows]
    overflows = nonfinite_segmentation = 0.0
    for label, stats in coreml_program.collected_stats().items():
        executor_metrics = stats.as_metrics(f"executor_{label}")
        overflows += executor_metrics[f"executor_{label}_fp16_overflows"]
        if label in ("segmentation", "preprocessor"):
            nonfinite_segmentation += executor_metrics[f"executor_{label}_nonfinite_outputs"]
        metrics.update(executor_metrics)
    run.log_metrics(metrics)
    if cfg.parity.enabled:  # after the job's timings and memory: the reference run is not part of them
        parity = run_parity(cfg, backend, result)
        run.log_metrics(parity)
        metrics.update(parity)
        flag = parity_flag(parity, cfg.parity.cosine_floor)
        # NaN / inf the reference does not have: fp16 overflows anywhere in a Core ML program, or
        # non-finite segmentation outputs (e.g. log of an fp16 softmax that underflowed to 0).
        # Masked-out speaker slots' embeddings are NaN by design in every backend.
        if overflows > 0 or nonfinite_segmentation > 0:
            parity[PARITY_OK] = metrics[PARITY_OK] = 0.0
            run.log_metrics({PARITY_OK: 0.0})
            flag = (f"nonfinite_outputs ({int(nonfinite_segmentation)} non-finite segmentation values, "
                    f"{int(overflows)} fp16 overflows in the Core ML programs)")
        run.set_tags({TAG_PARITY_FLAG: flag})
    if result.aggregate.get("array_cache_hits", 0) > 0:
        run.set_tags({TAG_TIMINGS_COMPARABLE: "false", TAG_TIMINGS_NOTE: "network outputs came from the array cache"})
    run.log_table(result.rows, "results/per_file.json")
    run.log_dir(output_dir / "rttm", "rttm")
    if source.logs_timings:
        run.log_timing_plot({stage: result.aggregate[time_metric(stage)] for stage in STAGES})
        log.info("%s: DER %.2f %% (pyannote) / %.2f %% (fluidaudio), RTFx %.1f", backend,
                 100 * result.aggregate[DER_METRIC], 100 * result.aggregate[DER_FLUIDAUDIO_METRIC],
                 result.aggregate[RTFX_METRIC])
    else:  # the executor's speed goes to the job log only, never to the metrics
        log.info("%s (%s numerics, timings not measured): DER %.2f %% (pyannote) / %.2f %% (fluidaudio); "
                 "executor RTFx %.2f (this host, not Core ML)", backend, source.numerics_source,
                 100 * result.aggregate[DER_METRIC], 100 * result.aggregate[DER_FLUIDAUDIO_METRIC], executor_rtfx)
    return metrics


def read_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    folder = Path(sweep_dir) / STATUS_DIR
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def validate_sweep(config: DictConfig) -> int:
    """Check the configuration of every job of a sweep, and each distinct dataset, before the first job.

    Every value of every job is range/choice/cross-field checked (:func:`diaropt.config.validate`,
    derived from the schema), so ``-m segmentation.step_s=1,20`` or ``clustering.threshold=7`` fails
    in seconds with nothing built instead of after a job. Jobs are what the sweeper will run: for the
    basic sweeper the product of the command line's and ``hydra.sweeper.params``' values; for a
    search sweeper (Optuna) its search space cannot be enumerated, so each value of each searched
    parameter (both ends of an interval) is checked on top of the command line's overrides. Then each
    distinct dataset of the jobs is loaded (references and UEMs parsed) and checked once
    (:func:`diaropt.data.checks.check_dataset`: audio decodes, references end within their audio),
    instead of once per job after its models are built.

    Returns:
        the number of job configurations checked.

    Raises:
        ValueError: a job's configuration is out of range, or its dataset cannot be used (names the
            job's overrides and the key or file; "no job was started").
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.get("sweeper") or {}
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    basic = str(sweeper.get("_target_", "")).endswith("BasicSweeper")
    task = list(config.hydra.overrides.task)
    parser = OverridesParser.create()
    try:
        loader = GlobalHydra.instance().config_loader()
        arguments = ([f"{k}={v}" for k, v in params.items()] if basic else []) + task
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
                for job in batch]
        if not basic:  # a search space: each searched value on top of the command line's jobs
            extra = []
            for key, value in params.items():
                override = parser.parse_override(f"{key}={value}")
                if override.is_interval_sweep():
                    interval = override.value()
                    values = [str(interval.start), str(interval.end)]
                else:
                    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [value]
                extra += [[*job, f"{key}={one}"] for job in jobs for one in values]
            jobs += extra
    except Exception as error:  # noqa: BLE001 - a sweep this cannot expand: each job validates itself
        log.debug("sweep not expanded for validation: %s", error)
        return 0
    job_cfgs = []
    for overrides in jobs:
        try:
            job_cfg = loader.load_sweep_config(config, list(overrides))
        except Exception as error:  # noqa: BLE001 - Hydra reports key/type errors itself
            log.debug("job %s not composed for validation: %s", overrides, error)
            continue
        try:
            validate(job_cfg)
            direction = sweeper.get("direction")
            if not basic and direction is not None and not isinstance(direction, str) \
                    and len(direction) != len(job_cfg.objectives):
                raise ValueError(f"hydra.sweeper.direction has {len(direction)} entries but objectives "
                                 f"{list(job_cfg.objectives)} has {len(job_cfg.objectives)}: one direction per objective")
        except ValueError as error:
            raise ValueError(f"job {' '.join(overrides)}: {error} (no job was started)") from None
        job_cfgs.append((overrides, job_cfg))
    _check_sweep_datasets(job_cfgs)
    return len(jobs)


def _check_sweep_datasets(job_cfgs: list[tuple[list[str], DictConfig]]) -> None:
    """Load and check each distinct dataset of the jobs once (see :func:`validate_sweep`)."""
    from diaropt.data.checks import check_dataset
    from diaropt.runner import dataset_from_config

    checked: set[str] = set()
    for overrides, job_cfg in job_cfgs:
        try:
            container = to_container(job_cfg)
            key = json.dumps([container["dataset"], container["paths"]["cache_dir"]], sort_keys=True, default=str)
        except Exception as error:  # noqa: BLE001 - e.g. a mandatory dataset option left unset
            raise ValueError(f"job {' '.join(overrides)}: dataset: {type(error).__name__}: {error} "
                             "(no job was started)") from None
        if key in checked:
            continue
        checked.add(key)
        try:
            dataset = dataset_from_config(job_cfg)
            check_dataset(dataset, job_cfg.dataset.max_duration_s)
        except Exception as error:  # noqa: BLE001 - every job would fail on it: stop the sweep here
            raise ValueError(f"job {' '.join(overrides)}: dataset {job_cfg.dataset.name!r} cannot be used: "
                             f"{type(error).__name__}: {error} (no job was started)") from None
        log.info("dataset %r checked: %d file(s)", dataset.name, len(dataset))


_ENDED: set[str] = set()  # sweep dirs whose on_multirun_end ran in this process
_SIGNALLED: list[str] = []  # SIGINT/SIGTERM received by the sweep's process (the sweep handlers), oldest first


def _install_sweep_signal_handlers() -> None:
    """Make SIGTERM and SIGINT end the sweep's process through Python (``SystemExit(128 + n)``,
    ``KeyboardInterrupt``) for the whole multirun, between jobs too, and remember which came.

    Without it a SIGTERM between two jobs (no job's handler installed) killed the process with the
    default action, atexit handlers unrun, and the parent stayed RUNNING until a later sweep closed it.
    A job's own SIGTERM handler (:func:`diaropt.tracking.install_sigterm_handler`) ends its run first
    and then calls this one. A signal arriving while the main thread is inside an MLflow call is
    raised as that call returns (:func:`diaropt.tracking.store.interrupt_after_call`; a second Ctrl-C
    interrupts at once). Handlers set by someone else (not the defaults) are left in place.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    from diaropt.tracking.store import interrupt_after_call

    def on_sigterm(signum: int, frame: Any) -> None:
        _SIGNALLED.append(signal.Signals(signum).name)
        error = SystemExit(128 + signum)
        if not interrupt_after_call(error):  # else raised when the MLflow call under way returns
            raise error

    def on_sigint(signum: int, frame: Any) -> None:
        _SIGNALLED.append("SIGINT")
        error = KeyboardInterrupt()
        if not interrupt_after_call(error):  # a second Ctrl-C during the call interrupts at once
            raise error

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)


def close_dead_worker_job(cfg: DictConfig, job_num: int, overrides: list[str], reason: str,
                          worker_pids: list[int] | None = None) -> None:
    """Record a job whose worker process died (called by :mod:`diaropt.launcher` in the sweep's process).

    Its child run (the latest with its ``diaropt.job_num`` under the sweep's parent, RUNNING or already
    closed as ``process died`` by another job's stale-run check; the worker's pid when known) ends
    FAILED with ``diaropt.closed_reason``/``diaropt.error_message`` = ``reason`` and
    ``diaropt.error_type = WorkerDied``; its status file says ``failed``, so the sweep's summary counts
    it and exits 1. Never raises: the other jobs go on.
    """
    sweep_dir = str(Path(cfg.hydra.sweep.dir).resolve())
    context = {"multirun": True, "sweep_dir": sweep_dir, "job_num": job_num, "overrides": list(overrides)}
    run_id = None
    if cfg.tracking.enabled:
        try:
            from diaropt.tracking import JobRun, Tracker, resolve_tracking_uri, sqlite_path

            uri = resolve_tracking_uri(cfg.tracking.tracking_uri or None, REPO_ROOT)
            path = sqlite_path(uri)
            if path is None or path.is_file():  # a store no job reached: create nothing
                tracker = Tracker(uri, cfg.tracking.experiment_name)
                parent_id = tracker.find_parent(sweep_dir)
                candidates = [] if parent_id is None else [
                    c for c in tracker.children(parent_id) if c.data.tags.get(TAG_JOB_NUM) == str(job_num)
                    and (c.info.status == "RUNNING" or (c.info.status == "KILLED"
                                                        and c.data.tags.get(TAG_CLOSED_REASON) == "process died"))
                    and (not worker_pids or c.data.tags.get(TAG_PID) in {str(pid) for pid in worker_pids})]
                if candidates:
                    child = candidates[-1]  # the newest (children are oldest first)
                    run = JobRun(tracker.client, child.info.run_id, child.info.run_name)
                    run.set_tags({TAG_CLOSED_REASON: reason, TAG_ERROR_TYPE: "WorkerDied", TAG_ERROR_MESSAGE: reason})
                    from diaropt.tracking import retry_locked

                    retry_locked(tracker.client.set_terminated, run.run_id, "FAILED")
                    run_id = run.run_id
        except Exception as error:  # noqa: BLE001 - the other jobs matter more; a later start closes it KILLED
            log.error("could not end the run of job %d (its worker died) FAILED: %s: %s", job_num,
                      type(error).__name__, error)
    _write_status(context, "failed", run_id=run_id, error=reason)
    log.error("job %d (%s): %s; %s; the other jobs go on (resume=true on this sweep dir re-runs it)", job_num,
              " ".join(overrides), reason, f"its run {run_id} ended FAILED" if run_id else "no run of it was found")


def _close_abandoned_sweep(sweep_dir: str, tracking_uri: str, experiment_name: str, wait_s: float = 10.0) -> None:
    """At exit of a multirun that did not reach ``on_multirun_end`` (a SIGINT/SIGTERM between two jobs,
    or the launcher raised): close its runs and say so on stderr.

    Children of dead workers end KILLED (``process died``) once their processes are gone (the
    launcher kills the surviving workers; waited for up to ``wait_s``). The parent ends KILLED with
    ``diaropt.closed_reason`` (``SIGTERM between jobs (after job N)``, or a launcher error), or
    FINISHED/FAILED when every planned job had run, and is summarised. A signal during a job is
    handled by the job (:func:`run_job` closes the parent); this covers the time between jobs.
    Best effort: never raises.
    """
    if sweep_dir in _ENDED:
        return
    try:
        from diaropt.tracking import Tracker, resolve_tracking_uri, retry_locked, sqlite_path

        uri = resolve_tracking_uri(tracking_uri or None, REPO_ROOT)
        path = sqlite_path(uri)
        if path is not None and not path.is_file():  # no job reached the store: create nothing
            return
        tracker = Tracker(uri, experiment_name)
        parent_id = tracker.find_parent(sweep_dir)
        if parent_id is None:
            return
        in_flight = sorted(int(c.data.tags.get(TAG_JOB_NUM, -1)) for c in tracker.children(parent_id)
                           if c.info.status == "RUNNING")  # jobs of workers the launcher stopped
        deadline = time.monotonic() + wait_s
        while True:
            tracker.close_stale_runs()
            running = [c for c in tracker.children(parent_id) if c.info.status == "RUNNING"]
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if retry_locked(tracker.client.get_run, parent_id).info.status != "RUNNING":
            return
        for child in running:  # a worker still alive after the wait: its run cannot go on without the sweep
            tracker._close(child, "the sweep ended abnormally")
        statuses = read_statuses(Path(sweep_dir))
        done = sum(1 for s in statuses if s["status"] in ("finished", "skipped"))
        failed = sum(1 for s in statuses if s["status"] == "failed")
        planned = _planned_jobs({"multirun": True, "sweep_dir": sweep_dir})
        if _SIGNALLED and in_flight:  # a parallel launcher: its workers were stopped mid-job
            reason = f"{_SIGNALLED[-1]} while job(s) {', '.join(map(str, in_flight))} ran in worker processes"
        elif _SIGNALLED:
            last = max((s["job_num"] for s in statuses), default=None)
            reason = f"{_SIGNALLED[-1]} between jobs" + (f" (after job {last})" if last is not None else "")
        else:
            reason = "the sweep ended before its end-of-sweep summary (launcher error)"
        status = ("FAILED" if failed else "FINISHED") if planned and done + failed >= planned else "KILLED"
        retry_locked(tracker.client.set_tag, parent_id, TAG_CLOSED_REASON, reason)
        tracker.finish_parent(parent_id, status)
        tracker.summarize_parent(parent_id, SUMMARY_METRICS, SUMMARY_PARAMS)
        print(f"sweep {sweep_dir} stopped ({reason}): parent run {parent_id} ended {status}; {done + failed} of "
              f"{planned or '?'} planned job(s) ran ({failed} failed)"
              + ("" if status != "KILLED" else "; run the same command with resume=true to run the rest"),
              file=sys.stderr, flush=True)
    except Exception as error:  # noqa: BLE001 - at exit: report, never raise
        log.error("could not close the runs of the abandoned sweep %s: %s", sweep_dir, error)


_SWEEP_LOCKS: dict[str, Any] = {}  # sweep dir -> its FileLock, held by the process running the multirun


def _lock_sweep_dir(sweep_dir: Path):
    """Hold ``<sweep dir>/.diaropt-sweep.lock`` for this multirun; exit 2 if another process holds it.

    Two runs of one sweep dir at once would both add children to its parent and overwrite each
    other's status files. The lock is an OS file lock: it is released when the process dies.
    """
    from filelock import FileLock, Timeout

    folder = sweep_dir  # not STATUS_DIR: it exists only once a job has run
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".diaropt-sweep.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = (folder / ".diaropt-sweep.pid").read_text().strip()
        except OSError:
            owner = "?"
        print(f"error: sweep dir {sweep_dir} is being run by another process (pid {owner}); wait for it to end "
              "or choose another hydra.sweep.dir (nothing was started)", file=sys.stderr, flush=True)
        sys.exit(2)
    from diaropt.files import atomic_path

    with atomic_path(folder / ".diaropt-sweep.pid") as tmp:  # read by a refused second run: never partial
        tmp.write_text(str(os.getpid()))
    return lock


class SweepCallback(Callback):
    """Closes a multirun: parent-run summary, one line of counts, non-zero exit if a job failed.

    Before the first job it range-checks every job's configuration (:func:`validate_sweep`).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            checked = validate_sweep(config)
        except ValueError as error:  # Hydra turns a callback's exception into a warning: exit instead
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        _SWEEP_LOCKS[str(sweep_dir)] = _lock_sweep_dir(sweep_dir)  # not on self: launchers pickle the callbacks
        finished = [st for st in read_statuses(sweep_dir) if st["status"] == "finished"]
        if finished and not config.get("resume"):
            log.warning("sweep dir %s already has %d finished job(s) from an earlier run; without resume=true every "
                        "job runs again and adds new child runs under the same parent (resume=true keeps the "
                        "finished ones)", sweep_dir, len(finished))
        _install_sweep_signal_handlers()  # between jobs too: a signal then ends the process through atexit
        if config.tracking.enabled:  # Hydra skips on_multirun_end when the launcher raises
            atexit.register(_close_abandoned_sweep, str(sweep_dir), str(config.tracking.tracking_uri or ""),
                            str(config.tracking.experiment_name))
        sweeper = config.hydra.get("sweeper") or {}
        planned = checked if str(sweeper.get("_target_", "")).endswith("BasicSweeper") else sweeper.get("n_trials")
        if planned:  # read by each job: tagged on the parent, used when an interrupt closes it
            try:
                from diaropt.files import atomic_path

                path = Path(config.hydra.sweep.dir).resolve() / PLANNED_FILE
                with atomic_path(path) as tmp:
                    tmp.write_text(str(int(planned)))
            except OSError as error:
                log.error("could not write %s: %s", path, error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _ENDED.add(str(Path(config.hydra.sweep.dir).resolve()))
        try:
            self._finish(config)
        finally:
            lock = _SWEEP_LOCKS.pop(str(Path(config.hydra.sweep.dir).resolve()), None)
            if lock is not None:
                lock.release()

    def _finish(self, config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        statuses = read_statuses(sweep_dir)
        counts = {name: sum(1 for s in statuses if s["status"] == name) for name in ("finished", "skipped", "failed")}
        ui_hint = None
        if config.tracking.enabled:
            try:
                from diaropt.tracking import Tracker, resolve_tracking_uri
                from diaropt.tracking.ui import sweep_hint

                tracker = Tracker(resolve_tracking_uri(config.tracking.tracking_uri, REPO_ROOT),
                                  config.tracking.experiment_name)
                parent_id = tracker.find_parent(str(sweep_dir))
                if parent_id is not None:
                    tracker.summarize_parent(parent_id, SUMMARY_METRICS, SUMMARY_PARAMS)
                    tracker.finish_parent(parent_id, "FAILED" if counts["failed"] else "FINISHED")
                    ui_hint = sweep_hint(tracker.tracking_uri, tracker.experiment_name, tracker.experiment_id,
                                         REPO_ROOT)
            except Exception as error:  # noqa: BLE001 - the jobs' results are already logged
                log.error("could not summarise the sweep in MLflow: %s", error)
        line = (f"sweep {sweep_dir}: {len(statuses)} jobs: {counts['finished']} finished, "
                f"{counts['skipped']} skipped, {counts['failed']} failed")
        print(line, flush=True)
        if ui_hint:  # bare `mlflow ui` opens MLflow 3.17's GenAI view: the command and link that show the runs
            print(ui_hint, flush=True)
        for status in statuses:
            if status["status"] != "finished":
                reason = status.get("reason") or status.get("error")
                print(f"  job {status['job_num']} {status['status']} ({' '.join(status['overrides'])}): {reason}",
                      flush=True)
        from diaropt.tracking import FALLBACK_DIR, fallback_runs

        kept = [f for f in fallback_runs([sweep_dir]) if not (f / "relogged.json").is_file()]
        if kept:
            print(f"  {len(kept)} run(s) could not reach the MLflow store and are kept in {FALLBACK_DIR}/ folders: "
                  f"store them with `python -m diaropt.tracking relog {sweep_dir}`", flush=True)
        if counts["failed"]:
            print("  resume=true on the same sweep dir re-runs the failed job(s) and keeps the finished ones",
                  flush=True)
            sys.exit(1)
