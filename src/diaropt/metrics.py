"""Diarization error rate (DER) and Jaccard error rate (JER) with pyannote.metrics.

Every file is scored in two conventions (:data:`CONVENTIONS`):

``pyannote``
    collar 0 s, overlapped speech scored: pyannote.audio's own benchmark setting.
``fluidaudio``
    collar 0.25 s, overlapped speech skipped: the forgiving setting of FluidAudio's benchmarks
    (``DiarizationErrorRate(collar=0.25, skip_overlap=True)``). pyannote.metrics takes the
    collar as the *total* width of the region removed around each reference boundary, so
    0.25 s removes ±0.125 s.

DER uses :class:`pyannote.metrics.diarization.DiarizationErrorRate` (optimal Hungarian speaker
mapping). Its components are durations in seconds: ``total`` is the scored reference speech
summed over reference speakers (a second where two people talk counts twice unless overlap is
skipped). Rates are fractions (0.12 = 12 %). Aggregates pool the components over files, as
``abs(metric)`` does, rather than averaging per-file rates; aggregate JER pools speaker
counts and errors likewise.

Scored regions: the UEM when given, else the extent of reference ∪ hypothesis (pyannote's
default, computed here explicitly so pyannote does not warn for every file).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyannote.core import Annotation, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

from diaropt.data.annotations import DataError

__all__ = [
    "CONVENTIONS",
    "DiarizationScorer",
    "MetricConvention",
    "MissingReferenceError",
    "score_dataset",
]


@dataclass(frozen=True)
class MetricConvention:
    """How a DER is scored: collar (total width, seconds) and whether overlap is skipped."""

    collar_s: float
    skip_overlap: bool


CONVENTIONS: dict[str, MetricConvention] = {
    "pyannote": MetricConvention(collar_s=0.0, skip_overlap=False),
    "fluidaudio": MetricConvention(collar_s=0.25, skip_overlap=True),
}

# pyannote.metrics component name -> our key stem (durations in seconds)
_COMPONENTS = {
    "missed detection": "missed",
    "false alarm": "false_alarm",
    "confusion": "confusion",
}


class MissingReferenceError(DataError):
    """No reference for a hypothesis, or a reference of another file."""


class _ScoredItem(Protocol):
    uri: str
    reference: Annotation
    uem: Timeline | None


def _default_uem(reference: Annotation, hypothesis: Annotation, uri: str) -> Timeline:
    """Extent of reference ∪ hypothesis, as pyannote.metrics approximates a missing UEM."""
    extent = reference.get_timeline().extent() | hypothesis.get_timeline().extent()
    return Timeline(segments=[extent] if extent else [], uri=uri)


class DiarizationScorer:
    """Accumulate per-file DER/JER in several conventions.

    Row keys, for each convention ``c`` (``pyannote``, ``fluidaudio``):

    - ``der_c``, ``missed_c``, ``false_alarm_c``, ``confusion_c``: rates (fractions of
      ``reference_speech_s_c``); component rates are NaN when no reference speech is scored
      (``der_c`` then follows pyannote: 0.0 without error, 1.0 with error).
    - ``missed_s_c``, ``false_alarm_s_c``, ``confusion_s_c``, ``reference_speech_s_c``: seconds.
    - ``jer_c``: Jaccard error rate (pyannote reports 1.0 for a file without reference speaker).

    plus ``uri`` in rows and ``num_files`` in the aggregate.

    Example::

        scorer = DiarizationScorer()
        for item in dataset:
            scorer.add(item.uri, item.reference, hypotheses[item.uri], item.uem)
        rows, total = scorer.report(), scorer.aggregate()
    """

    def __init__(self, conventions: Sequence[str] = tuple(CONVENTIONS)) -> None:
        unknown = [name for name in conventions if name not in CONVENTIONS]
        if unknown or not conventions:
            raise ValueError(
                f"unknown convention(s) {unknown}; valid: {', '.join(CONVENTIONS)}"
            )
        self.conventions = tuple(conventions)
        self._der = {
            name: DiarizationErrorRate(
                collar=CONVENTIONS[name].collar_s, skip_overlap=CONVENTIONS[name].skip_overlap
            )
            for name in self.conventions
        }
        self._jer = {
            name: JaccardErrorRate(
                collar=CONVENTIONS[name].collar_s, skip_overlap=CONVENTIONS[name].skip_overlap
            )
            for name in self.conventions
        }
        self._rows: list[dict] = []

    def add(
        self,
        uri: str,
        reference: Annotation | None,
        hypothesis: Annotation,
        uem: Timeline | None = None,
    ) -> dict:
        """Score one file and accumulate it.

        Args:
            uri: file identifier; ``reference.uri``, ``hypothesis.uri`` and ``uem.uri`` must be
                None or equal to it.
            reference: reference turns (seconds); None raises :class:`MissingReferenceError`.
            hypothesis: system output (seconds).
            uem: scored regions, or None for the extent of reference ∪ hypothesis.

        Returns:
            the row of this file (see class docstring).

        Raises:
            MissingReferenceError: reference None or of another uri.
            DataError: hypothesis or UEM of another uri, or uri already added.
        """
        if reference is None:
            raise MissingReferenceError(f"no reference for hypothesis of uri {uri!r}")
        if reference.uri is not None and reference.uri != uri:
            raise MissingReferenceError(
                f"reference of uri {reference.uri!r} given for hypothesis of uri {uri!r}"
            )
        if hypothesis.uri is not None and hypothesis.uri != uri:
            raise DataError(f"hypothesis of uri {hypothesis.uri!r} given for uri {uri!r}")
        if uem is not None and uem.uri is not None and uem.uri != uri:
            raise DataError(f"UEM of uri {uem.uri!r} given for uri {uri!r}")
        if any(row["uri"] == uri for row in self._rows):
            raise DataError(f"uri {uri!r} already scored: the aggregate would count it twice")
        if uem is None:
            uem = _default_uem(reference, hypothesis, uri)

        row: dict = {"uri": uri}
        for name in self.conventions:
            details = self._der[name](reference, hypothesis, uem=uem, detailed=True)
            jer = self._jer[name](reference, hypothesis, uem=uem)
            row.update(_convention_values(name, details, float(jer)))
        self._rows.append(row)
        return dict(row)

    def report(self) -> list[dict]:
        """Per-file rows, in the order files were added."""
        return [dict(row) for row in self._rows]

    def aggregate(self) -> dict:
        """Pooled values over all added files (same keys as a row, ``num_files`` for ``uri``).

        Raises:
            ValueError: no file was added.
        """
        if not self._rows:
            raise ValueError("no file scored yet: nothing to aggregate")
        total: dict = {"num_files": len(self._rows)}
        for name in self.conventions:
            details = self._der[name][:]
            details[self._der[name].metric_name()] = abs(self._der[name])
            total.update(_convention_values(name, details, float(abs(self._jer[name]))))
        return total


def _convention_values(name: str, details: Mapping[str, float], jer: float) -> dict:
    reference_speech_s = float(details["total"])
    values = {
        f"der_{name}": float(details[DiarizationErrorRate.metric_name()]),
        f"jer_{name}": jer,
        f"reference_speech_s_{name}": reference_speech_s,
    }
    for component, stem in _COMPONENTS.items():
        duration_s = float(details[component])
        values[f"{stem}_{name}"] = (
            duration_s / reference_speech_s if reference_speech_s > 0 else math.nan
        )
        values[f"{stem}_s_{name}"] = duration_s
    return values


def score_dataset(
    items: Iterable[_ScoredItem],
    hypotheses: Mapping[str, Annotation],
    conventions: Sequence[str] = tuple(CONVENTIONS),
) -> DiarizationScorer:
    """Score every item (``uri``, ``reference``, ``uem``: e.g. a :class:`~diaropt.data.Dataset`)
    against ``hypotheses[uri]``.

    Raises:
        MissingReferenceError: a hypothesis uri that is not an item of the dataset.
        DataError: an item without hypothesis.
    """
    items = list(items)
    known = {item.uri for item in items}
    extra = sorted(set(hypotheses) - known)
    if extra:
        raise MissingReferenceError(f"no reference for hypothesis uri(s) {extra}")
    scorer = DiarizationScorer(conventions)
    for item in items:
        if item.uri not in hypotheses:
            raise DataError(f"no hypothesis for uri {item.uri!r}")
        scorer.add(item.uri, item.reference, hypotheses[item.uri], item.uem)
    return scorer
