"""The ``fusion`` sweep axis (and ``embedding.shared_trunk``): the one place that knows it.

Which stages run as which models (C chunks, F = 589 segmentation frames, L = 3 local speakers,
S = 160000 samples per chunk, N = 998 fbank frames, D embedding dim):

| switch                                 | effect on the built models                                   |
|----------------------------------------|--------------------------------------------------------------|
| ``clean_frames_in_graph``              | powerset decoding, clean-frame masks (with the               |
|                                        | ``min_num_clean_frames`` fallback) and active speakers run   |
|                                        | in a graph (``GraphPreprocessor``): a standalone fp32        |
|                                        | ``preprocessor`` model logprobs (B, F, 7) -> segmentations,  |
|                                        | masks (B, F, L), active (B, L), or inside the segmentation   |
|                                        | model with ``segmentation_with_preprocessor``                |
| ``segmentation_with_preprocessor``     | the segmentation model also outputs segmentations (B, F, L)  |
|                                        | (multilabel) and, with ``clean_frames_in_graph``, masks and  |
|                                        | active: no numpy preprocessing stage                         |
| ``embedding_with_post``                | the embedding model also outputs ``unit_embeddings`` (L2     |
|                                        | normalized, what clustering consumes) and, per chunk, the    |
|                                        | slots' pairwise cosine ``distances`` (B, L, L)               |
| ``coreml_pipeline``                    | every stage model chained into one model: a Core ML pipeline |
|                                        | (``ct.utils.make_pipeline``) on Core ML, the same chain of   |
|                                        | models run back to back in one call (``ChainedModel``) on    |
|                                        | ONNX Runtime and torch; needs ``clean_frames_in_graph``      |
|                                        | (the embedding masks must come out of a graph) and embeds    |
|                                        | per chunk (fixed shapes: all L slots, inactive ones too)     |
| ``fbank_in_embedding_model=false``     | a separate fp32 ``fbank`` model waveforms (B, S) -> features |
|                                        | (B, N, 80); the embedding model takes ``features``           |
| ``embedding.shared_trunk``             | per-chunk embedding: waveforms (B, S) + masks (B, F, L) ->   |
|                                        | embeddings (B, L, D), the trunk once per chunk, each slot's  |
|                                        | mask applied at the masked statistics pooling only           |
| ``embedding.tiled_trunk``              | the embedding stage as two models: the trunk waveforms       |
|                                        | (B, S) -> frame_features (B, C, T) run on chunks that tile   |
|                                        | the recording (``pipeline.embedding.embed_tiled``), and a    |
|                                        | pooling model frame_features (B, C, T) + masks (B, F, L) ->  |
|                                        | embeddings (B, L, D) per chunk. Needs ``shared_trunk``; not  |
|                                        | exact (a chunk's frames come from its tiles' context)        |

Every fused model gives the numbers of the unfused stages (same ops on each row), so the
pipeline's outputs do not change; ``tests/test_fusion.py`` checks it per switch. The exception is
``tiled_trunk``, an approximation measured by DER (``tests/test_tiled_trunk.py``).

The plan (``FusionPlan``, ``stage_specs``, shapes, cache-key payloads) and the chain helpers are
torch-free in ``variants.fusion_plan`` and re-exported here; this module holds the torch modules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from diaropt.models.constants import CHUNK_SAMPLES, NUM_FRAMES  # noqa: F401  (re-exported)
from diaropt.pipeline.preprocessing import POWERSET_MAPPING
from diaropt.variants.fusion_plan import (SWITCHES, ChainedModel, FusionPlan, InChain, ModelSource,  # noqa: F401
                                          StageSpec, fused_embedding_variant, memoized, pool_variant,
                                          preprocessor_variant, stage_specs, tiled_stage_specs, trunk_variant)


# ----------------------------------------------------------------------------------------------
# Torch modules that fuse stages


class GraphPreprocessor(nn.Module):
    """The embedding preprocessor in a graph, equal to ``pipeline.preprocessing``'s numpy version.

    logprobs (B, F, 7) -> segmentations (B, F, 3) {0, 1} [, masks (B, F, 3), active (B, 3) {0., 1.}]
    (float32: Core ML has no bool outputs). ``masks``: the clean-frame mask (frames with < 2 active
    local speakers) where it has more than ``min_num_clean_frames`` frames, else the full mask;
    ``active``: at least ``min_active_frames`` active frames. Argmax ties go to the lowest class.
    """

    def __init__(self, min_num_clean_frames: int = 10, min_active_frames: int = 1, clean_frames: bool = True) -> None:
        super().__init__()
        self.min_num_clean_frames = int(min_num_clean_frames)
        self.min_active_frames = int(min_active_frames)
        self.clean_frames = clean_frames
        self.register_buffer("mapping", torch.from_numpy(np.array(POWERSET_MAPPING)), persistent=False)

    def variant(self) -> dict[str, Any]:
        return preprocessor_variant(self.min_num_clean_frames, self.min_active_frames, self.clean_frames)

    def forward(self, logprobs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        best = torch.argmax(logprobs, dim=-1)  # (B, F) int64
        segmentations = nn.functional.embedding(best, self.mapping.to(logprobs.dtype))  # (B, F, 3)
        if not self.clean_frames:
            return segmentations
        num_speakers = segmentations.sum(dim=-1, keepdim=True)  # (B, F, 1)
        clean = segmentations * (num_speakers < 2).to(segmentations.dtype)
        use_clean = clean.sum(dim=1, keepdim=True) > self.min_num_clean_frames  # (B, 1, 3)
        masks = torch.where(use_clean, clean, segmentations)
        active = (segmentations.sum(dim=1) >= self.min_active_frames).to(segmentations.dtype)  # (B, 3)
        return segmentations, masks, active


class SegmentationWithPreprocessor(nn.Module):
    """waveforms (B, 1, S) [or (B, S) with ``flat_input``] -> logprobs (B, F, 7) [+ preprocessor outputs]."""

    def __init__(self, segmentation: nn.Module, preprocessor: GraphPreprocessor | None,
                 flat_input: bool = False) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.preprocessor = preprocessor
        self.flat_input = flat_input

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.flat_input:
            waveforms = waveforms.unsqueeze(1)
        logprobs = self.segmentation(waveforms)
        if self.preprocessor is None:
            return logprobs
        extra = self.preprocessor(logprobs)
        return (logprobs, *extra) if isinstance(extra, tuple) else (logprobs, extra)


class FbankFrontEnd(nn.Module):
    """The embedding model's fbank alone: waveforms (B, S) -> features (B, N, 80) (always fp32)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.fbank = embedding.fbank

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.fbank(waveforms)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the last axis; scaled by the max magnitude first so fp16 squares cannot overflow.
    A NaN row stays NaN."""
    scale = x.abs().amax(dim=-1, keepdim=True)
    y = x / scale
    return y / torch.sqrt((y * y).sum(dim=-1, keepdim=True))


class FusedEmbedding(nn.Module):
    """The embedding network with its fusion options (a ``SpeakerEmbedding`` inside).

    Input ``x``: waveforms (B, S) (``fbank_in_model``) or features (B, N, 80). Masks: (B, F) per
    (chunk, speaker) pair, or (B, F, L) ``per_chunk``. Outputs: embeddings (B, D) or (B, L, D)
    [+ unit_embeddings, same shape, + per chunk distances (B, L, L) = 1 - cosine] with ``with_post``.

    Per chunk, ``shared_trunk`` runs everything before pooling once per chunk and pools each slot's
    mask over it (the trunk does not see the mask, so this is exact); otherwise the network runs once per
    slot on the B rows (as the per-pair baseline does; only the mask-free fbank is shared).
    """

    def __init__(self, embedding: nn.Module, fbank_in_model: bool = True, per_chunk: bool = False,
                 shared_trunk: bool = False, with_post: bool = False) -> None:
        super().__init__()
        if shared_trunk and not per_chunk:
            raise ValueError("shared_trunk embeds per chunk")
        self.fbank = embedding.fbank if fbank_in_model else None
        self.network = embedding.network
        self.embedding_dim = int(embedding.embedding_dim)
        self.per_chunk, self.shared_trunk, self.with_post = per_chunk, shared_trunk, with_post

    def variant(self) -> dict[str, Any]:
        return fused_embedding_variant(self.fbank is not None, self.per_chunk, self.shared_trunk, self.with_post)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fbank(x) if self.fbank is not None else x

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.per_chunk:
            embeddings = self.network(self._features(x), masks)  # (B, D)
            return (embeddings, unit_rows(embeddings)) if self.with_post else embeddings
        if self.shared_trunk:
            embeddings = pool_slots(self.network, self.network.frame_features(self._features(x)), masks)
        else:  # the whole network per slot, B rows at a time (the baseline's compute and memory per call)
            features = self._features(x)
            embeddings = torch.stack([self.network(features, masks[:, :, slot]) for slot in range(int(masks.shape[2]))],
                                     dim=1)
        return with_post_outputs(embeddings) if self.with_post else embeddings


def pool_slots(network: nn.Module, frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Trunk frames (B, C, T) + masks (B, F, L) -> embeddings (B, L, D): each slot's mask pooled over
    its chunk's frames (``network.pool_and_embed``)."""
    num_slots, num_mask_frames = int(masks.shape[2]), int(masks.shape[1])
    slot_masks = masks.transpose(1, 2).reshape(-1, num_mask_frames)  # (B * L, F), chunk-major
    channels, length = int(frames.shape[1]), int(frames.shape[2])
    per_slot = frames.unsqueeze(1).expand(-1, num_slots, -1, -1).reshape(-1, channels, length)
    embeddings = network.pool_and_embed(per_slot, slot_masks)
    return embeddings.reshape(-1, num_slots, int(embeddings.shape[-1]))  # (B, L, D)


