"""The torch backend: the fp32 reference every other backend is compared against."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diaropt.backends.base import BackendUnavailable, TensorSpec

DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str) -> torch.device:
    """The torch device, or ``BackendUnavailable`` if this host lacks it."""
    if device not in DEVICES:
        raise ValueError(f"unknown torch device {device!r}; expected one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("torch device cuda requested but no CUDA GPU is available on this host")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailable("torch device mps requested but MPS is not available (needs Apple silicon macOS)")
    return torch.device(device)


class TorchModel:
    """Runs an ``nn.Module`` under ``inference_mode`` with named numpy inputs/outputs."""

    def __init__(self, module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 device: str = "cpu") -> None:
        self.device = check_device(device)
        self.module = module.to(self.device).eval()
        self.inputs, self.outputs = inputs, outputs

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[spec.name])).to(self.device) for spec in self.inputs]
            result = self.module(*args)
        results = result if isinstance(result, tuple) else (result,)
        return {spec.name: value.float().cpu().numpy() for spec, value in zip(self.outputs, results)}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()
