"""Speaker-embedding models: the fbank front end and a network, with masked pooling.

``EMBEDDING_MODELS`` is the one place that knows, per model name, the network class, the fbank
settings it was trained with (window, input scaling, mean normalisation) and its pinned weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from diaropt.models.campplus import CAMPPlus
from diaropt.models.constants import EMBEDDING_GEOMETRY
from diaropt.models.fbank import KaldiFbank
from diaropt.models.resnet import WeSpeakerResNet34


@dataclass(frozen=True)
class EmbeddingSpec:
    network: Callable[[], nn.Module]
    embedding_dim: int
    fbank: dict = field(default_factory=dict)
    asset_key: str | None = None  # pinned weights; None: the user brings a checkpoint


EMBEDDING_MODELS: dict[str, EmbeddingSpec] = {
    # 3D-Speaker trained CAM++ on torchaudio-loaded waveforms in [-1, 1], povey window, CMN.
    "campplus": EmbeddingSpec(CAMPPlus, EMBEDDING_GEOMETRY["campplus"].embedding_dim,
                              dict(window_type="povey", input_scale=1.0), EMBEDDING_GEOMETRY["campplus"].asset_key),
    # WeSpeaker (as pyannote runs it): waveform * 2**15, hamming window, CMN.
    "wespeaker_resnet34": EmbeddingSpec(WeSpeakerResNet34, EMBEDDING_GEOMETRY["wespeaker_resnet34"].embedding_dim,
                                        dict(window_type="hamming", input_scale=32768.0)),
}


class SpeakerEmbedding(nn.Module):
    """(batch, num_samples) waveforms [+ masks (batch, num_mask_frames)] -> (batch, embedding_dim).

    The mask (e.g. the segmentation's 589 frames for a 10 s chunk) is resampled to the network's
    pooled frame rate; frames with weight 0 do not count. The fbank is computed over the whole
    chunk and mean-normalised over the whole chunk, as pyannote does.
    """

    def __init__(self, name: str, frame_extraction: str = "per_frame", frame_batch_size: int = 64) -> None:
        super().__init__()
        if name not in EMBEDDING_MODELS:
            raise ValueError(f"unknown embedding model {name!r}; expected one of {sorted(EMBEDDING_MODELS)}")
        spec = EMBEDDING_MODELS[name]
        self.name = name
        self.embedding_dim = spec.embedding_dim
        self.fbank = KaldiFbank(frame_extraction=frame_extraction, frame_batch_size=frame_batch_size, **spec.fbank)
        self.network = spec.network()

    def forward(self, waveforms: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(self.fbank(waveforms), masks)


def load_embedding_model(name: str, checkpoint: str | Path | None = None, frame_extraction: str = "per_frame",
                         frame_batch_size: int = 64) -> tuple[SpeakerEmbedding, str]:
    """(eval-mode model with weights, weights sha256). ``checkpoint`` overrides the pinned weights."""
    from diaropt.assets import asset_path
    from diaropt.models.loading import CheckpointError, load_into

    model = SpeakerEmbedding(name, frame_extraction, frame_batch_size)
    spec = EMBEDDING_MODELS[name]
    if checkpoint is None:
        if spec.asset_key is None:
            raise CheckpointError(f"embedding model {name!r} has no pinned weights: set its checkpoint "
                                  "(a local path or a hub id such as pyannote/wespeaker-voxceleb-resnet34-LM)")
        checkpoint = asset_path(spec.asset_key)
    digest = load_into(model.network, checkpoint)
    return model.eval(), digest


def load_segmentation_model(checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
    """(eval-mode PyanNet with segmentation-3.0 weights, weights sha256)."""
    from diaropt.assets import asset_path
    from diaropt.models.loading import load_into
    from diaropt.models.segmentation import PyanNet

    model = PyanNet()
    digest = load_into(model, checkpoint if checkpoint is not None else asset_path("segmentation_3_0"))
    return model.eval(), digest
