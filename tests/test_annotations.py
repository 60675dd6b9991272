"""RTTM / UEM / LST reading and writing (diaropt.data.annotations)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyannote.core import Annotation, Segment

from diaropt.data.annotations import (
    DataError,
    get_reference,
    load_lst,
    load_rttm,
    load_uem,
    write_rttm,
)

RTTM_TEXT = """\
;; comment line
SPEAKER trn00 1 3.168 0.800 <NA> <NA> MÉO069 <NA> <NA>
SPEAKER trn00 1 5.463 0.640 <NA> <NA> MÉO069 <NA> <NA>

SPKR-INFO trn00 1 <NA> <NA> <NA> unknown MEE068 <NA> <NA>
SPEAKER trn00 1 5.496 0.574 <NA> <NA> MEE068 <NA> <NA>
SPEAKER dev00 1 1.440 11.872 <NA> <NA> MEE009 <NA>
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _turns(annotation: Annotation) -> list[tuple[float, float, str]]:
    return sorted(
        (segment.start, segment.end, str(label))
        for segment, _, label in annotation.itertracks(yield_label=True)
    )


def test_load_rttm_groups_turns_by_uri(tmp_path: Path) -> None:
    annotations = load_rttm(_write(tmp_path, "ref.rttm", RTTM_TEXT))

    assert sorted(annotations) == ["dev00", "trn00"]
    trn00 = annotations["trn00"]
    assert trn00.uri == "trn00"
    assert _turns(trn00) == pytest.approx(
        [(3.168, 3.968, "MÉO069"), (5.463, 6.103, "MÉO069"), (5.496, 6.070, "MEE068")]
    )
    assert set(trn00.labels()) == {"MÉO069", "MEE068"}
    # the 9-field line (last <NA> dropped) is accepted
    assert _turns(annotations["dev00"]) == pytest.approx([(1.44, 13.312, "MEE009")])


def test_load_rttm_keeps_repeated_turns_as_separate_tracks(tmp_path: Path) -> None:
    line = "SPEAKER f 1 1.000 2.000 <NA> <NA> A <NA> <NA>\n"
    annotation = load_rttm(_write(tmp_path, "r.rttm", line * 2))["f"]
    assert len(list(annotation.itertracks())) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("SPEAKER f 1 1.0 2.0 <NA> <NA> A", "expected 10 fields"),
        ("SPEAKER f 1 1.0 2.0 <NA> <NA> A <NA> <NA> extra", "expected 10 fields"),
        ("SPEAKER f 1 one 2.0 <NA> <NA> A <NA> <NA>", "start 'one' is not a number"),
        ("SPEAKER f 1 1.0 2,5 <NA> <NA> A <NA> <NA>", "duration '2,5' is not a number"),
        ("SPEAKER f 1 1.0 nan <NA> <NA> A <NA> <NA>", "not finite"),
        ("SPEAKER f 1 1.0 -0.5 <NA> <NA> A <NA> <NA>", "duration must be positive"),
        ("SPEAKER f 1 1.0 0.000 <NA> <NA> A <NA> <NA>", "duration must be positive"),
        ("SPEAKER f 1 -1.0 2.0 <NA> <NA> A <NA> <NA>", "negative start"),
        ("SPEEKER f 1 1.0 2.0 <NA> <NA> A <NA> <NA>", "unknown RTTM line type"),
    ],
)
def test_load_rttm_rejects_malformed_line_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    good = "SPEAKER f 1 0.0 1.0 <NA> <NA> A <NA> <NA>\n"
    path = _write(tmp_path, "bad.rttm", good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_rttm(path)
    assert f"{path}:3:" in str(error.value)


def test_empty_rttm_is_valid_only_when_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "empty.rttm", ";; no speech in this file\n")
    with pytest.raises(DataError, match="no SPEAKER line") as error:
        load_rttm(path)
    assert str(path) in str(error.value)

    annotations = load_rttm(path, allow_empty=True)
    assert annotations == {}
    with pytest.raises(DataError, match="no reference for uri 'silence'"):
        get_reference(annotations, "silence", source=path)
    empty = get_reference(annotations, "silence", source=path, allow_empty=True)
    assert empty.uri == "silence" and len(empty) == 0


