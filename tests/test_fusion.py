"""The fusion axis and embedding.shared_trunk (``variants.fusion``): each switch changes the built
models as described, and never the outputs (masks identical, embeddings within 1e-5, RTTMs equal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diaropt.backends.base import BackendUnavailable, TensorSpec
from diaropt.pipeline import preprocessing
from diaropt.variants.fusion import (SWITCHES, ChainedModel, FbankFrontEnd, FusedEmbedding, FusionPlan,
                                     GraphPreprocessor, stage_specs, unit_rows)

F, L, S = 589, 3, 160000
SHORT_S = 11.0  # 2 chunks: enough for every code path, fast on 2 cores


def _logprobs(seed: int, num_chunks: int = 6) -> np.ndarray:
    """Random powerset scores with long runs (so clean-frame counts straddle the fallback threshold),
    exact ties, and a chunk that is silent throughout."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(rng.integers(0, 7, size=(num_chunks, F // 31 + 1)), 31, axis=1)[:, :F]
    scores = rng.normal(size=(num_chunks, F, 7)).astype(np.float32) - 5
    np.put_along_axis(scores, classes[..., None], 1.0, axis=-1)
    scores[0, :50, 2] = scores[0, :50, 5] = 3.0  # ties: the lower class wins
    scores[1] = -5.0
    scores[1, :, 0] = 0.0
    return scores


def _numpy_preprocessor(logprobs: np.ndarray, min_num_clean_frames: int):
    segmentations = preprocessing.powerset_to_multilabel(logprobs)
    return (segmentations, preprocessing.embedding_masks(segmentations, min_num_clean_frames),
            preprocessing.active_local_speakers(segmentations, 1))


# ------------------------------------------------------------------------------------------------
# clean_frames_in_graph


@pytest.mark.parametrize("min_num_clean_frames", [0, 10, 100, 400])
def test_graph_preprocessor_equals_numpy_in_torch_and_onnxruntime(min_num_clean_frames, tmp_path):
    from diaropt.backends.onnxruntime import OnnxRuntimeModel, export_onnx, op_histogram

    logprobs = np.concatenate([_logprobs(seed) for seed in range(4)])
    expected = _numpy_preprocessor(logprobs, min_num_clean_frames)
    module = GraphPreprocessor(min_num_clean_frames)
    with torch.inference_mode():
        ours = [t.numpy() for t in module(torch.from_numpy(logprobs))]
    outputs = [TensorSpec("segmentations", (2, F, L)), TensorSpec("masks", (2, F, L)), TensorSpec("active", (2, L))]
    path = export_onnx(module, (torch.zeros(2, F, 7),), [TensorSpec("logprobs", (2, F, 7))], outputs,
                       tmp_path / "pre.onnx")
    ort = OnnxRuntimeModel(path)(logprobs=logprobs)
    fell_back = 0
    for got in (ours, [ort["segmentations"], ort["masks"], ort["active"]]):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[2] > 0.5, expected[2])
        fell_back = int((expected[1] != preprocessing.clean_frame_masks(expected[0])).any(axis=1).sum())
    assert 0 < int(expected[2].sum()) < expected[2].size  # silent slots exist
    if min_num_clean_frames in (10, 100):
        assert fell_back > 0  # the min_num_clean_frames fallback to the full mask is exercised
    histogram = op_histogram(path)
    assert histogram["ArgMax"] == 1 and histogram["Gather"] == 1 and histogram["Where"] == 1


def test_graph_preprocessor_converts_to_coreml(tmp_path):
    from diaropt.backends.coreml import convert_coreml, io_specs, op_histogram

    outputs = [TensorSpec("segmentations", (2, F, L)), TensorSpec("masks", (2, F, L)), TensorSpec("active", (2, L))]
    path = tmp_path / "pre.mlpackage"
    convert_coreml(GraphPreprocessor(10), (torch.zeros(2, F, 7),), [TensorSpec("logprobs", (2, F, 7))], outputs, path)
    histogram = op_histogram(path)
    assert histogram["reduce_argmax"] == 1 and histogram["gather"] == 1 and histogram["select"] == 1
    assert [s.name for s in io_specs(path)[1]] == ["segmentations", "masks", "active"]


