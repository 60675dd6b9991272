"""The torch models: real weights load strictly, fbank numbers are Kaldi's, embeddings separate speakers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diaropt.data.annotations import load_rttm
from diaropt.models.fbank import FRAME_EXTRACTION_MODES, KaldiFbank, num_fbank_frames
from diaropt.models.loading import CheckpointError, load_into, load_state_dict
from diaropt.models.segmentation import SEGMENTATION_FRAMES, PyanNet


def test_segmentation_real_weights_shapes_and_timing(segmentation_model, dev00_audio):
    chunk = torch.from_numpy(dev00_audio[:160000]).view(1, 1, -1)
    with torch.inference_mode():
        logprobs = segmentation_model(torch.cat([chunk, 0.1 * torch.randn_like(chunk)]))
    assert logprobs.shape == (2, 589, 7)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(2, 589), atol=1e-5)
    assert PyanNet.num_output_frames(160000) == 589
    assert (SEGMENTATION_FRAMES.duration_s, SEGMENTATION_FRAMES.step_s) == (0.0619375, 0.016875)
    # a meeting clip has speech somewhere: not every frame is the "no speaker" class 0
    assert (logprobs[0].argmax(-1) != 0).float().mean() > 0.3


def test_sinc_buffers_are_what_the_architecture_derives(assets):
    derived = PyanNet().state_dict()
    stored, _ = load_state_dict(assets["segmentation_3_0"])
    for key in ("sincnet.conv1d.0.filterbank.window_", "sincnet.conv1d.0.filterbank.n_"):
        torch.testing.assert_close(derived[key], stored[key], atol=1e-6, rtol=0)


def test_wrong_checkpoint_fails_strictly(assets):
    with pytest.raises(CheckpointError, match="does not fit PyanNet"):
        load_into(PyanNet(), assets["campplus"])


def test_pyannote_style_checkpoint_with_pickled_metadata_loads_without_running_code(tmp_path):
    """A user's own checkpoint (as pyannote.audio saves it) loads, metadata classes stay inert."""
    import dataclasses
    import enum
    import sys
    import types

    module = types.ModuleType("pyannote.audio.core.task")
    sys.modules["pyannote.audio.core.task"] = module

    class Problem(enum.Enum):
        MULTI_LABEL = 2

    @dataclasses.dataclass
    class Specifications:
        problem: Problem
        duration: float

    for cls in (Problem, Specifications):
        cls.__module__, cls.__qualname__ = "pyannote.audio.core.task", cls.__name__
        setattr(module, cls.__name__, cls)
    model = PyanNet()
    checkpoint = {"state_dict": model.state_dict(),
                  "pyannote.audio": {"specifications": Specifications(Problem.MULTI_LABEL, 10.0)}}
    path = tmp_path / "pytorch_model.bin"
    torch.save(checkpoint, path)
    del sys.modules["pyannote.audio.core.task"]
    fresh = PyanNet()
    digest = load_into(fresh, path)
    assert len(digest) == 64
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_checkpoint_with_arbitrary_globals_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": np.random.default_rng(0)}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_state_dict(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.bin")


@pytest.mark.parametrize("num_samples", [160000, 48123, 400])
def test_frame_extraction_modes_give_identical_numbers(num_samples):
    waveforms = 0.1 * torch.randn(2, num_samples, generator=torch.Generator().manual_seed(0))
    reference = KaldiFbank(frame_extraction="per_frame")(waveforms)
    assert reference.shape == (2, num_fbank_frames(num_samples), 80)
    for mode, batch_size in [("batched", 1), ("batched", 7), ("batched", 64), ("batched", 5000), ("strided", 64)]:
        other = KaldiFbank(frame_extraction=mode, frame_batch_size=batch_size)(waveforms)
        torch.testing.assert_close(other, reference, atol=1e-5, rtol=0, msg=f"{mode} k={batch_size}")


def test_unknown_frame_extraction_is_refused():
    with pytest.raises(ValueError, match="per_frame"):
        KaldiFbank(frame_extraction="fancy")
    assert FRAME_EXTRACTION_MODES == ("per_frame", "batched", "strided")


def _kaldi_native(samples: np.ndarray, window_type: str) -> np.ndarray:
    knf = pytest.importorskip("kaldi_native_fbank")
    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.window_type = window_type
    options.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, samples.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize("window_type,input_scale", [("povey", 1.0), ("hamming", 32768.0)])
