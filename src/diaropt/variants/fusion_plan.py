"""The ``fusion`` axis's plan, without torch: which models a configuration builds, their I/O shapes
and cache-key payloads, and the torch-free helpers that run chained models.

Split from ``variants.fusion`` (which keeps the torch modules and re-exports everything here) so
that a run whose models are already in the cache never imports torch or builds a module: the
shapes come from ``models.constants`` and each ``StageSpec`` builds its torch module only when a
builder asks for ``spec.module`` (on a cache miss). The table of switches is in ``variants.fusion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from diaropt.backends.base import BackendUnavailable, RunnableModel, TensorSpec
from diaropt.models.constants import (CHUNK_SAMPLES, EMBEDDING_GEOMETRY, NUM_FRAMES, NUM_LOCAL_SPEAKERS,
                                      NUM_POWERSET_CLASSES, EmbeddingGeometry)

#: Switch names as recorded (``fusion_<name>`` metrics); ``fbank_model_separate`` is
#: ``fusion.fbank_in_embedding_model=false``, ``shared_trunk`` / ``tiled_trunk`` are ``embedding.*``,
#: ``sinc_shared`` is ``segmentation.sinc_shared``.
SWITCHES: tuple[str, ...] = ("clean_frames_in_graph", "segmentation_with_preprocessor", "embedding_with_post",
                             "coreml_pipeline", "fbank_model_separate", "shared_trunk", "tiled_trunk", "sinc_shared")


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
    sinc_shared: bool = False

    @classmethod
    def from_config(cls, cfg: Any, backend: str) -> FusionPlan:
        """The plan of ``cfg`` for the resolved ``backend`` (``variants.build.resolve_backend``)."""
        f = cfg.fusion
        return cls(bool(f.clean_frames_in_graph), bool(f.segmentation_with_preprocessor),
                   bool(f.embedding_with_post), bool(f.coreml_pipeline), bool(f.fbank_in_embedding_model),
                   bool(cfg.embedding.shared_trunk), int(cfg.embedding.min_num_clean_frames),
                   tiled_trunk=bool(cfg.embedding.tiled_trunk), sinc_shared=resolve_sinc_shared(cfg, backend))

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
              "tiled_trunk": self.tiled_trunk, "sinc_shared": self.sinc_shared}
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
        if self.sinc_shared and (self.coreml_pipeline or self.segmentation_with_preprocessor):
            raise BackendUnavailable("segmentation.sinc_shared assembles each chunk's sinc responses in numpy between "
                                     "two models, so it cannot run inside fusion.coreml_pipeline's chain nor with "
                                     "fusion.segmentation_with_preprocessor: set those to false")


def resolve_sinc_shared(cfg: Any, backend: str) -> bool:
    """``segmentation.sinc_shared``; null (auto) -> on for ``onnxruntime`` unless
    ``fusion.segmentation_with_preprocessor`` or ``fusion.coreml_pipeline`` is on (they cannot
    express it), off for the other backends: it was chosen on ONNX Runtime's measurements
    (``config.SegmentationConfig``). An explicit true/false is kept (``FusionPlan.check`` refuses an
    impossible true)."""
    value = cfg.segmentation.get("sinc_shared", None)
    if value is not None:
        return bool(value)
    return backend == "onnxruntime" and not (cfg.fusion.segmentation_with_preprocessor or cfg.fusion.coreml_pipeline)


# ----------------------------------------------------------------------------------------------
# Cache-key payloads of the fusing modules (their ``variant()`` methods return these)


def preprocessor_variant(min_num_clean_frames: int, min_active_frames: int, clean_frames: bool) -> dict[str, Any]:
    return {"min_num_clean_frames": int(min_num_clean_frames), "min_active_frames": int(min_active_frames),
            "clean_frames": clean_frames}


def fused_embedding_variant(fbank_in_model: bool, per_chunk: bool, shared_trunk: bool,
                            with_post: bool) -> dict[str, Any]:
    """Empty for the plain per-pair model, so its cache key does not change."""
    options = {"fbank_in_model": fbank_in_model, "per_chunk": per_chunk, "shared_trunk": shared_trunk,
               "with_post": with_post}
    defaults = {"fbank_in_model": True, "per_chunk": False, "shared_trunk": False, "with_post": False}
    return {} if options == defaults else {"embedding_fusion": options}


def trunk_variant(fbank_in_model: bool) -> dict[str, Any]:
    return {"embedding_fusion": {"fbank_in_model": fbank_in_model, "stage": "trunk"}}


def pool_variant(with_post: bool) -> dict[str, Any]:
    return {"embedding_fusion": {"stage": "pool", "with_post": with_post}}


# ----------------------------------------------------------------------------------------------
# The models to build


class ModelSource:
    """A torch module built only when first asked for (``get()``), and what its shapes depend on.

    ``geometry``: for an embedding model, its ``models.constants.EmbeddingGeometry``. A module
    passed directly is wrapped as is (an embedding module's geometry is read from its ``name``).
    """

    def __init__(self, load: Callable[[], Any], geometry: EmbeddingGeometry | None = None) -> None:
        self._load = memoized(load)
        self.geometry = geometry

    def get(self) -> Any:
        return self._load()

    @classmethod
    def of(cls, item: Any) -> ModelSource:
        if isinstance(item, ModelSource):
            return item
        name = getattr(item, "name", None)
        return cls(lambda: item, EMBEDDING_GEOMETRY.get(name) if isinstance(name, str) else None)


@dataclass(frozen=True)
class StageSpec:
    """One model to build: how to make its torch module, fixed I/O, and what the builder must know.

    ``kind``: segmentation | preprocessor | fbank | embedding | embedding_pool. ``quant_kind``: which
    model's quant setting applies (None: always fp32). ``variant``: payload keys that distinguish it in
    the cache (empty for the unfused models, so their cache keys do not change). ``switches``:
    realized here. ``module`` builds the torch module on first use (torch, weights): a builder asks
    for it only on a cache miss.
    """

    kind: str
    make_module: Callable[[], Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quant_kind: str | None
    variant: dict[str, Any]
    switches: tuple[str, ...]

    @property
    def module(self) -> Any:
        return self.make_module()


def _modules() -> Any:
    from diaropt.variants import fusion  # the torch modules

    return fusion


def stage_specs(plan: FusionPlan, segmentation: Any, embedding: Any, segmentation_batch: int,
                embedding_batch: int) -> list[StageSpec]:
    """The models of ``plan`` in run order (the order of a chain / Core ML pipeline).

    ``segmentation`` / ``embedding``: ``ModelSource`` (built lazily) or torch modules. Shapes come
    from ``models.constants``: nothing is built or run here.
    """
    segmentation, embedding = ModelSource.of(segmentation), ModelSource.of(embedding)
    geometry = embedding.geometry
    if geometry is None:
        raise ValueError("the embedding model's geometry is unknown (models.constants.EMBEDDING_GEOMETRY)")
    F, L, S = NUM_FRAMES, NUM_LOCAL_SPEAKERS, CHUNK_SAMPLES
    D = geometry.embedding_dim
    Bs = segmentation_batch
    Be = segmentation_batch if plan.coreml_pipeline else embedding_batch  # one batch of chunks through the chain
    stages: list[StageSpec] = []

    flat = plan.coreml_pipeline  # the chain feeds the same (B, S) waveforms to segmentation and embedding
    seg_outputs = [TensorSpec("logprobs", (Bs, F, NUM_POWERSET_CLASSES))]
    preprocessor_outputs = [TensorSpec("segmentations", (Bs, F, L)), TensorSpec("masks", (Bs, F, L)),
                            TensorSpec("active", (Bs, L))]
    seg_variant: dict[str, Any] = {}
    seg_switches: list[str] = []
    with_preprocessor = plan.segmentation_with_preprocessor
    clean = with_preprocessor and plan.clean_frames_in_graph

    def make_segmentation() -> Any:
        if not (with_preprocessor or flat):
            return segmentation.get()
        m = _modules()
        preprocessor = m.GraphPreprocessor(plan.min_num_clean_frames, plan.min_active_frames,
                                           clean_frames=clean) if with_preprocessor else None
        return m.SegmentationWithPreprocessor(segmentation.get(), preprocessor, flat_input=flat)

    if with_preprocessor or flat:
        if with_preprocessor:
            seg_outputs += preprocessor_outputs if clean else preprocessor_outputs[:1]
            seg_switches.append("segmentation_with_preprocessor")
            seg_variant["preprocessor"] = preprocessor_variant(plan.min_num_clean_frames, plan.min_active_frames,
                                                               clean)
            if clean:
                seg_switches.append("clean_frames_in_graph")
        seg_variant["flat_input"] = flat
    seg_input = TensorSpec("waveforms", (Bs, S) if flat else (Bs, 1, S))
    if plan.sinc_shared:  # check() refused the fused segmentation variants
        stages += sinc_shared_stage_specs(segmentation, Bs, seg_outputs)
    else:
        stages.append(StageSpec("segmentation", memoized(make_segmentation), [seg_input], seg_outputs,
                                "segmentation", seg_variant, tuple(seg_switches)))

    if plan.standalone_preprocessor:
        stages.append(StageSpec(
            "preprocessor",
            memoized(lambda: _modules().GraphPreprocessor(plan.min_num_clean_frames, plan.min_active_frames,
                                                          clean_frames=True)),
            [TensorSpec("logprobs", (Bs, F, NUM_POWERSET_CLASSES))], preprocessor_outputs, None,
            {"preprocessor": preprocessor_variant(plan.min_num_clean_frames, plan.min_active_frames, True)},
            ("clean_frames_in_graph",)))

    emb_switches: list[str] = []
    if not plan.fbank_in_embedding_model:
        num_fbank = geometry.num_fbank_frames(S)
        stages.append(StageSpec("fbank", memoized(lambda: _modules().FbankFrontEnd(embedding.get())),
                                [TensorSpec("waveforms", (Be, S))], [TensorSpec("features", (Be, num_fbank, 80))],
                                None, {"stage": "fbank"}, ("fbank_model_separate",)))
        emb_input = TensorSpec("features", (Be, num_fbank, 80))
        emb_switches.append("fbank_model_separate")
    else:
        emb_input = TensorSpec("waveforms", (Be, S))
    if plan.tiled_trunk:
        stages += tiled_stage_specs(plan, embedding, emb_input, Be, tuple(emb_switches))
        return stages
    per_chunk = plan.per_chunk_embedding
    variant = fused_embedding_variant(plan.fbank_in_embedding_model, per_chunk, plan.shared_trunk,
                                      plan.embedding_with_post)
    masks = TensorSpec("masks", (Be, F, L) if per_chunk else (Be, F))
    outputs = [TensorSpec("embeddings", (Be, L, D) if per_chunk else (Be, D))]
    if plan.embedding_with_post:
        outputs.append(TensorSpec("unit_embeddings", outputs[0].shape))
        if per_chunk:
            outputs.append(TensorSpec("distances", (Be, L, L)))
        emb_switches.append("embedding_with_post")
    if plan.shared_trunk:
        emb_switches.append("shared_trunk")

    def make_embedding() -> Any:
        if not variant:
            return embedding.get()
        return _modules().FusedEmbedding(embedding.get(), fbank_in_model=plan.fbank_in_embedding_model,
                                         per_chunk=per_chunk, shared_trunk=plan.shared_trunk,
                                         with_post=plan.embedding_with_post)

    stages.append(StageSpec("embedding", memoized(make_embedding), [emb_input, masks], outputs, "embedding", variant,
                            tuple(emb_switches)))
    return stages


def tiled_stage_specs(plan: FusionPlan, embedding: Any, emb_input: TensorSpec, batch: int,
                      switches: tuple[str, ...]) -> list[StageSpec]:
    """``embedding.tiled_trunk``: the trunk (kind ``embedding``, quantized as the embedding) and the
    pooling model (kind ``embedding_pool``, fp32: a statistics pooling and one dense layer). The
    trunk's output (B, C, T) comes from the network's geometry (``EmbeddingGeometry.trunk_frames``;
    ``tests/test_startup.py`` checks it against the forward), not from running it."""
    embedding = ModelSource.of(embedding)
    geometry = embedding.geometry
    F, L = NUM_FRAMES, NUM_LOCAL_SPEAKERS
    frame_features = TensorSpec("frame_features",
                                (batch, geometry.trunk_channels, geometry.trunk_frames(CHUNK_SAMPLES)))
    D = geometry.embedding_dim
    outputs = [TensorSpec("embeddings", (batch, L, D))]
    pool_switches: tuple[str, ...] = ()
    if plan.embedding_with_post:
        outputs += [TensorSpec("unit_embeddings", (batch, L, D)), TensorSpec("distances", (batch, L, L))]
        pool_switches = ("embedding_with_post",)
    fbank_in_model = plan.fbank_in_embedding_model
    with_post = plan.embedding_with_post
    trunk = memoized(lambda: _modules().TrunkFeatures(embedding.get(), fbank_in_model=fbank_in_model))
    pool = memoized(lambda: _modules().SlotPooling(embedding.get(), with_post=with_post))
    return [StageSpec("embedding", trunk, [emb_input], [frame_features], "embedding", trunk_variant(fbank_in_model),
                      (*switches, "shared_trunk", "tiled_trunk")),
            StageSpec("embedding_pool", pool, [frame_features, TensorSpec("masks", (batch, F, L))], outputs, None,
                      pool_variant(with_post), pool_switches)]


def sinc_shared_stage_specs(segmentation: Any, batch: int, outputs: list[TensorSpec]) -> list[StageSpec]:
    """``segmentation.sinc_shared``: the segmentation model split after its first max-pool
    (``models.segmentation.SincFront`` / ``SincRest``, run by ``pipeline.segmentation.SharedSinc``).
    The front (kind ``segmentation_sinc``, always fp32: one convolution whose 80 x 251 filters are
    computed from 80 pairs of cut-offs, and two max-pools) takes rows of ``SINC_BLOCK_SAMPLES`` raw
    samples; the rest (kind ``segmentation``, quantized as the segmentation model) one chunk's pooled
    responses and its waveform mean and variance. The front's batch (fixed in Core ML) is one
    chunk's rows (10: what an unshared chunk needs); ``SharedSinc`` calls it as often as needed."""
    from diaropt.pipeline.segmentation import (SINC_BLOCK_POOLED, SINC_BLOCK_SAMPLES, SINC_FILTERS,
                                               sinc_pooled_frames)

    segmentation = ModelSource.of(segmentation)
    pooled = sinc_pooled_frames(CHUNK_SAMPLES)
    front_batch = -(-pooled // SINC_BLOCK_POOLED)

    def load(part: str) -> Callable[[], Any]:
        def make() -> Any:
            from diaropt.models import segmentation as models  # torch: only on a cache miss

            return getattr(models, part)(segmentation.get())
        return memoized(make)

    front_outputs = [TensorSpec(name, (front_batch, SINC_FILTERS, SINC_BLOCK_POOLED))
                     for name in ("sinc_max", "sinc_max_neg")]
    front = StageSpec("segmentation_sinc", load("SincFront"),
                      [TensorSpec("waveforms", (front_batch, 1, SINC_BLOCK_SAMPLES))], front_outputs, None,
                      {"sinc_shared": {"stage": "front", "split": "after_first_pool_max_neg",
                                       "block_samples": SINC_BLOCK_SAMPLES}}, ("sinc_shared",))
    rest_inputs = [TensorSpec(name, (batch, SINC_FILTERS, pooled)) for name in ("sinc_max", "sinc_max_neg")]
    rest_inputs += [TensorSpec("waveform_mean", (batch, 1)), TensorSpec("waveform_variance", (batch, 1))]
    rest = StageSpec("segmentation", load("SincRest"), rest_inputs, outputs, "segmentation",
                     {"sinc_shared": {"stage": "rest", "split": "after_first_pool_max_neg"}}, ("sinc_shared",))
    return [front, rest]


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


def memoized(load: Callable[[], Any]) -> Callable[[], Any]:
    """``load`` called once: a chain and the stage that reports it share one loaded model."""
    cache: list[Any] = []

    def once() -> Any:
        if not cache:
            cache.append(load())
        return cache[0]

    return once
