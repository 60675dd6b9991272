"""The surface every backend offers, and the error for what a host cannot do."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """This host cannot run the requested backend or compute unit; ``reason`` says why.

    A sweep records such a job as skipped with the reason, never as a silent fallback.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (fixed), dtype name ("float32", ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


class RunnableModel(Protocol):
    """A loaded model: numpy in, numpy out, by input/output name."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def sync(self) -> None:
        """Block until queued work is done, so a clock read after it is honest."""


def is_macos() -> bool:
    return platform.system() == "Darwin"


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
