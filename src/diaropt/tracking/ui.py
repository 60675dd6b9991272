"""``python -m diaropt ui``: MLflow's own server on the sweeps' store, opened on the runs table.

Why not bare ``mlflow ui``: MLflow 3.17.2's UI (and 3.18.0, the newest on PyPI on 2026-12-01) picks
an experiment's page from a global *GenAI | Model training* switch, not from the experiment's
``mlflow.experimentKind`` tag. The switch is the ``workflowType`` URL parameter if present, else the
browser's local storage key ``mlflow.workflowType``, default ``genai`` (a hard-coded feature flag in
the bundle; upstream mlflow/mlflow#24498). A fresh browser therefore opens every experiment on its
GenAI overview ("Traces 0"). Nothing on the server side changes that default (the server-info
endpoint carries store type, workspaces and gateway flags only). The address printed here carries
``?workflowType=machine_learning`` and lands on the runs table.

The server is MLflow's CLI (``python -m mlflow server``), started in its own process group and
stopped with it (uvicorn and MLflow's job runner are its children).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from diaropt.tracking.store import default_tracking_uri, sqlite_path

#: The query that makes MLflow 3.17's UI show an experiment as "Model training" (runs table).
RUNS_TABLE_QUERY = "workflowType=machine_learning"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: MLflow's server took 26 s to answer on the loaded 2-core VM; allow for a busier machine.
STARTUP_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 15.0
_POLL_S = 0.5
#: The command that creates the store and the experiment (named in errors).
SWEEP_COMMAND = "python experiments/sweep.py -m quant=fp32,fp16,int8"


class UiError(RuntimeError):
    """The UI cannot be started; ``str(error)`` says why and what to do."""


def browser_host(host: str) -> str:
    """The host a browser on this machine uses for a server bound to ``host`` (``0.0.0.0`` -> 127.0.0.1)."""
    return DEFAULT_HOST if host in ("", "0.0.0.0", "::", "[::]") else host


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in MLflow 3.17's UI (hash routing).

    ``runs_table_url("http://127.0.0.1:5000", "1")`` ->
    ``http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning``.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{quote(str(experiment_id), safe='')}/runs?{RUNS_TABLE_QUERY}"


def is_server_uri(tracking_uri: str) -> bool:
    """A tracking URI that is already an MLflow server (its UI is at the same address)."""
    return tracking_uri.startswith(("http://", "https://"))


def store_overrides(tracking_uri: str, experiment_name: str, repo_root: Path | None = None) -> list[str]:
    """The overrides that name this store and experiment to a diaropt command: the store unless it is
    the repository's default (so a command works in a shell without the sweep's
    ``$MLFLOW_TRACKING_URI``), the experiment unless it is ``diaropt``."""
    if repo_root is None:
        from diaropt.config import REPO_ROOT as repo_root
    overrides = []
    if tracking_uri != default_tracking_uri(repo_root):
        overrides.append(f"tracking.tracking_uri={tracking_uri}")
    if experiment_name != "diaropt":
        overrides.append(f"tracking.experiment_name={experiment_name}")
    return overrides


def ui_command(tracking_uri: str, experiment_name: str, repo_root: Path | None = None) -> str:
    """``python -m diaropt ui`` with the overrides this store and experiment need (shell-quoted)."""
    return " ".join(shlex.quote(part) for part in
                    ["python", "-m", "diaropt", "ui", *store_overrides(tracking_uri, experiment_name, repo_root)])


def sweep_command(tracking_uri: str, experiment_name: str, repo_root: Path | None = None) -> str:
    """The README's sweep, into this store and experiment (the command that creates them)."""
    return " ".join([SWEEP_COMMAND, *(shlex.quote(o) for o in store_overrides(tracking_uri, experiment_name,
                                                                                repo_root))])


