"""Tracking-layer robustness (issue 17, round 2): overrides as a JSON list, interrupts, stale parents."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diaropt.keys import TAG_CLOSED_REASON, TAG_OVERRIDES, TAG_PID, overrides_from_tag, overrides_tag
from diaropt.report.load import parse_overrides
from diaropt.tracking import Tracker


@pytest.fixture()
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")


SPACED = ["dataset.audio_dir='/data/my set'", "quant=int8"]


def test_overrides_with_a_spaced_value_match_on_resume(tracker: Tracker) -> None:
    """``dataset.audio_dir='/data/my set'``: stored as a JSON list and compared as a list, so a
    ``resume=true`` re-run finds the finished child (space-joined + ``.split()`` never matched)."""
    parent_id = tracker.get_or_create_parent("/sweeps/a")
    with tracker.start_child("job", parent_id, {TAG_OVERRIDES: overrides_tag(SPACED)}):
        pass
    assert tracker.find_finished_child(parent_id, [*SPACED, "resume=true"]) is not None
    assert tracker.find_finished_child(parent_id, ["dataset.audio_dir='/data/my'", "quant=int8"]) is None
    assert parse_overrides(overrides_tag(SPACED)) == {"dataset.audio_dir": "'/data/my set'", "quant": "int8"}


def test_old_space_joined_override_tags_are_still_read(tracker: Tracker) -> None:
    parent_id = tracker.get_or_create_parent("/sweeps/b")
    with tracker.start_child("job", parent_id, {TAG_OVERRIDES: "quant=int8 dataset=sample"}):
        pass
    assert tracker.find_finished_child(parent_id, ["quant=int8", "dataset=sample", "resume=true"]) is not None
    assert overrides_from_tag("quant=int8 dataset=sample") == ["quant=int8", "dataset=sample"]
    assert overrides_from_tag(None) == []


# ------------------------------------------------------------------------------------------------
# interrupts: a real Hydra sweep (experiments/sweep.py) whose jobs are fake (no model is built)
# ------------------------------------------------------------------------------------------------

FAKE_SWEEP = """
import runpy, sys, time
import diaropt.sweep as sweep
from diaropt.config import REPO_ROOT
from diaropt.keys import DER_METRIC

def fake_job(cfg, run, output_dir, backend):  # threshold >= 0.6: a long job, to be interrupted
    run.log_metrics({DER_METRIC: 0.1})
    if cfg.clustering.threshold >= 0.6:
        time.sleep(300)
    return {DER_METRIC: 0.1}

sweep._run_logged = fake_job
sys.argv = ["sweep.py", *sys.argv[1:]]
runpy.run_path(str(REPO_ROOT / "experiments/sweep.py"), run_name="__main__")
"""


def _fake_sweep_command(tmp_path: Path, *overrides: str, sweep_dir: str = "sweep") -> list[str]:
    script = tmp_path / "fake_sweep.py"
    script.write_text(FAKE_SWEEP)
    return [sys.executable, str(script), "-m", "dataset=sample", "parity.enabled=false",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment_name=test",
            f"hydra.sweep.dir={tmp_path}/{sweep_dir}", f"paths.cache_dir={tmp_path}/cache", *overrides]


def _runs(tmp_path: Path) -> list[dict]:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = []
        for run_id, status in db.execute("select run_uuid, status from runs").fetchall():
            tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
            runs.append({"run_id": run_id, "status": status, "tags": tags})
    return runs


def _wait_for_job(tmp_path: Path, job_num: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before the job started"
        try:
            if any(r["tags"].get("diaropt.job_num") == str(job_num) and r["status"] == "RUNNING"
                   for r in _runs(tmp_path)):
                return
        except sqlite3.Error:  # not created yet, or locked: ask again
            pass
        time.sleep(0.2)
    raise TimeoutError(f"job {job_num} never ran")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_leaves_no_run_running(tmp_path: Path, sig: signal.Signals) -> None:
    """3 planned jobs, interrupted during job 1: job 0 FINISHED, job 1 KILLED, the parent KILLED with
    the reason and the planned count (was: the parent stayed RUNNING for ever)."""
    process = subprocess.Popen(_fake_sweep_command(tmp_path, "clustering.threshold=0.5,0.6,0.7"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_for_job(tmp_path, 1, process)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0, output[-3000:]
    runs = _runs(tmp_path)
    assert not [r for r in runs if r["status"] == "RUNNING"], output[-3000:]
    (parent,) = [r for r in runs if r["tags"].get("diaropt.role") == "parent"]
    assert parent["status"] == "KILLED"
    assert parent["tags"]["diaropt.closed_reason"].startswith(sig.name)
    assert parent["tags"]["diaropt.jobs_planned"] == "3"
    children = {r["tags"]["diaropt.job_num"]: r["status"] for r in runs if r["tags"].get("diaropt.role") == "child"}
    assert children == {"0": "FINISHED", "1": "KILLED"}


BETWEEN_JOBS_SWEEP = """
import os, runpy, signal, sys
import hydra.core.utils as hydra_utils  # the basic launcher imports run_job from it when Hydra scans it
import diaropt.sweep as sweep
from diaropt.config import REPO_ROOT
from diaropt.keys import DER_METRIC