def test_load_rttm_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_rttm(tmp_path / "absent.rttm")


def test_load_uem_merges_regions_per_uri(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.uem", "dev00 NA 0.000 30.000\nf 1 10.0 20.0\nf 1 0.0 5.0\n")
    uems = load_uem(path)
    assert uems["dev00"].uri == "dev00"
    assert list(uems["dev00"]) == [Segment(0.0, 30.0)]
    assert list(uems["f"]) == [Segment(0.0, 5.0), Segment(10.0, 20.0)]
    assert uems["f"].duration() == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("f NA 0.0", "expected 4 fields"),
        ("f NA zero 10.0", "start 'zero' is not a number"),
        ("f NA 5.0 5.0", "must be greater than start"),
        ("f NA 5.0 2.0", "must be greater than start"),
        ("f NA -1.0 2.0", "negative start"),
        ("f NA 0.5 3.0", "overlaps region"),
    ],
)
def test_load_uem_rejects_malformed_line_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = _write(tmp_path, "bad.uem", "f NA 0.0 1.0\n" + line + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_uem(path)
    assert f"{path}:2:" in str(error.value)


def test_load_uem_rejects_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no UEM region"):
        load_uem(_write(tmp_path, "empty.uem", ""))


def test_load_lst_rejects_duplicates_and_extra_fields(tmp_path: Path) -> None:
    assert load_lst(_write(tmp_path, "ok.lst", "b\na\n\nc\n")) == ["b", "a", "c"]

    path = _write(tmp_path, "dup.lst", "a\nb\na\n")
    with pytest.raises(DataError, match="duplicate uri 'a' \\(first on line 1\\)") as error:
        load_lst(path)
    assert f"{path}:3:" in str(error.value)

    with pytest.raises(DataError, match="expected one uri"):
        load_lst(_write(tmp_path, "two.lst", "a b\n"))


def test_write_rttm_format_and_rounding(tmp_path: Path) -> None:
    annotation = Annotation(uri="f")
    annotation[Segment(0.0004, 1.2346)] = "A"
    annotation[Segment(2.0, 3.5)] = "B"
    stream = io.StringIO()
    write_rttm(annotation, stream)
    assert stream.getvalue().splitlines() == [
        "SPEAKER f 1 0.000 1.235 <NA> <NA> A <NA> <NA>",
        "SPEAKER f 1 2.000 1.500 <NA> <NA> B <NA> <NA>",
    ]


def test_write_rttm_several_annotations_to_one_file(tmp_path: Path) -> None:
    first, second = Annotation(uri="a"), Annotation(uri="b")
    first[Segment(0, 1)] = "S1"
    second[Segment(1, 2)] = "S2"
    path = tmp_path / "both.rttm"
    write_rttm([first, second], path)
    loaded = load_rttm(path)
    assert _turns(loaded["a"]) == [(0.0, 1.0, "S1")]
    assert _turns(loaded["b"]) == [(1.0, 2.0, "S2")]


def test_write_rttm_rejects_bad_uri_and_labels(tmp_path: Path) -> None:
    annotation = Annotation()
    annotation[Segment(0, 1)] = "A"
    with pytest.raises(DataError, match="no uri"):
        write_rttm(annotation, tmp_path / "x.rttm")
    annotation.uri = "f"
    annotation[Segment(2, 3)] = "two words"
    with pytest.raises(DataError, match="whitespace"):
        write_rttm(annotation, tmp_path / "x.rttm")


def test_write_rttm_skips_sub_millisecond_segments_with_warning(tmp_path: Path) -> None:
    annotation = Annotation(uri="f")
    annotation[Segment(1.0, 1.0002)] = "A"
    annotation[Segment(2.0, 3.0)] = "B"
    path = tmp_path / "x.rttm"
    with pytest.warns(UserWarning, match="skipped 1 segment"):
        write_rttm(annotation, path)
    assert _turns(load_rttm(path)["f"]) == [(2.0, 3.0, "B")]


_labels = st.text(alphabet="ABCÉabc_-0123456789", min_size=1, max_size=8)
_turn = st.tuples(
    st.floats(min_value=0.0, max_value=3600.0, allow_nan=False),
    st.floats(min_value=0.002, max_value=60.0, allow_nan=False),
    _labels,
)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(_turn, min_size=1, max_size=20))
def test_rttm_round_trip_up_to_millisecond(tmp_path_factory, turns) -> None:
    annotation = Annotation(uri="round_trip")
    for track, (start_s, duration_s, label) in enumerate(turns):
        annotation[Segment(start_s, start_s + duration_s), track] = label
    path = tmp_path_factory.mktemp("rt") / "x.rttm"

    write_rttm(annotation, path)
    loaded = load_rttm(path)

    assert list(loaded) == ["round_trip"]
    expected = sorted(
        (round(start * 1000) / 1000, round(end * 1000) / 1000, label)
        for start, end, label in _turns(annotation)
    )
    actual = _turns(loaded["round_trip"])
    assert [label for *_, label in actual] == [label for *_, label in expected]
    assert [t for start, end, _ in actual for t in (start, end)] == pytest.approx(
        [t for start, end, _ in expected for t in (start, end)], abs=1e-9
    )