# ------------------------------------------------------------------------------------------------
# what each switch builds (no export: the stage plan)


def _specs(**switches):
    from diaropt.models.embedding import SpeakerEmbedding
    from diaropt.models.segmentation import PyanNet

    plan = FusionPlan(**switches)
    return {s.kind: s for s in stage_specs(plan, PyanNet(), SpeakerEmbedding("campplus", "strided"), 32, 32)}


def _io(spec):
    return [(s.name, s.shape) for s in spec.inputs], [(s.name, s.shape) for s in spec.outputs]


def test_each_switch_changes_the_planned_models():
    base = _specs()
    assert list(base) == ["segmentation", "embedding"]
    assert _io(base["segmentation"]) == ([("waveforms", (32, 1, S))], [("logprobs", (32, F, 7))])
    assert _io(base["embedding"]) == ([("waveforms", (32, S)), ("masks", (32, F))], [("embeddings", (32, 192))])
    assert not base["embedding"].variant and not base["segmentation"].variant  # cache keys unchanged

    clean = _specs(clean_frames_in_graph=True)
    assert list(clean) == ["segmentation", "preprocessor", "embedding"]
    assert clean["preprocessor"].quant_kind is None  # fp32 whatever quant says: masks must stay exact
    assert [s.name for s in clean["preprocessor"].outputs] == ["segmentations", "masks", "active"]

    fused = _specs(segmentation_with_preprocessor=True)
    assert [s.name for s in fused["segmentation"].outputs] == ["logprobs", "segmentations"]
    both = _specs(segmentation_with_preprocessor=True, clean_frames_in_graph=True)
    assert list(both) == ["segmentation", "embedding"]
    assert [s.name for s in both["segmentation"].outputs] == ["logprobs", "segmentations", "masks", "active"]
    assert set(both["segmentation"].switches) == {"segmentation_with_preprocessor", "clean_frames_in_graph"}

    post = _specs(embedding_with_post=True)
    assert [s.name for s in post["embedding"].outputs] == ["embeddings", "unit_embeddings"]

    fbank = _specs(fbank_in_embedding_model=False)
    assert list(fbank) == ["segmentation", "fbank", "embedding"]
    assert fbank["fbank"].quant_kind is None and _io(fbank["fbank"])[1] == [("features", (32, 998, 80))]
    assert _io(fbank["embedding"])[0] == [("features", (32, 998, 80)), ("masks", (32, F))]

    shared = _specs(shared_trunk=True, embedding_with_post=True)
    assert _io(shared["embedding"]) == ([("waveforms", (32, S)), ("masks", (32, F, L))],
                                        [("embeddings", (32, L, 192)), ("unit_embeddings", (32, L, 192)),
                                         ("distances", (32, L, L))])

    chain = _specs(coreml_pipeline=True, clean_frames_in_graph=True, fbank_in_embedding_model=False)
    assert list(chain) == ["segmentation", "preprocessor", "fbank", "embedding"]
    assert chain["segmentation"].inputs[0].shape == (32, S)  # the same waveforms feed segmentation and fbank
    assert chain["embedding"].inputs[1].shape == (32, F, L)  # per chunk: masks straight from the preprocessor


def test_coreml_pipeline_needs_masks_from_a_graph():
    with pytest.raises(BackendUnavailable, match="clean_frames_in_graph=true"):
        FusionPlan(coreml_pipeline=True).check()
    FusionPlan(coreml_pipeline=True, clean_frames_in_graph=True).check()
    assert set(FusionPlan().realized()) == set(SWITCHES)


# ------------------------------------------------------------------------------------------------
# embedding: shared trunk, post, separate fbank (torch, real CAM++ weights)


