"""Parallel sweep jobs that survive a worker's death (``hydra/launcher=joblib``).

Hydra's joblib launcher runs the jobs with ``joblib.Parallel`` on one loky pool: when a worker
process dies (SIGKILL, out of memory, a crash in native code, ``os._exit``) loky raises
``TerminatedWorkerError``, kills the pool's other workers (so the healthy jobs in flight are lost)
and Hydra ends the sweep. This launcher keeps joblib's process model (loky workers, cloudpickled
task, at most ``n_jobs`` at once) but gives every job a pool of its own: a worker's death breaks only
its job, which is recorded FAILED (:func:`diaropt.sweep.close_dead_worker_job`: the child run FAILED
with the reason, the sweep's status file), while the other jobs run on and the sweep ends normally
(its summary, the parent FAILED, exit 1). ``resume=true`` on the same sweep dir re-runs the job.

Starting a process per job costs a Python start-up and the imports (seconds), small next to a job.
The Hydra plugin class is :class:`hydra_plugins.diaropt_launcher.joblib_launcher.ProcessPerJobLauncher`
(Hydra instantiates launchers only from ``hydra_plugins``); ``conf/hydra/launcher/joblib.yaml`` selects
it in place of the plugin's own ``joblib`` config.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def n_workers(n_jobs: int) -> int:
    """joblib's meaning of ``n_jobs``: a positive count, or -1 for every CPU, -2 for all but one, ..."""
    if n_jobs == 0:
        raise ValueError("hydra.launcher.n_jobs must not be 0 (a positive count, or -1 for every CPU)")
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


#: The hydra-joblib-launcher schema's other fields (Hydra merges that schema into
#: ``conf/hydra/launcher/joblib.yaml``): their plugin defaults, and whether a value differing from it
#: changes what runs (refused) or only how joblib batches and memory-maps arguments (ignored: every job
#: is one task in a worker of its own).
JOBLIB_OPTIONS = {"backend": (None, True), "prefer": ("processes", True), "require": (None, True),
                  "timeout": (None, True), "verbose": (0, False), "pre_dispatch": ("2*n_jobs", False),
                  "batch_size": ("auto", False), "temp_folder": (None, False), "max_nbytes": (None, False),
                  "mmap_mode": ("r", False)}


def check_joblib_options(options: dict[str, Any]) -> None:
    """Refuse joblib options this launcher does not honour (a thread backend, a task timeout).

    Raises:
        ValueError: an unknown option, or one whose value would change what runs (names it).
    """
    for key, value in options.items():
        if key not in JOBLIB_OPTIONS:
            raise ValueError(f"hydra.launcher.{key}: unknown option of diaropt's joblib launcher "
                             f"(it takes n_jobs and the joblib plugin's {sorted(JOBLIB_OPTIONS)})")
        default, matters = JOBLIB_OPTIONS[key]
        if matters and value != default and not (key == "backend" and value == "loky"):
            raise ValueError(f"hydra.launcher.{key}={value}: not supported by diaropt's joblib launcher (each job "
                             f"runs in a loky worker process of its own; leave it at {default})")


def _sweep_config(hydra_context: HydraContext, config: DictConfig, job_num: int,
                  overrides: Sequence[str]) -> DictConfig:
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{job_num}"
        sweep_config.hydra.job.num = job_num
    return sweep_config


def execute_job(job_num: int, overrides: Sequence[str], hydra_context: HydraContext, config: DictConfig,
                task_function: TaskFunction, singleton_state: dict[Any, Any]) -> JobReturn:
    """One job in a worker process (as Hydra's joblib launcher runs it)."""
    from hydra.core.hydra_config import HydraConfig

    from diaropt.quiet import quiet_third_party

    quiet_third_party()  # a fresh interpreter: the entry point's filters are not inherited
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = _sweep_config(hydra_context, config, job_num, overrides)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def worker_death_reason(error: BaseException) -> str:
    """``worker process died (exit codes {SIGKILL(-9)})`` from loky's ``TerminatedWorkerError``."""
    found = re.search(r"exit codes of the workers are (\{[^}]*\})", str(error))
    if found:
        return f"worker process died (exit codes {found.group(1)})"
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"worker pool broke ({type(error).__name__}: {first_line})"


