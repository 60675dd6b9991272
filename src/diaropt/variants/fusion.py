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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from diaropt.backends.base import BackendUnavailable, RunnableModel, TensorSpec
from diaropt.models.segmentation import CHUNK_DURATION_S, NUM_LOCAL_SPEAKERS, NUM_POWERSET_CLASSES, SAMPLE_RATE_HZ, PyanNet
from diaropt.pipeline.preprocessing import POWERSET_MAPPING

CHUNK_SAMPLES = int(CHUNK_DURATION_S * SAMPLE_RATE_HZ)
NUM_FRAMES = PyanNet.num_output_frames(CHUNK_SAMPLES)
#: Switch names as recorded (``fusion_<name>`` metrics); ``fbank_model_separate`` is
#: ``fusion.fbank_in_embedding_model=false``, ``shared_trunk`` / ``tiled_trunk`` are ``embedding.*``.
SWITCHES: tuple[str, ...] = ("clean_frames_in_graph", "segmentation_with_preprocessor", "embedding_with_post",
                             "coreml_pipeline", "fbank_model_separate", "shared_trunk", "tiled_trunk")


# ----------------------------------------------------------------------------------------------
# The plan: which models a configuration builds


@dataclass(frozen=True)
class FusionPlan:
    """The fusion switches of a configuration and the mask parameters baked into graphs."""

    clean_frames_in_graph: bool = False
    segmentation_with_preprocessor: bool = False
    embedding_with_post: bool = False
    coreml_pipeline: bool = False
    fbank_in_embedding_model: bool = True
    shared_trunk: bool = False
    min_num_clean_frames: int = 10
    min_active_frames: int = 1
    tiled_trunk: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> FusionPlan:
        f = cfg.fusion
        return cls(bool(f.clean_frames_in_graph), bool(f.segmentation_with_preprocessor),
                   bool(f.embedding_with_post), bool(f.coreml_pipeline), bool(f.fbank_in_embedding_model),
                   bool(cfg.embedding.shared_trunk), int(cfg.embedding.min_num_clean_frames),
                   tiled_trunk=bool(cfg.embedding.tiled_trunk))

    @property
    def per_chunk_embedding(self) -> bool:
        """Embedding model input masks (B, F, L), output (B, L, D) instead of (B, F) -> (B, D)."""
        return self.shared_trunk or self.coreml_pipeline

    @property
    def standalone_preprocessor(self) -> bool:
        return self.clean_frames_in_graph and not self.segmentation_with_preprocessor

    def realized(self) -> dict[str, int]:
        """``{switch: 0/1}`` over ``SWITCHES``."""
        on = {"clean_frames_in_graph": self.clean_frames_in_graph,
              "segmentation_with_preprocessor": self.segmentation_with_preprocessor,
              "embedding_with_post": self.embedding_with_post, "coreml_pipeline": self.coreml_pipeline,
              "fbank_model_separate": not self.fbank_in_embedding_model, "shared_trunk": self.shared_trunk,
              "tiled_trunk": self.tiled_trunk}
        return {name: int(on[name]) for name in SWITCHES}

    def check(self) -> None:
        """``BackendUnavailable`` for combinations no backend can express."""
        if self.coreml_pipeline and not self.clean_frames_in_graph:
            raise BackendUnavailable(
                "fusion.coreml_pipeline chains the segmentation and embedding models, so the embedding masks "
                "must come out of a graph: it needs fusion.clean_frames_in_graph=true (with false the masks "
                "are computed in numpy between the two models)")
        if self.tiled_trunk and not self.shared_trunk:
            raise BackendUnavailable("embedding.tiled_trunk pools each chunk's speakers over the shared trunk's "
                                     "frames: it needs embedding.shared_trunk=true")
        if self.tiled_trunk and self.coreml_pipeline:
            raise BackendUnavailable("embedding.tiled_trunk assembles each chunk's trunk frames in numpy between "
                                     "two models, so it cannot run inside fusion.coreml_pipeline's single chain")


@dataclass(frozen=True)
class StageSpec:
    """One model to build: its torch module, fixed I/O, and what the builder must know.

    ``kind``: segmentation | preprocessor | fbank | embedding. ``quant_kind``: which model's quant
    setting applies (None: always fp32). ``variant``: payload keys that distinguish it in the cache
    (empty for the unfused models, so their cache keys do not change). ``switches``: realized here.
    """

    kind: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quant_kind: str | None
    variant: dict[str, Any]
    switches: tuple[str, ...]