def with_post_outputs(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, D) -> (embeddings, unit_embeddings (B, L, D), distances (B, L, L) = 1 - cosine)."""
    unit = unit_rows(embeddings)
    return embeddings, unit, 1.0 - unit @ unit.transpose(1, 2)


class TrunkFeatures(nn.Module):
    """``embedding.tiled_trunk``'s first model: waveforms (B, S) [or features (B, N, 80)] ->
    frame_features (B, C, T), the network up to (not including) the masked pooling."""

    def __init__(self, embedding: nn.Module, fbank_in_model: bool = True) -> None:
        super().__init__()
        self.fbank = embedding.fbank if fbank_in_model else None
        self.network = embedding.network

    def variant(self) -> dict[str, Any]:
        return trunk_variant(self.fbank is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.frame_features(self.fbank(x) if self.fbank is not None else x)


class SlotPooling(nn.Module):
    """``embedding.tiled_trunk``'s second model: frame_features (B, C, T) + masks (B, F, L) ->
    embeddings (B, L, D) [+ unit_embeddings, distances with ``with_post``]."""

    def __init__(self, embedding: nn.Module, with_post: bool = False) -> None:
        super().__init__()
        self.network = embedding.network
        self.with_post = with_post

    def variant(self) -> dict[str, Any]:
        return pool_variant(self.with_post)

    def forward(self, frame_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        embeddings = pool_slots(self.network, frame_features, masks)
        return with_post_outputs(embeddings) if self.with_post else embeddings


# ----------------------------------------------------------------------------------------------
# Core ML pipelines


def make_coreml_pipeline(paths: list[Any], out_path: Any) -> Any:
    """Chain saved ``.mlpackage`` files (run order) with ``ct.utils.make_pipeline``; saved at ``out_path``.

    Names connect the models: an output feeds every later input of that name; pipeline inputs are the
    inputs no earlier model produces. Shapes must agree (the builder gives every stage one batch).
    """
    import warnings

    import coremltools as ct

    from diaropt.backends.coreml import save_mlpackage

    from diaropt.backends.coreml_program import PipelineTypeError, check_pipeline

    models = [ct.models.MLModel(str(p), skip_model_load=True) for p in paths]
    produced: dict[str, tuple[tuple[int, ...], int]] = {}
    for path, model in zip(paths, models):
        description = model.get_spec().description
        for feature in description.input:
            declared = (tuple(feature.type.multiArrayType.shape), feature.type.multiArrayType.dataType)
            if feature.name in produced and produced[feature.name] != declared:
                raise PipelineTypeError(f"Core ML pipeline: {feature.name} is (shape, dataType) {produced[feature.name]} "
                                        f"where produced but {declared} where {path} reads it")
        produced.update({f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
                         for f in description.output})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = ct.utils.make_pipeline(*models)
    check_pipeline(pipeline.get_spec(), str(out_path))  # what Core ML's validator checks at load
    return save_mlpackage(pipeline, out_path)