def sweep_hint(tracking_uri: str, experiment_name: str, experiment_id: str, repo_root: Path | None = None,
               port: int = DEFAULT_PORT) -> str:
    """The lines a sweep prints at its end: the command that opens the UI and the runs table's address."""
    if is_server_uri(tracking_uri):
        return f"MLflow UI (runs table): {runs_table_url(tracking_uri, experiment_id)}"
    return (f"MLflow UI: {ui_command(tracking_uri, experiment_name, repo_root)}\n"
            f"  then the runs table: {runs_table_url(f'http://{DEFAULT_HOST}:{port}', experiment_id)}")


def find_experiment(tracking_uri: str, experiment_name: str, repo_root: Path | None = None) -> str:
    """The id of the active experiment ``experiment_name`` in the store (never creates either).

    Raises:
        UiError: no store at a SQLite path, no such experiment (names the ones there), or it was deleted.
    """
    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise UiError(f"no MLflow store at {path}: nothing has been tracked there yet; a sweep creates it: "
                      f"`{sweep_command(tracking_uri, experiment_name, repo_root)}`")
    from mlflow.tracking import MlflowClient

    from diaropt.tracking.store import retry_locked

    try:
        client = MlflowClient(tracking_uri)
        experiment = retry_locked(client.get_experiment_by_name, experiment_name)
    except Exception as error:  # noqa: BLE001 - unreadable store: one line naming it
        raise UiError(f"cannot read the MLflow store {tracking_uri}: {type(error).__name__}: {error}") from error
    if experiment is None:
        try:
            names = [e.name for e in retry_locked(client.search_experiments)]
        except Exception:  # noqa: BLE001 - only for the message
            names = []
        there = f" (it has: {', '.join(sorted(names))})" if names else " (it has no experiment)"
        raise UiError(f"no experiment {experiment_name!r} in {tracking_uri}{there}: a sweep creates it: "
                      f"`{sweep_command(tracking_uri, experiment_name, repo_root)}`")
    if experiment.lifecycle_stage == "deleted":
        raise UiError(f"experiment {experiment_name!r} (id {experiment.experiment_id}) in {tracking_uri} is deleted; "
                      f"the next sweep into it restores it: `{sweep_command(tracking_uri, experiment_name, repo_root)}`")
    return str(experiment.experiment_id)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind attempt, as the server would make:
    with ``SO_REUSEADDR``, as uvicorn sets it, so connections of an earlier server left in TIME_WAIT
    do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name == "posix":  # on Windows the option lets a second socket share a listening port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def server_command(tracking_uri: str, host: str, port: int, artifacts_destination: Path | None) -> list[str]:
    """``python -m mlflow server`` for the store: one worker (the UI is for one person)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination is not None:  # runs uploaded through this server go next to the store
        command += ["--artifacts-destination", str(artifacts_destination)]
    return command


def _get(url: str, timeout_s: float = 5.0) -> int:
    """The HTTP status of ``GET url`` (0: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def wait_until_serving(base_url: str, experiment_id: str, alive: Callable[[], bool],
                       timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the server answers ``/health`` and serves ``experiment_id`` (its REST API).

    Raises:
        UiError: the process ended (``alive()`` false) or no answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    experiment_api = f"{base_url}/ajax-api/2.0/mlflow/experiments/get?experiment_id={quote(experiment_id)}"
    while time.monotonic() < deadline:
        if not alive():
            raise UiError("the MLflow server stopped during startup")
        if _get(f"{base_url}/health") == 200:
            status = _get(experiment_api, timeout_s=30.0)
            if status == 200:
                return
            if status:
                raise UiError(f"the MLflow server answers but not for experiment {experiment_id} (HTTP {status})")
        time.sleep(_POLL_S)
    raise UiError(f"the MLflow server did not answer at {base_url} within {timeout_s:.0f} s")


class Server:
    """A running ``mlflow server`` started by :func:`start_server`; :meth:`stop` ends its process group."""

    def __init__(self, process: subprocess.Popen, log_path: Path, base_url: str) -> None:
        self.process = process
        self.log_path = log_path
        self.base_url = base_url

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM to the server's process group (MLflow forwards it to uvicorn), SIGKILL after 15 s.

        Returns the server's exit code (None if it had to be killed and did not report one).
        """
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=_STOP_TIMEOUT_S)
        self._signal(signal.SIGKILL)  # children that outlived their parent (the job runner)
        return self.process.returncode

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # the group this server leads (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def start_server(tracking_uri: str, experiment_id: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 timeout_s: float = STARTUP_TIMEOUT_S) -> Server:
    """Start MLflow's server on the store and wait until it serves ``experiment_id``.

    Its output goes to a log file (``Server.log_path``; the UI's requests would flood the terminal).
    MLflow's job execution (GenAI evaluation jobs, one more process) is off unless
    ``$MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise.

    Raises:
        UiError: the port is in use, or the server stopped or did not answer (with its last log lines).
    """
    if port_in_use(host, port):
        raise UiError(f"port {port} on {host} is in use (another MLflow UI?): choose another with --port N, "
                      "or stop the program that holds it")
    path = sqlite_path(tracking_uri)
    artifacts = path.resolve().parent / "artifacts" if path is not None else None
    fd, log_name = tempfile.mkstemp(prefix=f"diaropt-mlflow-ui-{port}-", suffix=".log")
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with os.fdopen(fd, "wb") as log_file:
        process = subprocess.Popen(server_command(tracking_uri, host, port, artifacts), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(process, Path(log_name), f"http://{browser_host(host)}:{port}")
    try:
        wait_until_serving(server.base_url, experiment_id, server.alive, timeout_s)
    except BaseException as error:
        server.stop()
        if isinstance(error, UiError):
            raise UiError(f"{error}; its log ({server.log_path}) ends with:\n{server.log_tail()}") from None
        raise
    return server


def serve(tracking_uri: str, experiment_name: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          open_browser: bool = False, timeout_s: float = STARTUP_TIMEOUT_S,
          out: Callable[[str], None] | None = None) -> int:
    """Find the experiment, start the server, print the runs table's address, serve until Ctrl-C.

    A store that is an MLflow server already (``http(s)://``) is not served again: its address is
    printed. Returns the exit code: 0 after Ctrl-C (or SIGTERM / SIGHUP), 1 if the server stopped by itself.

    Raises:
        UiError: see :func:`find_experiment` and :func:`start_server`.
    """
    out = out or _print
    experiment_id = find_experiment(tracking_uri, experiment_name)
    if is_server_uri(tracking_uri):
        url = runs_table_url(tracking_uri, experiment_id)
        out(f"{tracking_uri} is an MLflow server already; experiment {experiment_name!r} (id {experiment_id}), "
            f"runs table:\n  {url}")
        if open_browser:
            _open(url, out)
        return 0
    out(f"starting MLflow's server on {tracking_uri} at http://{browser_host(host)}:{port} ...")
    previous = _stop_on_signals()
    try:
        server = start_server(tracking_uri, experiment_id, host, port, timeout_s)
        url = runs_table_url(server.base_url, experiment_id)
        out(f"experiment {experiment_name!r} (id {experiment_id}), runs table:\n  {url}\n"
            f"(bare {server.base_url} opens MLflow's GenAI view unless this browser chose *Model training* before)\n"
            f"server log: {server.log_path}; Ctrl-C stops the server")
        if open_browser:
            _open(url, out)
        try:
            while server.alive():
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            server.stop()
            out("MLflow server stopped")
            return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = server.stop()
    out(f"the MLflow server stopped by itself (exit {code}); its log ({server.log_path}) ends with:\n"
        f"{server.log_tail()}")
    return 1


def _stop_on_signals() -> dict[int, object]:
    """SIGTERM and SIGHUP (``kill``, a closed terminal) stop the server as Ctrl-C does, rather than
    ending this process and leaving the server (its own process group) behind. Returns the handlers
    replaced (none off the main thread, where Python cannot set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _print(text: str) -> None:
    print(text, flush=True)  # stdout may be a pipe: the address must show before the server is stopped


def _open(url: str, out: Callable[[str], None]) -> None:
    import webbrowser

    if not webbrowser.open(url):
        out("no browser found to open; open the address above")
