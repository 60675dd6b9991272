"""Stage contracts of the pipeline and the diarize CLI, on real models and small inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from diaropt.backends.base import TensorSpec
from diaropt.backends.torch import TorchModel
from diaropt.pipeline.audio import AudioError, chunk_starts, load_audio, make_chunks
from diaropt.pipeline.embedding import embed
from diaropt.pipeline.segmentation import run_batched, segment


def test_resampling_downmix_and_sample_formats(tmp_path):
    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 1 s at 48 kHz
    stereo = np.stack([tone, -tone + 0.2], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 48000, subtype="PCM_24")
    audio = load_audio(tmp_path / "stereo.wav")
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    np.testing.assert_allclose(audio[1000:15000], 0.1, atol=2e-3)  # (tone + (-tone + 0.2)) / 2
    six = np.tile(tone[:8000, None], (1, 6))
    sf.write(tmp_path / "six.flac", six, 8000)
    assert load_audio(tmp_path / "six.flac").shape == (16000,)
    sf.write(tmp_path / "int16.wav", (tone * 32767).astype(np.int16), 48000, subtype="PCM_16")
    assert np.abs(load_audio(tmp_path / "int16.wav")).max() == pytest.approx(0.5, abs=0.01)


def test_bad_audio_names_the_file(tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(AudioError, match="text.wav.*not a readable audio file"):
        load_audio(tmp_path / "text.wav")
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="missing.wav: no such audio file"):
        load_audio(tmp_path / "missing.wav")


def test_chunks_cover_the_file_and_pad_short_ones():
    starts = chunk_starts(35 * 16000, 160000, 16000)
    assert starts[0] == 0 and starts[-1] == 35 * 16000 - 160000  # last chunk aligned to the end
    assert np.all(np.diff(starts) <= 16000)
    short = np.ones(8000, dtype=np.float32)
    (chunk,) = make_chunks(short, chunk_starts(8000, 160000, 16000), 160000)
    assert chunk.shape == (160000,) and chunk[:8000].sum() == 8000 and chunk[8000:].sum() == 0


class _CountingModel:
    """A fixed-batch model (as Core ML is) that records the batch sizes it receives."""

    def __init__(self, batch_size: int) -> None:
        self.inputs = [TensorSpec("waveforms", (batch_size, 160000)), TensorSpec("masks", (batch_size, 589))]
        self.outputs = [TensorSpec("embeddings", (batch_size, 4))]
        self.batches: list[int] = []

    def __call__(self, waveforms, masks):
        self.batches.append(waveforms.shape[0])
        assert waveforms.shape[0] == self.inputs[0].shape[0]
        return {"embeddings": np.stack([waveforms.mean(1), masks.sum(1), waveforms[:, 0], masks[:, 0]], 1)}

    def sync(self) -> None:
        pass


def test_embedding_skips_inactive_speakers_and_pads_fixed_batches():
    audio = np.arange(200000, dtype=np.float32)
    starts = np.array([0, 16000, 32000])
    masks = np.zeros((3, 589, 3), np.float32)
    masks[0, :100, 0] = masks[1, :200, 2] = masks[2, :300, 1] = 1
    active = masks.sum(1) > 0  # 3 of 9 local speakers
    model = _CountingModel(batch_size=2)
    embeddings = embed(model, audio, starts, 160000, masks, active, batch_size=2, dimension=4)
    assert embeddings.shape == (3, 3, 4)
    assert np.isnan(embeddings[~active]).all() and not np.isnan(embeddings[active]).any()
    assert model.batches == [2, 2]  # the last batch of one was padded to the fixed size
    assert embeddings[1, 2, 1] == 200 and embeddings[2, 1, 1] == 300  # each pair got its own mask
    assert embeddings[1, 2, 2] == 16000  # ... and its own chunk


def test_run_batched_refuses_oversized_batches():
    with pytest.raises(ValueError, match="fixed batch size 2"):
        run_batched(_CountingModel(2), {"waveforms": np.zeros((3, 160000)), "masks": np.zeros((3, 589))},
                    "embeddings")


def test_segmentation_stage_shapes(segmentation_model, dev00_audio):
    model = TorchModel(segmentation_model, [TensorSpec("waveforms", (-1, 1, 160000))],
                       [TensorSpec("logprobs", (-1, 589, 7))])
    starts = chunk_starts(dev00_audio.shape[0], 160000, 80000)
    logprobs = segment(model, dev00_audio, starts, 160000, batch_size=2)
    assert logprobs.shape == (len(starts), 589, 7) and logprobs.dtype == np.float32
    np.testing.assert_allclose(np.exp(logprobs).sum(-1), 1, atol=1e-4)


def test_diarize_cli_writes_rttms_and_reports_timings(tmp_path, assets):
    audio = tmp_path / "short.wav"
    samples, rate = sf.read(assets["ami"] / "dev00.wav", dtype="float32")
    sf.write(audio, samples[: 15 * rate], rate)
    result = subprocess.run([sys.executable, "-m", "diaropt", "diarize", str(audio), "--out", str(tmp_path / "out"),
                             "--no-progress", "segmentation.step_s=2.5"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rttm = (tmp_path / "out" / "short.rttm").read_text().splitlines()
    assert rttm and all(line.startswith("SPEAKER short 1 ") for line in rttm)
    assert '"time_embedding_s"' in result.stdout and '"rtfx"' in result.stdout
    summary = json.loads(result.stdout)  # says which models produced the RTTM
    assert summary["quant"] == "fp32" and {"segmentation", "embedding"} <= set(summary["models"])
    assert all(len(model["content_key"]) == 24 for model in summary["models"].values())


def test_diarize_cli_files_bar_honours_tqdm_disable(tmp_path, assets):
    """The README's switches turn the ``files`` bar off too (tqdm ignores TQDM_DISABLE for an explicit
    ``disable=``): with a terminal-less stderr nothing of the bar may appear."""
    audio = tmp_path / "short.wav"
    samples, rate = sf.read(assets["ami"] / "dev00.wav", dtype="float32")
    sf.write(audio, samples[: 12 * rate], rate)
    for variable, value in (("TQDM_DISABLE", "1"), ("DIAROPT_PROGRESS", "0")):
        env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "DIAROPT_PROGRESS")}
        env[variable] = value
        result = subprocess.run([sys.executable, "-m", "diaropt", "diarize", str(audio), "--out", str(tmp_path / "o"),
                                 "segmentation.step_s=2.5"], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "files:" not in result.stderr and "it/s" not in result.stderr, (variable, result.stderr[-500:])


def test_diarize_cli_rejects_bad_overrides(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diaropt", "diarize", "x.wav", "--out", str(tmp_path),
                             "quant=int9"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "quant/int9" in result.stderr
