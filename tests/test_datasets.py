"""Declared datasets and the synthetic conversation generator (diaropt.data.datasets)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pyannote.core import Annotation, Segment

from diaropt.data import DataError, Dataset, DatasetItem, load_dataset
from diaropt.data.datasets import (
    AMI_DEBUG_URIS,
    AMI_MINI_URIS,
    AMI_SPLIT_URIS,
    DATASET_NAMES,
)
from diaropt.data.synthetic import (
    SYNTHETIC_SPLIT_SPEAKERS,
    make_synthetic_conversation,
    speech_regions,
    synthetic_file_seed,
    trim_silence,
)

SAMPLE_RATE_HZ = 16000


def _tone(
    duration_s: float, frequency_hz: float = 220.0, rate_hz: int = SAMPLE_RATE_HZ
) -> np.ndarray:
    t = np.arange(round(duration_s * rate_hz)) / rate_hz
    return 0.3 * np.sin(2 * np.pi * frequency_hz * t)


def _write_audio(path: Path, duration_s: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _tone(duration_s), SAMPLE_RATE_HZ)
    return path


def _rttm_line(uri: str, start_s: float, duration_s: float, speaker: str) -> str:
    return f"SPEAKER {uri} 1 {start_s:.3f} {duration_s:.3f} <NA> <NA> {speaker} <NA> <NA>\n"


def _turns(annotation: Annotation) -> list[tuple[float, float, str]]:
    return sorted((s.start, s.end, str(l)) for s, _, l in annotation.itertracks(yield_label=True))


# ------------------------------------------------------------------------------ registry, types


def test_load_dataset_rejects_unknown_name_and_options(tmp_path: Path) -> None:
    assert set(DATASET_NAMES) == {
        "ami_mini", "ami_debug_all", "sample", "folder", "synthetic", "protocol",
        "ami_dev", "ami_test", "synthetic_dev", "synthetic_test", "dev", "test",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown dataset 'voxconverse'.*ami_mini"):
        load_dataset("voxconverse")
    with pytest.raises(TypeError, match="'folder': missing a required argument: 'audio_dir'"):
        load_dataset("folder", audio_folder=tmp_path, rttm_dir=tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sample_folder'"):
        load_dataset("sample", sample_folder=tmp_path)


def test_dataset_rejects_duplicate_uris_and_mismatched_reference(tmp_path: Path) -> None:
    reference = Annotation(uri="a")
    item = DatasetItem("a", tmp_path / "a.wav", reference)
    with pytest.raises(DataError, match="duplicate uri 'a'"):
        Dataset("d", [item, DatasetItem("a", tmp_path / "a.flac", reference)])
    with pytest.raises(DataError, match="reference uri 'a' != item uri 'b'"):
        DatasetItem("b", tmp_path / "b.wav", reference)
    dataset = Dataset("d", [item])
    assert len(dataset) == 1 and dataset.uris == ["a"] and dataset["a"] is item


# ------------------------------------------------------------------------------ folder


@pytest.fixture()
def folder(tmp_path: Path) -> dict[str, Path]:
    audio_dir, rttm_dir = tmp_path / "audio", tmp_path / "rttm"
    _write_audio(audio_dir / "a.wav")
    _write_audio(audio_dir / "b.flac")
    (audio_dir / "notes.txt").write_text("not audio: ignored")
    rttm_dir.mkdir()
    (rttm_dir / "a.rttm").write_text(_rttm_line("a", 0.1, 0.5, "S1"))
    (rttm_dir / "b.rttm").write_text(
        _rttm_line("b", 0.2, 0.3, "S2") + _rttm_line("b", 0.4, 0.4, "S3")
    )
    uem = tmp_path / "all.uem"
    uem.write_text("a NA 0.0 1.0\n")
    return {"audio_dir": audio_dir, "rttm_dir": rttm_dir, "uem": uem}


def test_folder_dataset_pairs_audio_references_and_uems(folder: dict[str, Path]) -> None:
    dataset = load_dataset(
        "folder",
        audio_dir=folder["audio_dir"],
        rttm_dir=folder["rttm_dir"],
        uem_dir=folder["uem"],
    )
    assert dataset.name == "folder"
    assert dataset.uris == ["a", "b"]
    assert dataset["a"].audio_path == folder["audio_dir"] / "a.wav"
    assert dataset["b"].audio_path == folder["audio_dir"] / "b.flac"
    assert _turns(dataset["b"].reference) == pytest.approx([(0.2, 0.5, "S2"), (0.4, 0.8, "S3")])
    assert list(dataset["a"].uem) == [Segment(0.0, 1.0)]
    assert dataset["b"].uem is None


def test_folder_dataset_accepts_a_single_rttm_file(folder: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "all.rttm"
    single.write_text(_rttm_line("a", 0.0, 1.0, "S1") + _rttm_line("b", 0.0, 1.0, "S2"))
    dataset = load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=single)
    assert [item.reference.labels() for item in dataset] == [["S1"], ["S2"]]


def test_folder_audio_without_reference_names_both(folder: dict[str, Path]) -> None:
    (folder["rttm_dir"] / "b.rttm").unlink()
    with pytest.raises(DataError) as error:
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])
    message = str(error.value)
    assert str(folder["audio_dir"] / "b.flac") in message
    assert str(folder["rttm_dir"]) in message and "no reference for uri 'b'" in message


def test_folder_reference_without_audio_names_both(folder: dict[str, Path]) -> None:
    (folder["rttm_dir"] / "c.rttm").write_text(_rttm_line("c", 0.0, 1.0, "S1"))
    with pytest.raises(DataError) as error:
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])
    message = str(error.value)
    assert str(folder["rttm_dir"] / "c.rttm") in message
    assert "uri 'c' has no audio file" in message and str(folder["audio_dir"]) in message


def test_folder_uem_without_audio_is_an_error(folder: dict[str, Path]) -> None:
    folder["uem"].write_text("a NA 0.0 1.0\nzzz NA 0.0 1.0\n")
    with pytest.raises(DataError, match="UEM uri 'zzz' has no audio file"):
        load_dataset(
            "folder",
            audio_dir=folder["audio_dir"],
            rttm_dir=folder["rttm_dir"],
            uem_dir=folder["uem"],
        )


def test_folder_duplicate_uri_across_extensions(folder: dict[str, Path]) -> None:
    _write_audio(folder["audio_dir"] / "a.ogg")
    with pytest.raises(DataError, match="duplicate uri 'a'.*a.ogg|duplicate uri 'a'.*a.wav"):
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])


def test_folder_uri_defined_in_two_rttm_files(folder: dict[str, Path]) -> None:
    (folder["rttm_dir"] / "extra.rttm").write_text(_rttm_line("a", 0.0, 1.0, "S9"))
    with pytest.raises(DataError, match="uri 'a' is defined in both .*a.rttm and .*extra.rttm"):
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])


def test_folder_empty_reference_only_when_allowed(folder: dict[str, Path]) -> None:
    (folder["rttm_dir"] / "b.rttm").write_text("")
    with pytest.raises(DataError, match="no SPEAKER line"):
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])
    dataset = load_dataset(
        "folder",
        audio_dir=folder["audio_dir"],
        rttm_dir=folder["rttm_dir"],
        allow_empty_references=True,
    )
    assert len(dataset["b"].reference) == 0 and dataset["b"].reference.uri == "b"
    assert len(dataset["a"].reference) == 1


def test_folder_malformed_rttm_is_reported_with_line(folder: dict[str, Path]) -> None:
    bad = folder["rttm_dir"] / "a.rttm"
    bad.write_text(
        _rttm_line("a", 0.0, 1.0, "S1") + "SPEAKER a 1 0.5 -1.0 <NA> <NA> S1 <NA> <NA>\n"
    )
    with pytest.raises(DataError, match=f"{bad}:2: duration must be positive"):
        load_dataset("folder", audio_dir=folder["audio_dir"], rttm_dir=folder["rttm_dir"])


# ------------------------------------------------------------------------------ AMI and sample


@pytest.fixture()
def ami_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ami"
    subset_of = {"dev": "development", "tst": "test", "trn": "train"}
    for uri in AMI_DEBUG_URIS:
        _write_audio(root / f"{uri}.wav", 0.1)
        subset = subset_of[uri[:3]]
        with open(root / f"debug.{subset}.rttm", "a", encoding="utf-8") as rttm:
            rttm.write(_rttm_line(uri, 1.0, 2.0, f"{uri}_spk"))
        with open(root / f"debug.{subset}.uem", "a", encoding="utf-8") as uem:
            uem.write(f"{uri} NA 0.000 30.000\n")
    return root


@pytest.fixture()
def sample_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sample"
    _write_audio(root / "sample.wav", 0.1)
    (root / "sample.rttm").write_text(_rttm_line("sample", 6.69, 0.43, "speaker90"))
    return root


def test_ami_mini_has_ten_clean_clips_and_sample(ami_dir: Path, sample_dir: Path) -> None:
    dataset = load_dataset("ami_mini", ami_dir=ami_dir, sample_dir=sample_dir)
    assert dataset.uris == [*AMI_MINI_URIS, "sample"]
    assert len(dataset) == 11
    assert not {"trn00", "trn01", "trn02", "tst01"} & set(dataset.uris)
    # references come from all three subsets, UEMs are honoured, the sample has none
    assert dataset["tst00"].reference.labels() == ["tst00_spk"]
    assert dataset["trn05"].audio_path == ami_dir / "trn05.wav"
    assert list(dataset["dev01"].uem) == [Segment(0.0, 30.0)]
    assert dataset["sample"].uem is None
    assert _turns(dataset["sample"].reference) == pytest.approx([(6.69, 7.12, "speaker90")])


def test_ami_debug_all_and_sample(ami_dir: Path, sample_dir: Path) -> None:
    assert load_dataset("ami_debug_all", ami_dir=ami_dir).uris == list(AMI_DEBUG_URIS)
    assert load_dataset("sample", sample_dir=sample_dir).uris == ["sample"]


def test_ami_missing_audio_or_reference_is_an_error(ami_dir: Path, sample_dir: Path) -> None:
    (ami_dir / "trn04.wav").unlink()
    with pytest.raises(DataError, match="trn04.wav: audio file of uri 'trn04' not found"):
        load_dataset("ami_mini", ami_dir=ami_dir, sample_dir=sample_dir)
    _write_audio(ami_dir / "trn04.wav", 0.1)
    text = (ami_dir / "debug.train.rttm").read_text().replace("trn04", "trn44")
    (ami_dir / "debug.train.rttm").write_text(text)
    with pytest.raises(DataError, match="no reference for uri 'trn04'"):
        load_dataset("ami_mini", ami_dir=ami_dir, sample_dir=sample_dir)


# ------------------------------------------------------------------------------ pyannote.database


def _write_protocol(tmp_path: Path, name: str, with_reference_for_b: bool = True) -> Path:
    _write_audio(tmp_path / "a.wav")
    _write_audio(tmp_path / "b.wav")
    (tmp_path / "test.lst").write_text("a\nb\n")
    rttm = _rttm_line("a", 0.0, 0.5, "S1")
    if with_reference_for_b:
        rttm += _rttm_line("b", 0.1, 0.5, "S2")
    (tmp_path / "test.rttm").write_text(rttm)
    (tmp_path / "test.uem").write_text("a NA 0.0 1.0\nb NA 0.0 1.0\n")
    yml = tmp_path / "database.yml"
    yml.write_text(
        "Protocols:\n"
        f"  {name}:\n"
        "    SpeakerDiarization:\n"
        "      Tiny:\n"
        "        scope: database\n"
        "        test:\n"
        "          uri: test.lst\n"
        "          annotation: test.rttm\n"
        "          annotated: test.uem\n"
        "Databases:\n"
        f"  {name}: ./{{uri}}.wav\n"
    )
    return yml


def test_protocol_dataset(tmp_path: Path) -> None:
    pytest.importorskip("pyannote.database")
    yml = _write_protocol(tmp_path, "DiaroptTinyOk")
    dataset = load_dataset(
        "protocol",
        protocol="DiaroptTinyOk.SpeakerDiarization.Tiny",
        subset="test",
        database_yml=yml,
    )
    assert dataset.name == "DiaroptTinyOk.SpeakerDiarization.Tiny.test"
    assert dataset.uris == ["a", "b"]
    assert dataset["b"].audio_path == tmp_path / "b.wav"
    assert dataset["b"].reference.labels() == ["S2"]
    assert list(dataset["a"].uem) == [Segment(0.0, 1.0)]


def test_protocol_dataset_with_unreferenced_uri_fails(tmp_path: Path) -> None:
    pytest.importorskip("pyannote.database")
    yml = _write_protocol(tmp_path, "DiaroptTinyBad", with_reference_for_b=False)
    with pytest.raises(DataError, match="uri 'b' has no reference turn"):
        load_dataset(
            "protocol", protocol="DiaroptTinyBad.SpeakerDiarization.Tiny", database_yml=yml
        )


def test_protocol_without_pyannote_database_says_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyannote.database", None)
    with pytest.raises(ImportError, match="pip install pyannote.database"):
        load_dataset("protocol", protocol="X.SpeakerDiarization.Y")


# ------------------------------------------------------------------------------ synthetic

PAD_S = 0.25
BURST_DURATIONS_S = (0.6, 0.8, 1.0, 1.2, 0.7, 0.9)


@pytest.fixture(scope="module")
def speakers(tmp_path_factory) -> Path:
    """Three speaker folders of tone bursts padded with faint noise (one speaker at 22.05 kHz)."""
    root = tmp_path_factory.mktemp("speakers")
    rng = np.random.default_rng(0)
    for index, (name, frequency_hz, rate_hz, extension) in enumerate(
        [
            ("alice", 200.0, 16000, "flac"),
            ("bob", 330.0, 16000, "wav"),
            ("carol", 470.0, 22050, "wav"),
        ]
    ):
        directory = root / name
        directory.mkdir()
        for number, duration_s in enumerate(BURST_DURATIONS_S):
            pad = 1e-5 * rng.standard_normal(round(PAD_S * rate_hz))
            burst = _tone(duration_s, frequency_hz, rate_hz) * (1 + 0.5 * index)
            path = directory / f"{name}-{number}.{extension}"
            sf.write(path, np.concatenate([pad, burst, pad]), rate_hz)
    (root / "not_a_speaker").mkdir()  # no audio: ignored
    return root


def _max_simultaneous(annotation: Annotation) -> int:
    # sweep over boundaries; at equal times ends (-1) come before starts (+1)
    events = sorted(
        [(s.start, 1) for s, _ in annotation.itertracks()]
        + [(s.end, -1) for s, _ in annotation.itertracks()]
    )
    return int(np.max(np.cumsum([delta for _, delta in events])))


def _overlap_ratio(annotation: Annotation) -> float:
    return annotation.get_overlap().duration() / annotation.get_timeline().support().duration()


def test_trim_silence_finds_the_burst() -> None:
    pad, burst = np.zeros(4000), _tone(0.5)
    start, end = trim_silence(np.concatenate([pad, burst, pad]), SAMPLE_RATE_HZ)
    assert start == 4000 and end == 4000 + 8000
    with pytest.raises(DataError, match="silent"):
        trim_silence(np.zeros(1600), SAMPLE_RATE_HZ)


def test_synthetic_is_reproducible(speakers: Path) -> None:
    first = make_synthetic_conversation(speakers, 20.0, 2, 0.2, seed=7)
    second = make_synthetic_conversation(speakers, 20.0, 2, 0.2, seed=7)
    other = make_synthetic_conversation(speakers, 20.0, 2, 0.2, seed=8)
    assert first[0].dtype == np.float32 and first[0].shape == (20 * SAMPLE_RATE_HZ,)
    assert np.array_equal(first[0], second[0])
    assert _turns(first[1]) == _turns(second[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("target", [0.0, 0.1, 0.25])
def test_synthetic_overlap_ratio_close_to_target(speakers: Path, target: float) -> None:
    waveform, reference = make_synthetic_conversation(speakers, 90.0, 3, target, seed=3)
    assert abs(_overlap_ratio(reference) - target) < 0.01
    assert sorted(reference.labels()) == ["alice", "bob", "carol"]
    # turns alternate speakers, at most two talk at once, and the conversation fills the duration
    turns = _turns(reference)
    assert all(previous[2] != current[2] for previous, current in zip(turns, turns[1:]))
    assert _max_simultaneous(reference) == (1 if target == 0.0 else 2)
    assert reference.get_timeline().extent().end > 80.0
    assert np.abs(waveform).max() <= 0.95 + 1e-6


def test_synthetic_reference_matches_placed_energy(speakers: Path) -> None:
    waveform, reference = make_synthetic_conversation(speakers, 30.0, 3, 0.15, seed=11)
    frame = SAMPLE_RATE_HZ // 100  # 10 ms
    num_frames = len(waveform) // frame
    rms = np.sqrt(np.mean(waveform[: num_frames * frame].reshape(num_frames, frame) ** 2, axis=1))
    speech = reference.get_timeline().support()
    inside = np.zeros(num_frames, bool)
    touching = np.zeros(num_frames, bool)
    for segment in speech:
        first, last = segment.start * 100, segment.end * 100
        inside[int(np.ceil(first)) : int(np.floor(last))] = True
        touching[int(np.floor(first)) : int(np.ceil(last))] = True
    assert inside.any() and (~touching).any()
    assert np.all(rms[~touching] == 0.0)  # no audio outside the reference
    assert np.all(rms[inside] > 0.01)  # and audible audio wherever it says speech
    # trimming removed the padding: every turn lasts as long as one of the bursts (10 ms frames)
    for segment, _ in reference.itertracks():
        assert min(abs(segment.duration - d) for d in BURST_DURATIONS_S) <= 0.011


def test_synthetic_rejects_bad_parameters(speakers: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="num_speakers=4 but only 3"):
        make_synthetic_conversation(speakers, 10.0, 4, 0.1, seed=0)
    with pytest.raises(ValueError, match="overlap_ratio"):
        make_synthetic_conversation(speakers, 10.0, 2, 0.9, seed=0)
    with pytest.raises(ValueError, match="cannot overlap with itself"):
        make_synthetic_conversation(speakers, 10.0, 1, 0.1, seed=0)
    with pytest.raises(DataError, match="fits in 0.5 s"):
        make_synthetic_conversation(speakers, 0.5, 2, 0.0, seed=0)
    silent = tmp_path / "silent"
    silent.mkdir()
    sf.write(silent / "quiet.wav", np.zeros(8000), SAMPLE_RATE_HZ)
    with pytest.raises(DataError, match="quiet.wav: utterance is silent"):
        make_synthetic_conversation([silent], 10.0, 1, 0.0, seed=0)


def test_synthetic_speaker_dirs_as_list(speakers: Path) -> None:
    speaker_dirs = [speakers / "bob", speakers / "carol"]
    _, reference = make_synthetic_conversation(speaker_dirs, 10.0, 2, 0.0, seed=1)
    assert sorted(reference.labels()) == ["bob", "carol"]
    assert reference.get_overlap().duration() == 0.0


def test_synthetic_dataset_is_cached_by_parameters(speakers: Path, tmp_path: Path) -> None:
    options = dict(
        source_dir=speakers, num_files=2, duration_s=15.0, num_speakers=2,
        overlap_ratio=0.2, seed=5, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    dataset = load_dataset("synthetic", **options)
    assert dataset.name == "synthetic" and len(dataset) == 2
    item = dataset.items[0]
    waveform, rate_hz = sf.read(item.audio_path)
    assert rate_hz == SAMPLE_RATE_HZ and len(waveform) == 15 * SAMPLE_RATE_HZ
    assert item.audio_path.with_suffix(".rttm").is_file()
    assert list(item.uem) == [Segment(0.0, 15.0)]
    assert item.reference.uri == item.uri and len(item.reference.labels()) == 2
    # the cached files are the generated conversation (PCM 16 and millisecond rounding aside)
    generated, reference = make_synthetic_conversation(
        speakers, 15.0, 2, 0.2, seed=synthetic_file_seed(5, 0)
    )
    assert np.max(np.abs(waveform - generated)) <= 1.0 / 32768 + 1e-6
    written = _turns(item.reference)
    assert [label for *_, label in written] == [label for *_, label in _turns(reference)]
    assert [t for s, e, _ in written for t in (s, e)] == pytest.approx(
        [t for s, e, _ in _turns(reference) for t in (s, e)], abs=0.0005 + 1e-9
    )

    mtime = item.audio_path.stat().st_mtime_ns
    again = load_dataset("synthetic", **options)
    assert again.uris == dataset.uris and item.audio_path.stat().st_mtime_ns == mtime
    changed = load_dataset("synthetic", **{**options, "seed": 6})
    assert set(changed.uris).isdisjoint(dataset.uris)
    assert changed.items[0].audio_path.parent != item.audio_path.parent
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # no temp left


# ------------------------------------------------------------------------------ dev / test splits


def test_speech_regions_leave_out_pauses_and_bridge_closures() -> None:
    silence = lambda s: np.zeros(round(s * SAMPLE_RATE_HZ))  # noqa: E731
    # 0.3 s lead, 0.5 s tone, 0.1 s gap (a closure: bridged), 0.4 s tone, 0.6 s pause, 0.3 s tone, tail
    parts = [silence(0.3), _tone(0.5), silence(0.1), _tone(0.4), silence(0.6), _tone(0.3), silence(0.2)]
    regions = speech_regions(np.concatenate(parts), SAMPLE_RATE_HZ)
    seconds = [(round(s / SAMPLE_RATE_HZ, 2), round(e / SAMPLE_RATE_HZ, 2)) for s, e in regions]
    assert seconds == [(0.3, 1.3), (1.9, 2.2)]
    assert trim_silence(np.concatenate(parts), SAMPLE_RATE_HZ) == (regions[0][0], regions[-1][1])


def test_synthetic_reference_leaves_out_pauses(tmp_path: Path) -> None:
    """An utterance with a 0.8 s pause inside is labelled as two regions, not one span."""
    for name, frequency_hz in (("ann", 200.0), ("ben", 350.0)):
        (tmp_path / name).mkdir()
        pause = np.zeros(round(0.8 * SAMPLE_RATE_HZ))
        sf.write(tmp_path / name / "u0.wav", np.concatenate([_tone(1.0, frequency_hz), pause, _tone(1.0, frequency_hz)]),
                 SAMPLE_RATE_HZ)
    waveform, reference = make_synthetic_conversation(tmp_path, 30.0, 2, 0.0, seed=0)
    durations = sorted({round(segment.duration, 2) for segment, _ in reference.itertracks()})
    assert durations == [1.0]  # every labelled region is one tone, never tone + pause + tone
    # gains spread over 10 dB: the two voices' RMS differ by ~10 dB (± the 1 dB utterance jitter)
    levels = {}
    for label in reference.labels():
        segment = next(iter(reference.label_timeline(label)))
        piece = waveform[round(segment.start * SAMPLE_RATE_HZ) + 160: round(segment.end * SAMPLE_RATE_HZ) - 160]
        levels[label] = 20 * np.log10(np.sqrt(np.mean(piece.astype(np.float64) ** 2)))
    assert abs(abs(levels["ann"] - levels["ben"]) - 10.0) <= 2.0 + 1e-6


def _fake_librispeech(root: Path) -> Path:
    """One folder per split reader with two tone utterances each (different pitch per reader)."""
    readers = [name for names in SYNTHETIC_SPLIT_SPEAKERS.values() for name in names]
    for index, name in enumerate(readers):
        (root / name).mkdir(parents=True)
        for u in range(2):
            sf.write(root / name / f"{name}-{u}.flac", _tone(4.0 + u, 120.0 + 40.0 * index), SAMPLE_RATE_HZ)
    return root


def test_synthetic_splits_use_disjoint_readers_and_are_cached(tmp_path: Path) -> None:
    source = _fake_librispeech(tmp_path / "libri")
    cache = tmp_path / "cache"
    dev = load_dataset("synthetic_dev", source_dir=source, cache_dir=cache)
    test = load_dataset("synthetic_test", source_dir=source, cache_dir=cache)
    assert dev.name == "synthetic_dev" and len(dev) == len(test) == 8
    dev_voices = {label for item in dev for label in item.reference.labels()}
    test_voices = {label for item in test for label in item.reference.labels()}
    assert dev_voices == set(SYNTHETIC_SPLIT_SPEAKERS["dev"]) and not dev_voices & test_voices
    for item in (*dev, *test):
        duration_s = item.uem.extent().duration
        assert 120.0 <= duration_s <= 300.0
        assert len(item.reference.labels()) == int(item.uri.split("_")[1][0]) in (2, 3, 4, 5)
        speech = item.reference.get_timeline().support().duration()
        assert 0.03 <= item.reference.get_overlap().duration() / speech <= 0.2
    # written once: a second load reuses the files (same paths, untouched)
    mtimes = [item.audio_path.stat().st_mtime_ns for item in dev]
    again = load_dataset("synthetic_dev", source_dir=source, cache_dir=cache)
    assert [item.audio_path.stat().st_mtime_ns for item in again] == mtimes
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(DataError, match="not found"):
        load_dataset("synthetic_dev", source_dir=tmp_path / "missing", cache_dir=cache)


def test_ami_split_shares_no_speaker() -> None:
    assert set(AMI_SPLIT_URIS["dev"]).isdisjoint(AMI_SPLIT_URIS["test"])
    assert set(AMI_SPLIT_URIS["dev"]) | set(AMI_SPLIT_URIS["test"]) == {*AMI_MINI_URIS, "sample"}
    try:
        dev, test = load_dataset("ami_dev"), load_dataset("ami_test")
    except Exception as error:  # the pinned AMI asset may not be fetchable here
        pytest.skip(f"AMI asset unavailable: {error}")
    dev_speakers = {label for item in dev for label in item.reference.labels()}
    test_speakers = {label for item in test for label in item.reference.labels()}
    assert dev_speakers and test_speakers and not dev_speakers & test_speakers