def test_fbank_matches_kaldi_native_fbank(dev00_audio, window_type, input_scale):
    """Max abs log-mel error < 0.01. Float32 rounding in a 400-point DFT gives ~1e-4 (seen: 1e-4);
    a real formula error (window, pre-emphasis, mel edges, DC removal) moves many values by > 0.05."""
    samples = dev00_audio[:64000]
    expected = _kaldi_native(samples * input_scale, window_type)
    fbank = KaldiFbank(window_type=window_type, input_scale=input_scale, subtract_mean=False)
    ours = fbank(torch.from_numpy(samples)[None])[0].numpy()
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 0.01
    # the tolerance is tight enough to catch a wrong window
    wrong = KaldiFbank(window_type="hanning", input_scale=input_scale, subtract_mean=False)
    assert np.abs(wrong(torch.from_numpy(samples)[None])[0].numpy() - expected).max() > 0.05


def test_mean_normalisation_is_per_chunk():
    features = KaldiFbank()(0.1 * torch.randn(3, 32000))
    torch.testing.assert_close(features.mean(dim=1), torch.zeros(3, 80), atol=1e-4, rtol=0)


def _single_speaker_crops(assets, uris, crop_s=2.0):
    """{speaker: [crops (crop_s * 16000,)]} from stretches where exactly one reference speaker talks."""
    import soundfile as sf
    from pyannote.core import Timeline

    references = {}
    for subset in ("train", "development", "test"):
        references |= load_rttm(assets["ami"] / f"debug.{subset}.rttm")
    crops: dict[str, list[np.ndarray]] = {}
    for uri in uris:
        audio, _ = sf.read(assets["ami"] / f"{uri}.wav", dtype="float32")
        reference = references[uri]
        overlap = reference.get_overlap()
        for segment, _, speaker in reference.itertracks(yield_label=True):
            for stretch in Timeline([segment]).extrude(overlap):
                if stretch.duration >= crop_s:
                    start = int(stretch.start * 16000)
                    crops.setdefault(speaker, []).append(audio[start: start + int(crop_s * 16000)])
    return crops


def test_campplus_separates_real_speakers(assets, campplus):
    uris = ["dev00", "dev01", "tst00"] + [f"trn0{i}" for i in range(3, 10)]
    crops = _single_speaker_crops(assets, uris)
    speakers = [s for s, c in crops.items() if len(c) >= 2]
    assert len(speakers) >= 4, {s: len(c) for s, c in crops.items()}
    batch = torch.from_numpy(np.stack([c for s in speakers for c in crops[s][:2]]))
    with torch.inference_mode():
        embeddings = torch.nn.functional.normalize(campplus(batch), dim=-1)
    assert embeddings.shape == (2 * len(speakers), 192)
    similarity = (embeddings @ embeddings.T).numpy()
    labels = np.repeat(np.arange(len(speakers)), 2)
    same = similarity[(labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)]
    different = similarity[labels[:, None] != labels[None, :]]
    # same-speaker pairs beat different-speaker pairs by a clear margin
    assert same.mean() > different.mean() + 0.2, (same, different.mean())
    assert np.median(same) > np.quantile(different, 0.9)


def test_masked_pooling_selects_frames(campplus, dev00_audio):
    """A mask that keeps only the first half equals embedding with weights zero on the second half,
    and differs from the full-chunk embedding."""
    chunk = torch.from_numpy(dev00_audio[:160000])[None]
    half = torch.zeros(1, 589)
    half[:, :294] = 1
    with torch.inference_mode():
        full = campplus(chunk, torch.ones(1, 589))
        unmasked = campplus(chunk)
        masked = campplus(chunk, half)
        empty = campplus(chunk, torch.zeros(1, 589))
    torch.testing.assert_close(full, unmasked, atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(full, masked).item() < 0.99
    assert torch.isnan(empty).all()  # nothing to pool: NaN, never a silent zero vector


def test_wespeaker_resnet34_loads_a_checkpoint_in_pyannote_layout(tmp_path):
    from diaropt.models.embedding import load_embedding_model
    from diaropt.models.resnet import WeSpeakerResNet34

    source = WeSpeakerResNet34()
    state = {k: v for k, v in source.state_dict().items()}
    assert {"resnet.conv1.weight", "resnet.layer4.2.bn2.running_var", "resnet.seg_1.bias"} <= set(state)
    path = tmp_path / "wespeaker.bin"
    torch.save({"state_dict": state}, path)
    model, digest = load_embedding_model("wespeaker_resnet34", checkpoint=path)
    with torch.inference_mode():
        assert model(0.1 * torch.randn(2, 32000), torch.ones(2, 589)).shape == (2, 256)
    assert len(digest) == 64
    with pytest.raises(CheckpointError, match="no pinned weights"):
        load_embedding_model("wespeaker_resnet34")
