"""``python -m diaropt ui``: the runs table's address, the store it serves, its errors, and a real server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from diaropt.__main__ import main
from diaropt.config import REPO_ROOT
from diaropt.tracking.store import default_tracking_uri
from diaropt.tracking.ui import (RUNS_TABLE_QUERY, UiError, browser_host, find_experiment, port_in_use,
                                 runs_table_url, server_command, sweep_command, sweep_hint, ui_command)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, experiment id) of a SQLite store with the sweeps' experiment ``uitest`` (tagged
    as a sweep tags it), a second one, and a deleted one."""
    from diaropt.tracking import Tracker

    folder = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{folder}/mlflow.db"
    tracker = Tracker(uri, "other")  # created first: the experiment under test does not get id 1
    tracker = Tracker(uri, "uitest")
    run = tracker.start_child("quant=fp32", None)
    run.log_metrics({"rtfx": 2.5})
    gone = Tracker(uri, "gone")
    gone.client.delete_experiment(gone.experiment_id)
    return uri, tracker.experiment_id


# --- addresses and commands -------------------------------------------------------------------------


def test_runs_table_url_names_the_experiment_and_the_model_training_view():
    assert runs_table_url("http://127.0.0.1:5000", "1") == \
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert runs_table_url("https://mlflow.example.org/", "42").startswith("https://mlflow.example.org/#/experiments/42/")
    assert runs_table_url("http://h:1", "a/b").endswith(f"/experiments/a%2Fb/runs?{RUNS_TABLE_QUERY}")


def test_browser_host_for_wildcard_binds():
    assert browser_host("0.0.0.0") == browser_host("::") == "127.0.0.1"
    assert browser_host("192.168.1.5") == "192.168.1.5"


def test_commands_name_a_non_default_store_and_experiment():
    default = default_tracking_uri(REPO_ROOT)
    assert ui_command(default, "diaropt", REPO_ROOT) == "python -m diaropt ui"
    assert ui_command("sqlite:////tmp/x y/mlflow.db", "study", REPO_ROOT) == \
        "python -m diaropt ui 'tracking.tracking_uri=sqlite:////tmp/x y/mlflow.db' tracking.experiment_name=study"
    assert sweep_command("sqlite:////tmp/s.db", "diaropt", REPO_ROOT) == \
        "python experiments/sweep.py -m quant=fp32,fp16,int8 tracking.tracking_uri=sqlite:////tmp/s.db"


def test_sweep_hint_gives_the_command_and_the_link():
    hint = sweep_hint("sqlite:////tmp/s.db", "diaropt", "3", REPO_ROOT)
    assert "python -m diaropt ui tracking.tracking_uri=sqlite:////tmp/s.db" in hint
    assert "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning" in hint
    # a store that is a server already: its own address, no command
    assert sweep_hint("http://mlflow:8080", "diaropt", "7") == \
        "MLflow UI (runs table): http://mlflow:8080/#/experiments/7/runs?workflowType=machine_learning"


def test_server_command_is_mlflows_cli_with_one_worker(tmp_path):
    command = server_command("sqlite:////tmp/s.db", "127.0.0.1", 5123, tmp_path)
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////tmp/s.db"
    assert command[command.index("--port") + 1] == "5123"
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path)


# --- the store and the experiment --------------------------------------------------------------------


def test_find_experiment_returns_the_id(store):
    uri, experiment_id = store
    assert find_experiment(uri, "uitest") == experiment_id != "1"


def test_no_store_says_which_command_creates_it(tmp_path):
    with pytest.raises(UiError, match="no MLflow store at .*mlflow.db.*python experiments/sweep.py -m "
                                      r"quant=fp32,fp16,int8 tracking.tracking_uri=sqlite:///"):
        find_experiment(f"sqlite:///{tmp_path}/mlflow.db", "diaropt", REPO_ROOT)
    assert not (tmp_path / "mlflow.db").exists()  # nothing created


def test_no_experiment_names_the_ones_there(store):
    uri, _ = store
    with pytest.raises(UiError) as error:
        find_experiment(uri, "nope", REPO_ROOT)
    message = str(error.value)
    assert "no experiment 'nope'" in message and "uitest" in message and "other" in message
    assert "tracking.experiment_name=nope" in message  # the sweep command that creates it