def stage_specs(plan: FusionPlan, segmentation: nn.Module, embedding: nn.Module, segmentation_batch: int,
                embedding_batch: int) -> list[StageSpec]:
    """The models of ``plan`` in run order (the order of a chain / Core ML pipeline)."""
    F, L, S = NUM_FRAMES, NUM_LOCAL_SPEAKERS, CHUNK_SAMPLES
    D = int(embedding.embedding_dim)
    Bs = segmentation_batch
    Be = segmentation_batch if plan.coreml_pipeline else embedding_batch  # one batch of chunks through the chain
    stages: list[StageSpec] = []

    flat = plan.coreml_pipeline  # the chain feeds the same (B, S) waveforms to segmentation and embedding
    seg_outputs = [TensorSpec("logprobs", (Bs, F, NUM_POWERSET_CLASSES))]
    preprocessor_outputs = [TensorSpec("segmentations", (Bs, F, L)), TensorSpec("masks", (Bs, F, L)),
                            TensorSpec("active", (Bs, L))]
    seg_variant: dict[str, Any] = {}
    seg_switches: list[str] = []
    seg_module: nn.Module = segmentation
    if plan.segmentation_with_preprocessor or flat:
        clean = plan.segmentation_with_preprocessor and plan.clean_frames_in_graph
        preprocessor = GraphPreprocessor(plan.min_num_clean_frames, plan.min_active_frames, clean_frames=clean) \
            if plan.segmentation_with_preprocessor else None
        seg_module = SegmentationWithPreprocessor(segmentation, preprocessor, flat_input=flat)
        if preprocessor is not None:
            seg_outputs += preprocessor_outputs if clean else preprocessor_outputs[:1]
            seg_switches.append("segmentation_with_preprocessor")
            seg_variant["preprocessor"] = preprocessor.variant()
            if clean:
                seg_switches.append("clean_frames_in_graph")
        seg_variant["flat_input"] = flat
    seg_input = TensorSpec("waveforms", (Bs, S) if flat else (Bs, 1, S))
    stages.append(StageSpec("segmentation", seg_module, [seg_input], seg_outputs, "segmentation", seg_variant,
                            tuple(seg_switches)))

    if plan.standalone_preprocessor:
        preprocessor = GraphPreprocessor(plan.min_num_clean_frames, plan.min_active_frames, clean_frames=True)
        stages.append(StageSpec("preprocessor", preprocessor, [TensorSpec("logprobs", (Bs, F, NUM_POWERSET_CLASSES))],
                                preprocessor_outputs, None, {"preprocessor": preprocessor.variant()},
                                ("clean_frames_in_graph",)))

    emb_switches: list[str] = []
    if not plan.fbank_in_embedding_model:
        num_fbank = embedding.fbank.num_frames(S)
        stages.append(StageSpec("fbank", FbankFrontEnd(embedding), [TensorSpec("waveforms", (Be, S))],
                                [TensorSpec("features", (Be, num_fbank, 80))], None, {"stage": "fbank"},
                                ("fbank_model_separate",)))
        emb_input = TensorSpec("features", (Be, num_fbank, 80))
        emb_switches.append("fbank_model_separate")
    else:
        emb_input = TensorSpec("waveforms", (Be, S))
    if plan.tiled_trunk:
        stages += tiled_stage_specs(plan, embedding, emb_input, Be, tuple(emb_switches))
        return stages
    per_chunk = plan.per_chunk_embedding
    module = FusedEmbedding(embedding, fbank_in_model=plan.fbank_in_embedding_model, per_chunk=per_chunk,
                            shared_trunk=plan.shared_trunk, with_post=plan.embedding_with_post)
    masks = TensorSpec("masks", (Be, F, L) if per_chunk else (Be, F))
    outputs = [TensorSpec("embeddings", (Be, L, D) if per_chunk else (Be, D))]
    if plan.embedding_with_post:
        outputs.append(TensorSpec("unit_embeddings", outputs[0].shape))
        if per_chunk:
            outputs.append(TensorSpec("distances", (Be, L, L)))
        emb_switches.append("embedding_with_post")
    if plan.shared_trunk:
        emb_switches.append("shared_trunk")
    variant = module.variant()
    stages.append(StageSpec("embedding", module if variant else embedding, [emb_input, masks], outputs, "embedding",
                            variant, tuple(emb_switches)))
    return stages


