"""Long-form recordings concatenated from the pinned AMI clips (diaropt.data.long_form)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from pyannote.core import Annotation, Segment

from diaropt.data.long_form import AMI_LONG_FORM_URIS, load_ami_long_form, make_long_form, overlap_fraction
from diaropt.data.datasets import load_ami_debug_all


def test_ami_long_form_shifts_references_and_uems_exactly(assets, tmp_path: Path) -> None:
    assert "trn01" not in AMI_LONG_FORM_URIS and "tst01" not in AMI_LONG_FORM_URIS
    uris = ("dev00", "dev01", "tst00")
    dataset, layout = load_ami_long_form(75.0, tmp_path, uris=uris, seed=0)
    (item,) = dataset.items
    clips = load_ami_debug_all()
    clip_samples = sf.info(str(clips["dev00"].audio_path)).frames
    assert [c for c, _ in layout.placements] == ["dev00", "dev01", "tst00"]
    assert [o for _, o in layout.placements] == [0, clip_samples, 2 * clip_samples]

    audio, rate_hz = sf.read(str(item.audio_path), dtype="float32")
    assert rate_hz == 16000 and len(audio) == 75 * 16000
    dev01, _ = sf.read(str(clips["dev01"].audio_path), dtype="float32")
    np.testing.assert_array_equal(audio[clip_samples: 2 * clip_samples], dev01)

    # dev00 and dev01 share speakers (global AMI ids): one label each in the long form
    assert set(item.reference.labels()) == set(clips["dev00"].reference.labels()) | set(
        clips["dev01"].reference.labels()) | set(clips["tst00"].reference.labels())
    shift_s = clip_samples / 16000
    expected = clips["dev01"].reference.crop(Segment(0, 30)).get_timeline().support()
    got = item.reference.crop(Segment(shift_s, 2 * shift_s)).get_timeline().support()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert abs(a.start - b.start - shift_s) < 1e-6 and abs(a.end - b.end - shift_s) < 1e-6
    assert item.reference.get_timeline().extent().end <= 75.0  # cut at the target
    assert abs(item.uem.duration() - 75.0) < 1e-3 and item.uem.extent().end == 75.0

    again, _ = load_ami_long_form(75.0, tmp_path, uris=uris, seed=0)  # cached, identical
    assert again.items[0].audio_path == item.audio_path


def test_long_form_cycles_are_seeded_permutations(assets) -> None:
    clips = load_ami_debug_all()
    items = [clips[uri] for uri in ("dev00", "dev01", "tst00")]
    a = make_long_form(items, 200.0, "x", seed=1)
    b = make_long_form(items, 200.0, "x", seed=1)
    assert a.placements == b.placements and len(a.placements) == 7
    for cycle in range(2):
        assert sorted(c for c, _ in a.placements[3 * cycle: 3 * cycle + 3]) == ["dev00", "dev01", "tst00"]


def test_overlap_fraction() -> None:
    reference = Annotation()
    reference[Segment(0, 4)] = "a"
    reference[Segment(3, 6)] = "b"
    assert abs(overlap_fraction(reference) - 1 / 6) < 1e-9