# --- property-based: any text either parses into valid turns/regions or fails naming file and line

_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 100).map(str),
    st.sampled_from(["", "NaN", "inf", "1e400", "1,5", "0x10", "one", "-0", "0.000"]),
)
_token = st.one_of(_number, st.text(alphabet="abcAB_-<>ñ", min_size=1, max_size=5),
                   st.sampled_from(["SPEAKER", "SPKR-INFO", "<NA>", ";;", "#"]))
_rttm_line = st.one_of(
    st.builds(lambda uri, start, duration, speaker: f"SPEAKER {uri} 1 {start} {duration} <NA> <NA> {speaker} <NA> <NA>",
              st.sampled_from(["a", "b"]), _number, _number, st.sampled_from(["S1", "S2"])),
    st.lists(_token, min_size=0, max_size=12).map(" ".join),
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_rttm_line, max_size=8))
def test_rttm_parser_property_valid_turns_or_a_located_error(tmp_path_factory, lines) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.rttm"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        annotations = load_rttm(path, allow_empty=True)
    except DataError as error:
        assert str(error).startswith(f"{path}:")
        return
    speaker_lines = [line for line in lines if line.split()[:1] == ["SPEAKER"]]
    assert sum(len(list(a.itertracks())) for a in annotations.values()) == len(speaker_lines)
    for uri, annotation in annotations.items():
        assert annotation.uri == uri
        for segment in annotation.get_timeline():
            assert 0 <= segment.start < segment.end < float("inf")


_uem_line = st.one_of(
    st.builds(lambda uri, start, end: f"{uri} NA {start} {end}", st.sampled_from(["a", "b"]), _number, _number),
    st.lists(_token, min_size=0, max_size=6).map(" ".join),
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_uem_line, max_size=8))
def test_uem_parser_property_disjoint_regions_or_a_located_error(tmp_path_factory, lines) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.uem"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        uems = load_uem(path)
    except DataError as error:
        assert str(error).startswith(f"{path}")
        return
    for uri, timeline in uems.items():
        segments = list(timeline)
        assert timeline.uri == uri and segments
        assert all(0 <= s.start < s.end < float("inf") for s in segments)
        assert all(a.end <= b.start for a, b in zip(segments, segments[1:]))


def test_binary_or_non_utf8_reference_is_a_located_error(tmp_path: Path) -> None:
    path = tmp_path / "ref.rttm"
    path.write_bytes(b"SPEAKER a 1 0 1 <NA> <NA> S\xff <NA> <NA>\n\x00\x01")
    with pytest.raises(DataError, match="not valid UTF-8") as error:
        load_rttm(path)
    assert str(path) in str(error.value)