def test_deleted_experiment_is_refused(store):
    uri, _ = store
    with pytest.raises(UiError, match="'gone' .* is deleted; the next sweep into it restores it"):
        find_experiment(uri, "gone", REPO_ROOT)


def test_port_in_use():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert port_in_use("127.0.0.1", sock.getsockname()[1])
    assert not port_in_use("127.0.0.1", _free_port())


# --- the command's errors (exit 2: arguments, 3: store / port) ------------------------------------


def test_command_resolves_the_store_from_the_overrides_and_names_a_missing_one(tmp_path, capsys):
    assert main(["ui", f"tracking.tracking_uri=sqlite:///{tmp_path}/none/mlflow.db"]) == 3
    assert f"error: no MLflow store at {tmp_path}/none/mlflow.db" in capsys.readouterr().err


def test_command_resolves_the_store_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env/mlflow.db")
    assert main(["ui"]) == 3
    assert f"no MLflow store at {tmp_path}/env/mlflow.db" in capsys.readouterr().err


def test_command_refuses_a_port_in_use(store, capsys):
    uri, _ = store
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["ui", "--port", str(port), f"tracking.tracking_uri={uri}", "tracking.experiment_name=uitest"]) == 3
    assert f"error: port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_command_bad_arguments(capsys):
    assert main(["ui", "quant=nonexistent"]) == 2
    assert "bad configuration override" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--port", "70000"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["ui", "--bogus"])


# --- the real thing ---------------------------------------------------------------------------------


def test_command_serves_the_runs_table_until_interrupted(store, tmp_path):
    """Starts ``python -m diaropt ui`` on a free port: the printed link names the experiment, MLflow's
    REST API answers for it at that address, SIGINT (Ctrl-C) stops the server and frees the port."""
    pytest.importorskip("uvicorn", reason="MLflow's server needs uvicorn, not installed here")
    uri, experiment_id = store
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "diaropt", "ui", "--port", str(port),
                                f"tracking.tracking_uri={uri}", "tracking.experiment_name=uitest"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    try:
        for line in process.stdout:  # ends when the process closes stdout (it exits)
            lines.append(line)
            if "workflowType=" in line:
                break
        output = "".join(lines)
        assert process.poll() is None, output + process.stderr.read()
        link = re.search(r"http://\S+", output.split("runs table:", 1)[1]).group(0)
        assert link == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            assert response.status == 200
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
        with urllib.request.urlopen(api, timeout=30) as response:
            assert b'"uitest"' in response.read()
        process.send_signal(signal.SIGINT)
        out = process.stdout.read()  # not communicate(): it reads the pipe past the lines buffered above
        process.wait(timeout=60)
        err = process.stderr.read()
        assert process.returncode == 0, out + err
        assert "MLflow server stopped" in out
        log_path = Path(re.search(r"server log: (\S+);", output + out).group(1))
        assert "Uvicorn running" in log_path.read_text()  # MLflow's own server wrote it
        log_path.unlink()
        deadline = time.monotonic() + 10  # the server's group got SIGTERM; its socket closes with it
        while port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not port_in_use("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.terminate()  # our SIGTERM handler stops the server too
            process.wait(timeout=60)


def test_sweep_end_prints_the_ui_command_and_link(store, tmp_path, capsys):
    """The multirun callback's closing lines (after the parent's summary) name the command and the link."""
    from omegaconf import OmegaConf

    from diaropt.sweep import SweepCallback
    from diaropt.tracking import Tracker

    uri, experiment_id = store
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    Tracker(uri, "uitest").get_or_create_parent(str(sweep_dir.resolve()))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}},
                               "tracking": {"enabled": True, "tracking_uri": uri, "experiment_name": "uitest"}})
    SweepCallback()._finish(config)
    out = capsys.readouterr().out
    assert f"MLflow UI: python -m diaropt ui tracking.tracking_uri={uri} tracking.experiment_name=uitest" in out
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in out


def test_open_says_so_when_no_browser_can_open(monkeypatch):
    import webbrowser

    from diaropt.tracking import ui

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or False)  # a machine without a browser
    said: list[str] = []
    ui._open("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning", said.append)
    assert opened == ["http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"]
    assert said == ["no browser found to open; open the address above"]