def tiled_stage_specs(plan: FusionPlan, embedding: nn.Module, emb_input: TensorSpec, batch: int,
                      switches: tuple[str, ...]) -> list[StageSpec]:
    """``embedding.tiled_trunk``: the trunk (kind ``embedding``, quantized as the embedding) and the
    pooling model (kind ``embedding_pool``, fp32: a statistics pooling and one dense layer)."""
    F, L = NUM_FRAMES, NUM_LOCAL_SPEAKERS
    trunk = TrunkFeatures(embedding, fbank_in_model=plan.fbank_in_embedding_model)
    with torch.no_grad():
        channels, trunk_frames = trunk(torch.zeros((1, *emb_input.shape[1:]))).shape[1:]
    frame_features = TensorSpec("frame_features", (batch, int(channels), int(trunk_frames)))
    pool = SlotPooling(embedding, with_post=plan.embedding_with_post)
    D = int(embedding.embedding_dim)
    outputs = [TensorSpec("embeddings", (batch, L, D))]
    pool_switches: tuple[str, ...] = ()
    if plan.embedding_with_post:
        outputs += [TensorSpec("unit_embeddings", (batch, L, D)), TensorSpec("distances", (batch, L, L))]
        pool_switches = ("embedding_with_post",)
    return [StageSpec("embedding", trunk, [emb_input], [frame_features], "embedding", trunk.variant(),
                      (*switches, "shared_trunk", "tiled_trunk")),
            StageSpec("embedding_pool", pool, [frame_features, TensorSpec("masks", (batch, F, L))], outputs, None,
                      pool.variant(), pool_switches)]


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
        return {"min_num_clean_frames": self.min_num_clean_frames, "min_active_frames": self.min_active_frames,
                "clean_frames": self.clean_frames}

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
        options = {"fbank_in_model": self.fbank is not None, "per_chunk": self.per_chunk,
                   "shared_trunk": self.shared_trunk, "with_post": self.with_post}
        defaults = {"fbank_in_model": True, "per_chunk": False, "shared_trunk": False, "with_post": False}
        return {} if options == defaults else {"embedding_fusion": options}

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
        return {"embedding_fusion": {"fbank_in_model": self.fbank is not None, "stage": "trunk"}}

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
        return {"embedding_fusion": {"stage": "pool", "with_post": self.with_post}}

    def forward(self, frame_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        embeddings = pool_slots(self.network, frame_features, masks)
        return with_post_outputs(embeddings) if self.with_post else embeddings


# ----------------------------------------------------------------------------------------------
# Running a chain of models as one


class ChainedModel:
    """Runnable models run back to back in one call, each fed by name from the chain's inputs and
    the earlier models' outputs (what ``ct.utils.make_pipeline`` does inside Core ML).

    Inputs: those no earlier model produces; outputs: every model's outputs.
    """

    def __init__(self, models: list[RunnableModel]) -> None:
        self.models = models
        produced: set[str] = set()
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        for model in models:
            self.inputs += [s for s in model.inputs if s.name not in produced and s.name not in
                            {i.name for i in self.inputs}]
            produced |= {s.name for s in model.outputs}
            self.outputs += model.outputs

    def load(self) -> None:
        for model in self.models:
            load = getattr(model, "load", None)
            if callable(load):
                load()

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        values = dict(inputs)
        results: dict[str, np.ndarray] = {}
        for model in self.models:
            out = model(**{s.name: values[s.name] for s in model.inputs})
            values.update(out)
            results.update(out)
        return results

    def sync(self) -> None:
        for model in self.models:
            model.sync()


class InChain:
    """Stands for a model that runs inside a chain / pipeline: declared I/O, never called alone."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs, self.outputs = inputs, outputs

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("this model runs inside the fusion.coreml_pipeline chain, not on its own")

    def sync(self) -> None:
        """Nothing to wait for."""


def memoized(load: Callable[[], RunnableModel]) -> Callable[[], RunnableModel]:
    """``load`` called once: a chain and the stage that reports it share one loaded model."""
    cache: list[RunnableModel] = []

    def once() -> RunnableModel:
        if not cache:
            cache.append(load())
        return cache[0]

    return once


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