def fake_job(cfg, run, output_dir, backend):
    run.log_metrics({DER_METRIC: 0.1})
    return {DER_METRIC: 0.1}

real_run_job = hydra_utils.run_job

def run_job_then_signal(*args, **kwargs):  # the signal arrives after a job returned: no job is running
    result = real_run_job(*args, **kwargs)
    if kwargs["config"].hydra.job.num == int(os.environ["AFTER_JOB"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIG"]))
    return result

sweep._run_logged = fake_job
hydra_utils.run_job = run_job_then_signal
sys.argv = ["sweep.py", *sys.argv[1:]]
runpy.run_path(str(REPO_ROOT / "experiments/sweep.py"), run_name="__main__")
"""


@pytest.mark.parametrize("sig,after_job,parent_status", [("SIGTERM", 0, "KILLED"), ("SIGINT", 0, "KILLED"),
                                                         ("SIGTERM", 1, "FINISHED")])
def test_a_signal_between_jobs_closes_the_parent_at_once(tmp_path: Path, sig: str, after_job: int,
                                                          parent_status: str) -> None:
    """Basic launcher, 2 planned jobs, SIGTERM/SIGINT after job ``after_job`` returned (no job running):
    the parent ends before the process exits, KILLED with ``<signal> between jobs (after job N)``
    (FINISHED when every planned job had finished), and stderr says how to resume. Was: SIGTERM
    killed the process with the default action and the parent stayed RUNNING until a later sweep
    closed it as stale; SIGINT closed it with a generic "launcher error or interrupt" reason."""
    import os

    script = tmp_path / "between_jobs_sweep.py"
    script.write_text(BETWEEN_JOBS_SWEEP)
    command = [sys.executable, str(script), *_fake_sweep_command(tmp_path, "clustering.threshold=0.3,0.4")[2:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "SIG": sig, "AFTER_JOB": str(after_job)})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    runs = _runs(tmp_path)
    assert not [r for r in runs if r["status"] == "RUNNING"], output[-3000:]
    (parent,) = [r for r in runs if r["tags"].get("diaropt.role") == "parent"]
    assert parent["status"] == parent_status, output[-3000:]
    assert parent["tags"][TAG_CLOSED_REASON] == f"{sig} between jobs (after job {after_job})"
    children = sorted((r["tags"]["diaropt.job_num"], r["status"]) for r in runs if r["tags"].get("diaropt.role") == "child")
    assert children == [(str(n), "FINISHED") for n in range(after_job + 1)]
    assert f"stopped ({sig} between jobs (after job {after_job})): parent run {parent['run_id']} ended {parent_status}" \
        in result.stderr
    assert ("resume=true" in result.stderr) == (parent_status == "KILLED")


def test_a_stale_parent_is_closed_at_the_next_sweep_start(tmp_path: Path) -> None:
    """A parent RUNNING whose creator died (SIGKILL, power loss) is closed KILLED by the next sweep
    (was: only stale children were closed)."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")
    parent_id = tracker.get_or_create_parent(str(tmp_path / "old_sweep"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker.client.set_tag(parent_id, TAG_PID, str(dead.pid))
    result = subprocess.run(_fake_sweep_command(tmp_path, "clustering.threshold=0.5"), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stale = tracker.client.get_run(parent_id)
    assert stale.info.status == "KILLED"
    assert stale.data.tags[TAG_CLOSED_REASON] == "process died; no running child"
    assert not [r for r in _runs(tmp_path) if r["status"] == "RUNNING"]


def test_a_second_concurrent_run_of_a_sweep_dir_is_refused(tmp_path: Path) -> None:
    """While a sweep runs, a second run of the same sweep dir exits 2 naming the owner and adds no
    run (was: both added children to one parent without a word)."""
    process = subprocess.Popen(_fake_sweep_command(tmp_path, "clustering.threshold=0.6"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_for_job(tmp_path, 0, process)
        before = len(_runs(tmp_path))
        second = subprocess.run(_fake_sweep_command(tmp_path, "clustering.threshold=0.6"), capture_output=True,
                                text=True, timeout=300, cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is being run by another process (pid {process.pid})" in second.stderr
        assert len(_runs(tmp_path)) == before
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
        process.kill()
    assert not [r for r in _runs(tmp_path) if r["status"] == "RUNNING"]


def test_a_rerun_without_resume_says_what_it_will_do(tmp_path: Path) -> None:
    command = _fake_sweep_command(tmp_path, "clustering.threshold=0.5")
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "finished job(s) from an earlier run" not in first.stdout + first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already has 1 finished job(s) from an earlier run; without resume=true every job runs again" in \
        second.stdout + second.stderr


def test_a_report_on_an_interrupted_sweep_says_it_is_unfinished(tmp_path: Path) -> None:
    """Parent KILLED by SIGINT during job 1 of 3 planned: the report's recommendation starts by saying
    the sweep is unfinished and that 1 of 3 planned jobs never ran (was: a plain recommendation)."""
    from diaropt import report
    from diaropt.report.render import Document, recommendation_section

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "test")
    parent_id = tracker.get_or_create_parent("/sweeps/cut", {"diaropt.jobs_planned": "3"})
    for job_num, threshold in ((0, "0.5"), (1, "0.6")):
        run = tracker.start_child(f"clustering.threshold={threshold}", parent_id, {
            TAG_OVERRIDES: overrides_tag([f"clustering.threshold={threshold}"]), "diaropt.job_num": str(job_num)})
        run.log_metrics({"der_pyannote": 0.1, "rtfx": 5.0})
        run.end("FINISHED") if job_num == 0 else run.kill("SIGINT")
    tracker.client.set_tag(parent_id, TAG_CLOSED_REASON, "SIGINT during job 1")
    tracker.finish_parent(parent_id, "KILLED")

    sweep = report.load_sweep("test", parent_id, uri)
    assert (sweep.parent_status, sweep.jobs_planned, sweep.jobs_never_run, sweep.unfinished) == ("KILLED", 3, 1, True)
    selection = report.select_recommended(sweep.runs, 0.005, True, sweep.axes, report.default_axis_values(sweep.axes))
    text = Document("report", [recommendation_section(sweep, selection)]).markdown()
    assert "**This sweep is unfinished** (parent run KILLED: SIGINT during job 1); 1 of 3 planned jobs never ran" in text

    tracker.finish_parent(parent_id, "FINISHED")  # a complete sweep (3 of 3 started) says nothing of the kind
    run = tracker.start_child("clustering.threshold=0.7", parent_id, {"diaropt.job_num": "2"})
    run.end("FINISHED")
    assert not report.load_sweep("test", parent_id, uri).unfinished


JOBLIB_SWEEP = """
import os, signal, time
from pathlib import Path
import hydra
from diaropt.config import CONF_DIR, register_configs
from diaropt.keys import DER_METRIC
from diaropt.quiet import quiet_third_party

quiet_third_party()  # as experiments/sweep.py
register_configs()

def fake_job(cfg, run, output_dir, backend):
    run.log_metrics({DER_METRIC: 0.1})
    if cfg.clustering.threshold == 0.6 and not cfg.resume:  # this worker dies mid-job
        if os.environ["HOW"] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    # job 0, the healthy sibling, is in flight until job 1's death is recorded (its status file)
    deadline = time.monotonic() + 120
    while cfg.clustering.threshold == 0.5 and not cfg.resume and time.monotonic() < deadline:
        if (Path(os.environ["SWEEP_DIR"]) / ".diaropt" / "1.json").is_file():
            break
        time.sleep(0.2)
    return {DER_METRIC: 0.1}

@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg):
    import diaropt.sweep as sweep
    sweep._run_logged = fake_job  # patched in the worker (the task is pickled by value, the module is not)
    return sweep.run_job(cfg).get(DER_METRIC, float("nan"))

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow  # real worker processes: 1-2 min per case on 2 loaded cores
@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_a_joblib_worker_death_fails_its_job_and_the_sweep_goes_on(tmp_path: Path, how: str) -> None:
    """2 workers, 3 jobs; job 1's worker dies mid-job (SIGKILL, or ``os._exit(3)`` as a crash in native
    code would): its child ends FAILED naming the worker's death; the sibling in flight (job 0, which
    waits until the death is recorded) and job 2 finish; the parent ends FAILED, nothing is RUNNING,
    exit 1 with the job named in the summary. ``resume=true`` then runs job 1 only. Was: joblib's
    ``TerminatedWorkerError`` ended the sweep, the sibling was killed and job 2 never ran."""
    import os

    script = tmp_path / "joblib_sweep.py"
    script.write_text(JOBLIB_SWEEP)
    command = [sys.executable, str(script), *_fake_sweep_command(tmp_path)[2:], "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", "clustering.threshold=0.5,0.6,0.7"]
    env = {**os.environ, "HOW": how, "SWEEP_DIR": str(tmp_path / "sweep")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "3 jobs: 2 finished, 0 skipped, 1 failed" in output, output[-3000:]
    assert "clustering.threshold=0.6): worker process died (exit codes" in output, output[-3000:]
    runs = _runs(tmp_path)
    assert not [r for r in runs if r["status"] == "RUNNING"], output[-3000:]
    children = {r["tags"]["diaropt.job_num"]: r for r in runs if r["tags"].get("diaropt.role") == "child"}
    assert {num: r["status"] for num, r in children.items()} == {"0": "FINISHED", "1": "FAILED", "2": "FINISHED"}
    dead = children["1"]["tags"]
    assert dead["diaropt.error_type"] == "WorkerDied"
    assert dead["diaropt.closed_reason"].startswith("worker process died (exit codes")
    assert ("SIGKILL(-9)" if how == "sigkill" else "EXIT(3)") in dead["diaropt.closed_reason"], dead
    (parent,) = [r for r in runs if r["tags"].get("diaropt.role") == "parent"]
    assert parent["status"] == "FAILED"

    resumed = subprocess.run([*command, "resume=true"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env=env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    runs = _runs(tmp_path)
    children = sorted((r["tags"]["diaropt.job_num"], r["status"]) for r in runs if r["tags"].get("diaropt.role") == "child")
    assert children == [("0", "FINISHED"), ("1", "FAILED"), ("1", "FINISHED"), ("2", "FINISHED")]
    (parent,) = [r for r in runs if r["tags"].get("diaropt.role") == "parent"]
    assert parent["status"] == "FINISHED"


def test_a_dead_workers_job_is_recorded_failed_without_running_a_sweep(tmp_path: Path) -> None:
    """:func:`diaropt.sweep.close_dead_worker_job` (what the launcher calls when a worker dies): the
    job's newest RUNNING child (or one a sibling's stale check already closed as ``process died``)
    ends FAILED with the reason, the finished child of an earlier run is left alone, and the sweep's
    status file says failed."""
    import json

    from omegaconf import OmegaConf

    from diaropt.sweep import close_dead_worker_job, read_statuses

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "test")
    sweep_dir = tmp_path / "sweep"
    parent_id = tracker.get_or_create_parent(str(sweep_dir.resolve()))
    earlier = tracker.start_child("clustering.threshold=0.6", parent_id, {"diaropt.job_num": "1"})
    earlier.end("FINISHED")
    dead = tracker.start_child("clustering.threshold=0.6", parent_id, {"diaropt.job_num": "1"})
    other = tracker.start_child("clustering.threshold=0.7", parent_id, {"diaropt.job_num": "2"})
    closed_by_sibling = tracker.start_child("clustering.threshold=0.8", parent_id, {"diaropt.job_num": "3"})
    tracker._close(tracker.client.get_run(closed_by_sibling.run_id), "process died")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}},
                            "tracking": {"enabled": True, "tracking_uri": uri, "experiment_name": "test"}})
    reason = "worker process died (exit codes {SIGKILL(-9)})"
    close_dead_worker_job(cfg, 1, ["clustering.threshold=0.6"], reason)
    close_dead_worker_job(cfg, 3, ["clustering.threshold=0.8"], reason)
    for run, status in ((earlier, "FINISHED"), (dead, "FAILED"), (other, "RUNNING"), (closed_by_sibling, "FAILED")):
        assert tracker.client.get_run(run.run_id).info.status == status
    tags = tracker.client.get_run(dead.run_id).data.tags
    assert (tags[TAG_CLOSED_REASON], tags["diaropt.error_type"]) == (reason, "WorkerDied")
    statuses = {s["job_num"]: s for s in read_statuses(sweep_dir)}
    assert statuses[1]["status"] == "failed" and statuses[1]["error"] == reason and statuses[1]["run_id"] == dead.run_id
    assert json.loads((sweep_dir / ".diaropt" / "3.json").read_text())["run_id"] == closed_by_sibling.run_id


def test_the_joblib_launcher_options_are_honoured_or_refused() -> None:
    """``hydra/launcher=joblib`` is diaropt's launcher (conf/hydra/launcher/joblib.yaml, merged with the
    plugin's schema): n_jobs as joblib means it; options that would change what runs are refused."""
    from hydra import compose, initialize_config_dir

    from diaropt.config import CONF_DIR, register_configs
    from diaropt.launcher import check_joblib_options, n_workers, worker_death_reason

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.diaropt_launcher.joblib_launcher.ProcessPerJobLauncher"
    options = {k: v for k, v in cfg.hydra.launcher.items() if k not in ("_target_", "n_jobs")}
    check_joblib_options(options)  # the plugin's defaults pass
    for key, value in (("prefer", "threads"), ("require", "sharedmem"), ("timeout", 10.0), ("backend", "threading")):
        with pytest.raises(ValueError, match=f"hydra.launcher.{key}={value}: not supported"):
            check_joblib_options({**options, key: value})
    with pytest.raises(ValueError, match="unknown option"):
        check_joblib_options({"n_job": 2})
    assert n_workers(3) == 3 and n_workers(-1) >= 1
    with pytest.raises(ValueError):
        n_workers(0)
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    error = TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated. ...\n"
                                  "The exit codes of the workers are {EXIT(3)}\n")
    assert worker_death_reason(error) == "worker process died (exit codes {EXIT(3)})"


def test_an_interrupt_during_an_mlflow_call_is_raised_when_the_call_returns() -> None:
    """Ctrl-C while the main thread is inside an MLflow call (``retry_locked``): the call completes and
    ``KeyboardInterrupt`` is raised as it returns, so no SQLite write transaction is cut half-way (one
    cut by Ctrl-C kept the store locked for the sweep's own closing writes: the parent could not be
    closed). A second Ctrl-C during the call interrupts at once."""
    import os

    from diaropt.sweep import _install_sweep_signal_handlers
    from diaropt.tracking import retry_locked

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    steps: list[str] = []

    def call(signals: int) -> str:
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here
        steps.append("completed")
        return "ok"

    try:
        _install_sweep_signal_handlers()
        with pytest.raises(KeyboardInterrupt):
            retry_locked(call, 1)
        assert steps == ["completed"]
        steps.clear()
        with pytest.raises(KeyboardInterrupt):
            retry_locked(call, 2)
        assert steps == []
        assert retry_locked(call, 0) == "ok"  # nothing left pending
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