@pytest.fixture(scope="module")
def chunk_batch(dev00_audio):
    """waveforms (1, S) and masks (1, F, L): one slot silent, two overlapping ones."""
    waveforms = dev00_audio[None, :S].copy()
    masks = np.zeros((1, F, L), np.float32)
    masks[0, :300, 0] = masks[0, 250:, 2] = 1
    return waveforms, masks


def _per_pair(campplus, waveforms, masks):
    """(B, L, D) the baseline way: the whole network once per (chunk, slot)."""
    with torch.inference_mode():
        rows = [[campplus(torch.from_numpy(waveforms[b: b + 1]), torch.from_numpy(masks[b: b + 1, :, s]))[0].numpy()
                 for s in range(L)] for b in range(len(waveforms))]
    return np.array(rows)


@pytest.mark.parametrize("shared", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_shared_trunk_and_post_equal_the_per_pair_embeddings(shared, campplus, chunk_batch):
    waveforms, masks = chunk_batch
    expected = _per_pair(campplus, waveforms, masks)
    if True:
        module = FusedEmbedding(campplus, per_chunk=True, shared_trunk=shared, with_post=True).eval()
        with torch.inference_mode():
            embeddings, unit, distances = (t.numpy() for t in module(torch.from_numpy(waveforms), torch.from_numpy(masks)))
        assert embeddings.shape == (1, L, 192)
        silent = masks.sum(1) == 0
        assert np.isnan(embeddings[silent]).all()  # zero mask -> NaN, never a zero vector
        np.testing.assert_allclose(embeddings[~silent], expected[~silent], atol=1e-5, rtol=0)
        norms = np.linalg.norm(expected[~silent], axis=-1, keepdims=True)
        np.testing.assert_allclose(unit[~silent], expected[~silent] / norms, atol=1e-6)
        np.testing.assert_allclose(distances[0, 0, 2], 1 - unit[0, 0] @ unit[0, 2], atol=1e-6)


def test_unit_rows_survive_fp16_ranges():
    x = torch.tensor([[300.0, 400.0], [float("nan"), 1.0]]).half()
    unit = unit_rows(x).float()
    np.testing.assert_allclose(unit[0].numpy(), [0.6, 0.8], atol=1e-3)  # 300**2 + 400**2 overflows fp16
    assert torch.isnan(unit[1]).all()


def test_separate_fbank_model_then_network_equals_the_whole(campplus, chunk_batch):
    waveforms, masks = chunk_batch
    front, network = FbankFrontEnd(campplus).eval(), FusedEmbedding(campplus, fbank_in_model=False).eval()
    with torch.inference_mode():
        features = front(torch.from_numpy(waveforms))
        split = network(features, torch.from_numpy(masks[:, :, 0])).numpy()
        whole = campplus(torch.from_numpy(waveforms), torch.from_numpy(masks[:, :, 0])).numpy()
    assert features.shape == (1, 998, 80)
    np.testing.assert_array_equal(split, whole)


def test_chained_model_feeds_by_name():
    class Add:
        def __init__(self, a, b, out):
            self.inputs = [TensorSpec(a, (2,)), TensorSpec(b, (2,))]
            self.outputs = [TensorSpec(out, (2,))]

        def __call__(self, **x):
            return {self.outputs[0].name: sum(x.values())}

        def sync(self):
            pass

    chain = ChainedModel([Add("x", "y", "z"), Add("z", "x", "w")])
    assert [s.name for s in chain.inputs] == ["x", "y"]
    out = chain(x=np.ones(2), y=np.full(2, 2.0))
    np.testing.assert_array_equal(out["w"], [4.0, 4.0])
    assert set(out) == {"z", "w"}


# ------------------------------------------------------------------------------------------------
# end to end: fusion on vs off gives the same arrays and annotation


#: the exact embedding paths only (the default tiled trunk is an approximation: tests/test_tiled_trunk.py)
EXACT_EMBEDDING = ["embedding.tiled_trunk=false", "embedding.shared_trunk=false"]
BASELINE: list[str] = []
VARIANTS = {
    "clean_frames_in_graph": ["fusion.clean_frames_in_graph=true"],
    "segmentation_with_preprocessor": ["fusion.segmentation_with_preprocessor=true"],
    "seg_pre_clean_post": ["fusion.segmentation_with_preprocessor=true", "fusion.clean_frames_in_graph=true",
                           "fusion.embedding_with_post=true"],
    "fbank_separate": ["fusion.fbank_in_embedding_model=false"],
    "shared_trunk_post": ["embedding.shared_trunk=true", "fusion.embedding_with_post=true"],
    "all_on_chain": ["fusion=on", "embedding.shared_trunk=true", "fusion.fbank_in_embedding_model=false"],
    "chain_unshared": ["fusion=on"],  # the seed plan's fusion: per-chunk embedding, the network once per slot
}
FAST = ("all_on_chain",)  # every switch at once; the others are slow (each ~5-20 s of torch on 2 cores)


def _run(backend: str, overrides: list[str], audio: np.ndarray, cache_dir):
    from diaropt.config import compose
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import load_pipeline
    from diaropt.variants.build import build_models

    cfg = compose([f"backend={backend}", "compute_unit=cpu_only", f"paths.cache_dir={cache_dir}",
                   "embedding.batch_size=4", "segmentation.batch_size=4", *EXACT_EMBEDDING, *overrides])
    built = build_models(cfg)
    pipeline = load_pipeline(cfg, built, StageTimer())
    return built, pipeline(audio, "dev00", keep_arrays=True)


def _assert_same(job, reference):
    for name in ("segmentations", "masks", "active", "hard_clusters", "count"):
        np.testing.assert_array_equal(job.arrays[name], reference.arrays[name], err_msg=name)
    np.testing.assert_allclose(job.arrays["embeddings"], reference.arrays["embeddings"], atol=1e-5, rtol=0)
    assert job.annotation == reference.annotation
    assert job.num_embedded == reference.num_embedded


@pytest.fixture(scope="module")
def short_audio(dev00_audio) -> np.ndarray:
    return dev00_audio[: int(SHORT_S * 16000)]


@pytest.fixture(scope="module")
def torch_reference(short_audio, tmp_path_factory):
    return _run("torch", BASELINE, short_audio, tmp_path_factory.mktemp("cache"))[1]


@pytest.mark.parametrize("variant", [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_torch_fusion_leaves_outputs_unchanged(variant, short_audio, torch_reference, tmp_path):
    built, output = _run("torch", VARIANTS[variant], short_audio, tmp_path)
    _assert_same(output, torch_reference)
    if "unit_embeddings" in output.arrays:
        active = output.arrays["active"]
        np.testing.assert_allclose(np.linalg.norm(output.arrays["unit_embeddings"][active], axis=-1), 1, atol=1e-6)
    assert any(built.fusion.values())
    assert all(built.graph_metrics()[f"fusion_{k}"] == v for k, v in built.fusion.items())
    if variant == "all_on_chain":
        assert built.segmentation.kind == "pipeline"
        # the chain embeds during segmentation: its one model outputs the embeddings, and the embedding
        # stage's entry only stands for the model inside it (calling it alone is refused)
        assert "embeddings" in {spec.name for spec in built.segmentation.load().outputs}
        with pytest.raises(RuntimeError, match="inside the fusion.coreml_pipeline chain"):
            built.embedding.load()()


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="module")
def ort_reference(short_audio, ort_cache):
    return _run("onnxruntime", BASELINE, short_audio, ort_cache)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnxruntime_fusion_leaves_outputs_unchanged(variant, short_audio, ort_reference, ort_cache):
    reference_built, reference = ort_reference
    built, output = _run("onnxruntime", VARIANTS[variant], short_audio, ort_cache)
    _assert_same(output, reference)
    models = {m.kind: m for m in built.stages}
    base = {m.kind: m for m in reference_built.stages}
    hist = {kind: _histogram(m) for kind, m in models.items()}
    base_hist = {kind: _histogram(m) for kind, m in base.items()}
    assert "ArgMax" not in base_hist["segmentation"]
    if variant == "clean_frames_in_graph":
        assert models["preprocessor"].info["fusion_clean_frames_in_graph"] == 1
        assert hist["preprocessor"]["ArgMax"] == 1 and hist["segmentation"] == base_hist["segmentation"]
    if variant == "segmentation_with_preprocessor":
        assert hist["segmentation"]["ArgMax"] == 1 and "Where" not in hist["segmentation"]  # decoding only
    if variant in ("seg_pre_clean_post", "all_on_chain", "chain_unshared"):
        assert hist["segmentation"]["ArgMax"] == 1 and hist["segmentation"]["Where"] >= 1
        assert models["segmentation"].info["onnx_ops"] >= base["segmentation"].info["onnx_ops"] + 8
        assert hist["embedding"]["ReduceMax"] > base_hist["embedding"].get("ReduceMax", 0)  # L2 normalization
    if variant in ("fbank_separate", "all_on_chain"):
        assert "fbank" in models
    if variant == "fbank_separate":  # (all_on_chain adds the shared trunk's and the post ops back)
        assert models["embedding"].info["onnx_ops"] < base["embedding"].info["onnx_ops"]
        assert models["fbank"].info["onnx_ops"] + models["embedding"].info["onnx_ops"] >= base["embedding"].info["onnx_ops"]
    if variant in ("shared_trunk_post", "all_on_chain"):
        assert hist["embedding"].get("Expand", 0) > base_hist["embedding"].get("Expand", 0)
    if variant == "chain_unshared":
        # traced per slot, but the ONNX exporter's common-subexpression pass merges the three copies of the
        # mask-independent trunk: only the layers after pooling stay per slot (so on ONNX Runtime this
        # variant computes the trunk once, like shared_trunk; Core ML keeps what the trace gives it)
        assert base_hist["embedding"]["Conv"] < hist["embedding"]["Conv"] < 3 * base_hist["embedding"]["Conv"] - 2
    if variant in ("all_on_chain", "chain_unshared"):
        assert built.segmentation.kind == "pipeline"


def _histogram(model) -> dict[str, int]:
    import json

    return json.loads((model.path.parent / "op_histogram.json").read_text())


# ------------------------------------------------------------------------------------------------
# Core ML: the fused models convert; the pipeline package is built and inspected (runs on macOS only)


def test_coreml_pipeline_of_small_models(tmp_path):
    """make_pipeline wiring, fast: segmentation-like scores -> the graph preprocessor."""
    from diaropt.backends.coreml import CoreMLModel, convert_coreml, io_specs, op_histogram
    from diaropt.variants.fusion import make_coreml_pipeline

    class Scores(torch.nn.Module):
        def forward(self, waveforms):
            return torch.log_softmax(waveforms[:, : F * 7].reshape(-1, F, 7), dim=-1)

    convert_coreml(Scores(), (torch.zeros(2, S),), [TensorSpec("waveforms", (2, S))],
                   [TensorSpec("logprobs", (2, F, 7))], tmp_path / "a.mlpackage")
    convert_coreml(GraphPreprocessor(10), (torch.zeros(2, F, 7),), [TensorSpec("logprobs", (2, F, 7))],
                   [TensorSpec("segmentations", (2, F, L)), TensorSpec("masks", (2, F, L)),
                    TensorSpec("active", (2, L))], tmp_path / "b.mlpackage")
    path = make_coreml_pipeline([tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"], tmp_path / "p.mlpackage")
    inputs, outputs = io_specs(path)
    assert [s.name for s in inputs] == ["waveforms"]
    assert {s.name for s in outputs} == {"segmentations", "masks", "active"}  # logprobs is consumed inside
    assert op_histogram(path)["reduce_argmax"] == 1 and op_histogram(path)["softmax"] + \
        op_histogram(path).get("log", 0) >= 1
    with pytest.raises(BackendUnavailable, match="macOS"):
        CoreMLModel(path)(waveforms=np.zeros((2, S), np.float32))


@pytest.fixture(scope="module")
def coreml_seed_plan(tmp_path_factory, assets):
    """The seed plan (fusion on, fp16, batched -> strided here for speed) + shared trunk + separate
    fbank, built for Core ML once (~2-3 min of conversions)."""
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    cfg = compose(["experiment=seed_plan", "backend=coreml", "frame_extraction=strided", "embedding.shared_trunk=true",
                   "fusion.fbank_in_embedding_model=false", "segmentation.batch_size=4",
                   f"paths.cache_dir={tmp_path_factory.mktemp('coreml-cache')}"])
    return build_models(cfg)


@pytest.mark.slow
def test_coreml_fused_models_and_pipeline_package(coreml_seed_plan):
    from diaropt.backends.coreml import io_specs, op_histogram

    built = coreml_seed_plan
    stages = {m.kind: m for m in built.stages}
    assert list(stages) == ["segmentation", "fbank", "embedding"]
    assert [s.name for s in io_specs(stages["segmentation"].path)[1]] == ["logprobs", "segmentations", "masks",
                                                                           "active"]
    from diaropt.backends.coreml import op_dtype_histogram

    fbank_dtypes = {d for counts in op_dtype_histogram(stages["fbank"].path).values() for d in counts}
    embedding_dtypes = {d for counts in op_dtype_histogram(stages["embedding"].path).values() for d in counts}
    assert fbank_dtypes == {"float32"} and "float16" in embedding_dtypes  # fbank fp32 whatever quant says
    inputs, outputs = io_specs(built.segmentation.path)
    assert [(s.name, s.shape) for s in inputs] == [("waveforms", (4, S))]
    assert {s.name for s in outputs} == {"logprobs", "segmentations", "active", "embeddings", "unit_embeddings",
                                         "distances"}
    histogram = op_histogram(built.segmentation.path)
    parts = [op_histogram(m.path) for m in built.stages]
    assert sum(histogram.values()) == sum(sum(h.values()) for h in parts)
    assert histogram["lstm"] == parts[0]["lstm"] and histogram["reduce_argmax"] == 1
    assert built.graph_metrics()["fusion_coreml_pipeline"] == 1.0
    with pytest.raises(BackendUnavailable, match="macOS"):
        built.segmentation.load().load()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["fusion=on", "quant=fp16", "embedding.tiled_trunk=false"],
                                       ["experiment=seed_plan"]], ids=["fp16_pipeline", "seed_plan"])
def test_non_fp32_coreml_pipeline_type_checks_stage_to_stage(tmp_path, assets, overrides):
    """Every stage declares fp32 outputs, so the fp16 pipeline passes the checks Core ML's validator
    makes (name, shape and dtype of every stage input), and the executor runs it."""
    import coremltools as ct

    from diaropt.backends.coreml_program import check_pipeline
    from diaropt.config import compose
    from diaropt.variants.build import build_models

    cfg = compose(["backend=coreml", "compute_unit=cpu_only", f"paths.cache_dir={tmp_path}", "segmentation.batch_size=1",
                   "embedding.batch_size=1", *overrides])
    built = build_models(cfg)
    spec = ct.utils.load_spec(str(built.segmentation.path))
    assert spec.WhichOneof("Type") == "pipeline"
    check_pipeline(spec, str(built.segmentation.path))
    chain = built.segmentation.load()
    out = chain(waveforms=np.zeros(chain.inputs[0].shape, np.float32))
    assert set(out) == {s.name for s in chain.outputs} and "embeddings" in out
