"""DER / JER scoring (diaropt.metrics) against hand-computed values."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
from pyannote.core import Annotation, Segment, Timeline

from diaropt.data.annotations import DataError
from diaropt.metrics import (
    CONVENTIONS,
    DiarizationScorer,
    MissingReferenceError,
    score_dataset,
)


def _annotation(uri: str, *turns: tuple[float, float, str]) -> Annotation:
    annotation = Annotation(uri=uri)
    for start_s, end_s, label in turns:
        annotation[Segment(start_s, end_s)] = label
    return annotation


# reference A[0,10] B[10,20]; hypothesis (labels unrelated to the reference's):
#   x[1,10]   -> 1 s missed at [0,1]
#   y[10,14]  -> correct (y = B)
#   x[14,20]  -> 6 s confusion (x = A, reference B)
#   y[20,22]  -> 2 s false alarm
REFERENCE = _annotation("f", (0, 10, "A"), (10, 20, "B"))
HYPOTHESIS = _annotation("f", (1, 10, "x"), (10, 14, "y"), (14, 20, "x"), (20, 22, "y"))


def test_conventions_are_the_documented_ones() -> None:
    assert CONVENTIONS["pyannote"].collar_s == 0.0
    assert CONVENTIONS["pyannote"].skip_overlap is False
    assert CONVENTIONS["fluidaudio"].collar_s == 0.25
    assert CONVENTIONS["fluidaudio"].skip_overlap is True


def test_hand_computed_der_both_conventions() -> None:
    row = DiarizationScorer().add("f", REFERENCE, HYPOTHESIS)

    assert row["uri"] == "f"
    # pyannote: no collar -> 1 + 2 + 6 = 9 s of error over 20 s
    assert row["reference_speech_s_pyannote"] == pytest.approx(20.0)
    assert row["missed_s_pyannote"] == pytest.approx(1.0)
    assert row["false_alarm_s_pyannote"] == pytest.approx(2.0)
    assert row["confusion_s_pyannote"] == pytest.approx(6.0)
    assert row["missed_pyannote"] == pytest.approx(0.05)
    assert row["false_alarm_pyannote"] == pytest.approx(0.10)
    assert row["confusion_pyannote"] == pytest.approx(0.30)
    assert row["der_pyannote"] == pytest.approx(0.45)

    # fluidaudio: collar 0.25 s total = ±0.125 s around reference boundaries 0, 10 and 20
    # removes 0.125 + 0.25 + 0.125 = 0.5 s of reference speech and 0.125 s of each error
    assert row["reference_speech_s_fluidaudio"] == pytest.approx(19.5)
    assert row["missed_s_fluidaudio"] == pytest.approx(0.875)
    assert row["false_alarm_s_fluidaudio"] == pytest.approx(1.875)
    assert row["confusion_s_fluidaudio"] == pytest.approx(5.875)
    assert row["der_fluidaudio"] == pytest.approx(8.625 / 19.5)
    assert row["missed_fluidaudio"] + row["false_alarm_fluidaudio"] + row[
        "confusion_fluidaudio"
    ] == pytest.approx(row["der_fluidaudio"])


def test_hand_computed_jer() -> None:
    row = DiarizationScorer(["pyannote"]).add("f", REFERENCE, HYPOTHESIS)
    # A <-> x: union [0,10]+[14,20] = 16 s, FA 6 s, miss 1 s -> 7/16
    # B <-> y: union [10,22] = 12 s, FA 2 s, miss 6 s -> 8/12
    assert row["jer_pyannote"] == pytest.approx((7 / 16 + 8 / 12) / 2)
    assert "der_fluidaudio" not in row


def test_optimal_mapping_ignores_label_names() -> None:
    hypothesis = _annotation("f", (0, 10, "SPEAKER_01"), (10, 20, "SPEAKER_00"))
    row = DiarizationScorer().add("f", REFERENCE, hypothesis)
    assert row["der_pyannote"] == 0.0
    assert row["jer_pyannote"] == 0.0
    assert row["der_fluidaudio"] == 0.0


@pytest.mark.parametrize(
    ("shift_s", "der_pyannote", "der_fluidaudio"),
    [
        # boundary at 10 s moved to 10.1 s: 0.1 s of confusion, inside the ±0.125 s collar
        (0.1, 0.1 / 20, 0.0),
        # moved to 10.2 s: only 0.2 - 0.125 = 0.075 s outside the collar, over 19.5 s
        (0.2, 0.2 / 20, 0.075 / 19.5),
    ],
)
def test_collar_forgives_small_boundary_errors(
    shift_s: float, der_pyannote: float, der_fluidaudio: float
) -> None:
    hypothesis = _annotation("f", (0, 10 + shift_s, "x"), (10 + shift_s, 20, "y"))
    row = DiarizationScorer().add("f", REFERENCE, hypothesis)
    assert row["confusion_s_pyannote"] == pytest.approx(shift_s)
    assert row["der_pyannote"] == pytest.approx(der_pyannote)
    assert row["der_fluidaudio"] == pytest.approx(der_fluidaudio, abs=1e-12)


def test_fluidaudio_convention_skips_overlapped_speech() -> None:
    # A[0,10] and B[5,15] overlap on [5,10]; the hypothesis misses B there
    reference = _annotation("g", (0, 10, "A"), (5, 15, "B"))
    hypothesis = _annotation("g", (0, 10, "x"), (10, 15, "y"))
    row = DiarizationScorer().add("g", reference, hypothesis)
    assert row["reference_speech_s_pyannote"] == pytest.approx(20.0)
    assert row["missed_s_pyannote"] == pytest.approx(5.0)
    assert row["der_pyannote"] == pytest.approx(0.25)
    # overlap removed, plus collars: [0,0.125], [4.875,10.125], [14.875,15]
    assert row["reference_speech_s_fluidaudio"] == pytest.approx(15 - 0.125 - 5.25 - 0.125)
    assert row["der_fluidaudio"] == 0.0


def test_uem_crops_scoring() -> None:
    uem = Timeline([Segment(0, 12)], uri="f")
    row = DiarizationScorer().add("f", REFERENCE, HYPOTHESIS, uem)
    # inside [0,12]: A[0,10] + B[10,12] = 12 s; missed [0,1]; no FA, no confusion
    assert row["reference_speech_s_pyannote"] == pytest.approx(12.0)
    assert row["missed_s_pyannote"] == pytest.approx(1.0)
    assert row["false_alarm_s_pyannote"] == 0.0
    assert row["confusion_s_pyannote"] == 0.0
    assert row["der_pyannote"] == pytest.approx(1 / 12)


def test_missing_uem_is_extent_of_reference_and_hypothesis_without_warning() -> None:
    extent = Timeline([Segment(0, 22)], uri="f")
    explicit = DiarizationScorer().add("f", REFERENCE, HYPOTHESIS, extent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicit = DiarizationScorer().add("f", REFERENCE, HYPOTHESIS, None)
    assert implicit == explicit


def test_aggregate_pools_components_not_rates() -> None:
    scorer = DiarizationScorer()
    scorer.add("f", REFERENCE, HYPOTHESIS)  # 9 s error / 20 s
    short_reference = _annotation("h", (0, 2, "A"))
    short_hypothesis = _annotation("h", (0, 1, "x"))  # 1 s missed / 2 s
    scorer.add("h", short_reference, short_hypothesis)

    rows, total = scorer.report(), scorer.aggregate()
    assert [row["uri"] for row in rows] == ["f", "h"]
    assert rows[1]["der_pyannote"] == pytest.approx(0.5)
    assert total["num_files"] == 2
    assert total["reference_speech_s_pyannote"] == pytest.approx(22.0)
    assert total["missed_s_pyannote"] == pytest.approx(2.0)
    assert total["der_pyannote"] == pytest.approx(10 / 22)
    assert total["der_pyannote"] != pytest.approx((0.45 + 0.5) / 2)
    assert total["missed_pyannote"] == pytest.approx(2 / 22)
    # JER pools speakers: 2 speakers of f plus A of h (x covers half of it: 1/2)
    assert total["jer_pyannote"] == pytest.approx((7 / 16 + 8 / 12 + 0.5) / 3)


def test_missing_reference_fails_loudly() -> None:
    scorer = DiarizationScorer()
    with pytest.raises(MissingReferenceError, match="no reference for hypothesis of uri 'f'"):
        scorer.add("f", None, HYPOTHESIS)
    with pytest.raises(MissingReferenceError, match="reference of uri 'other'"):
        scorer.add("f", _annotation("other", (0, 1, "A")), HYPOTHESIS)
    assert issubclass(MissingReferenceError, ValueError)
    assert scorer.report() == []


def test_mismatched_hypothesis_or_uem_uri_and_duplicates_are_errors() -> None:
    scorer = DiarizationScorer()
    with pytest.raises(DataError, match="hypothesis of uri 'f' given for uri 'g'"):
        scorer.add("g", _annotation("g", (0, 1, "A")), HYPOTHESIS)
    with pytest.raises(DataError, match="UEM of uri 'z'"):
        scorer.add("f", REFERENCE, HYPOTHESIS, Timeline([Segment(0, 1)], uri="z"))
    scorer.add("f", REFERENCE, HYPOTHESIS)
    with pytest.raises(DataError, match="already scored"):
        scorer.add("f", REFERENCE, HYPOTHESIS)


def test_aggregate_without_files_and_unknown_convention() -> None:
    with pytest.raises(ValueError, match="nothing to aggregate"):
        DiarizationScorer().aggregate()
    with pytest.raises(ValueError, match="valid: pyannote, fluidaudio"):
        DiarizationScorer(["md-eval"])


def test_empty_reference_rates_are_nan_and_der_follows_pyannote() -> None:
    empty = Annotation(uri="silence")
    uem = Timeline([Segment(0, 10)], uri="silence")
    clean = DiarizationScorer().add("silence", empty, Annotation(uri="silence"), uem)
    assert clean["der_pyannote"] == 0.0
    assert math.isnan(clean["missed_pyannote"])
    noisy = DiarizationScorer().add("silence", empty, _annotation("silence", (1, 3, "x")), uem)
    assert noisy["false_alarm_s_pyannote"] == pytest.approx(2.0)
    assert noisy["der_pyannote"] == 1.0


def test_score_dataset_checks_hypotheses_against_items() -> None:
    items = [SimpleNamespace(uri="f", reference=REFERENCE, uem=None)]
    scorer = score_dataset(items, {"f": HYPOTHESIS})
    assert scorer.aggregate()["der_pyannote"] == pytest.approx(0.45)
    with pytest.raises(MissingReferenceError, match=r"\['ghost'\]"):
        score_dataset(items, {"f": HYPOTHESIS, "ghost": HYPOTHESIS})
    with pytest.raises(DataError, match="no hypothesis for uri 'f'"):
        score_dataset(items, {})