def launch(config: DictConfig, hydra_context: HydraContext, task_function: TaskFunction, n_jobs: int,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Run the jobs on ``n_workers(n_jobs)`` worker processes, each in a loky pool of its own.

    A worker runs one job at a time and is reused for the next (as joblib reuses its workers); a
    worker that dies breaks only its own pool, which is replaced. Returns one ``JobReturn`` per job,
    in order. A job whose worker died returns ``COMPLETED`` with NaN objectives (as a failed job's
    ``main`` does, so the sweep and a search sweeper go on). An interrupt (Ctrl-C, SIGTERM turned
    into ``SystemExit`` by :func:`diaropt.sweep._install_sweep_signal_handlers`) kills the workers
    and propagates.
    """
    from joblib.externals.loky.process_executor import BrokenProcessPool, ProcessPoolExecutor

    from diaropt.sweep import close_dead_worker_job
    from diaropt.tracking.host import SWEEP_PID_ENV

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    workers = min(n_workers(int(n_jobs)), max(1, len(job_overrides)))
    log.info("launching %d jobs on %d worker process(es), each in a pool of its own; sweep output dir: %s",
             len(job_overrides), workers, sweep_dir)
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
    singleton_state = Singleton.get_state()
    env = {SWEEP_PID_ENV: str(os.getpid())}  # a parent run belongs to this process, not to a worker
    idle: list[Any] = []
    pending = list(enumerate(job_overrides))
    running: dict[Any, tuple[int, Sequence[str], Any, list[int]]] = {}
    results: list[JobReturn | None] = [None] * len(job_overrides)
    try:
        while pending or running:
            while pending and len(running) < workers:
                idx, overrides = pending.pop(0)
                args = (execute_job, initial_job_idx + idx, overrides, hydra_context, config, task_function,
                        singleton_state)
                executor = idle.pop() if idle else ProcessPoolExecutor(max_workers=1, env=env)
                try:
                    future = executor.submit(*args)
                except BrokenProcessPool:  # an idle worker died between jobs: start a new one
                    executor.shutdown(wait=True)
                    executor = ProcessPoolExecutor(max_workers=1, env=env)
                    future = executor.submit(*args)
                pids = list(getattr(executor, "_processes", {}))  # loky starts the worker on submit
                log.info("job %d started in worker pid %s", initial_job_idx + idx, ",".join(map(str, pids)) or "?")
                running[future] = (idx, overrides, executor, pids)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                idx, overrides, executor, pids = running.pop(future)
                job_num = initial_job_idx + idx
                try:
                    results[idx] = future.result()
                    idle.append(executor)
                except BrokenProcessPool as error:  # TerminatedWorkerError: this job's worker died
                    executor.shutdown(wait=True)
                    reason = worker_death_reason(error)
                    sweep_config = _sweep_config(hydra_context, config, job_num, overrides)
                    close_dead_worker_job(sweep_config, job_num, list(overrides), reason, pids)
                    objectives = list(sweep_config.get("objectives") or [None])
                    nan = float("nan")
                    results[idx] = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=None,
                                             working_dir=None, task_name=sweep_config.hydra.job.name,
                                             status=JobStatus.COMPLETED,
                                             _return_value=nan if len(objectives) == 1 else tuple(nan for _ in objectives))
    except BaseException:  # an interrupt or a launcher error: no worker may outlive the sweep
        for _, _, executor, _ in running.values():
            executor.shutdown(wait=False, kill_workers=True)
        raise
    finally:
        for executor in idle:
            executor.shutdown(wait=True)
    return [r for r in results if r is not None]
