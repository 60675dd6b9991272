"""Read and write RTTM, UEM and LST files as pyannote.core objects.

All times are in seconds. Every parsing error is a :class:`DataError` whose message names the
file and the 1-based line number, so a bad reference never turns silently into a bad DER.

RTTM (NIST Rich Transcription Time Marked), one ``SPEAKER`` turn per line, 10 fields::

    SPEAKER <uri> <channel> <start_s> <duration_s> <NA> <NA> <speaker> <NA> <NA>

Some tools drop the last field, so 9 fields are accepted too. Lines of the other NIST RTTM types
(``SPKR-INFO``, ``LEXEME``, ...) are skipped; blank lines and ``;;``/``#`` comments are ignored.

UEM (un-partitioned evaluation map), one scored region per line::

    <uri> <channel> <start_s> <end_s>

LST: one uri per line.

Uris are compared in Unicode NFC (:func:`normalize_uri`): macOS file systems hand back names in
NFD, so ``trñ00.wav`` may arrive as ``n`` + U+0303 while an RTTM says U+00F1. Every uri read here is
NFC; :func:`rttm_uri` turns any file stem into the uri written to an RTTM (the one rule used by the
CLI and the folder dataset), and :func:`describe_uri` shows a non-ASCII uri with its code points so
two names that look the same on screen can be told apart in an error.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from pyannote.core import Annotation, Segment, Timeline
from pyannote.core.segment import SEGMENT_PRECISION

from diaropt.files import atomic_path

__all__ = [
    "DataError",
    "describe_uri",
    "get_reference",
    "load_lst",
    "load_rttm",
    "load_uem",
    "normalize_uri",
    "rttm_uri",
    "write_rttm",
]

# NIST RTTM types other than SPEAKER: valid lines, but they carry no speaker turn.
_OTHER_RTTM_TYPES = frozenset(
    {
        "SEGMENT",
        "NOSCORE",
        "NO_RT_METADATA",
        "LEXEME",
        "NON-LEX",
        "NON-SPEECH",
        "FILLER",
        "EDIT",
        "IP",
        "SU",
        "CB",
        "A/P",
        "SPKR-INFO",
    }
)
_RTTM_NUM_FIELDS = (9, 10)
_UEM_NUM_FIELDS = 4
#: Times beyond this (about 31 years) are refused: nonsense, and beyond what pyannote can print.
MAX_SECONDS = 1e9


class DataError(ValueError):
    """A data file (audio, RTTM, UEM, LST) is missing, malformed or inconsistent."""


def normalize_uri(uri: str) -> str:
    """``uri`` in Unicode NFC, the form every uri is compared in."""
    return unicodedata.normalize("NFC", uri)


def describe_uri(uri: str) -> str:
    """``repr(uri)``, followed by its escaped code points if it is not ASCII (``'trñ00' ('tr\\xf100')``
    vs ``'trñ00' ('trn\\u030300')``), so that NFC and NFD names differ visibly in a message."""
    return repr(uri) if uri.isascii() else f"{uri!r} ({ascii(uri)})"


_WHITESPACE = re.compile(r"\s+")


def rttm_uri(name: str, source: str | Path) -> str:
    """The uri under which a file named ``name`` (e.g. an audio file's stem) is written to an RTTM.

    RTTM fields are whitespace-separated, so every run of whitespace becomes ``_``; the name is
    NFC-normalised. The caller logs the mapping when the uri differs from ``name``.

    Raises:
        DataError: (naming ``source``) a name that cannot be a uri and an output file name even then:
            empty, ``.``/``..``, a path separator or a control character.
    """
    uri = _WHITESPACE.sub("_", normalize_uri(name).strip())
    if not uri or uri in (".", "..") or any(c in "/\\" or not c.isprintable() for c in uri):
        raise DataError(f"{source}: name {describe_uri(name)} cannot be a uri "
                        "(empty, '.', '..', a path separator or a control character): rename the file")
    return uri


def _iter_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, whitespace-split fields), skipping blanks and comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error})") from error
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith((";;", "#")):
            continue
        yield line_number, stripped.split()


def _parse_seconds(value: str, what: str, path: Path, line_number: int) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise DataError(f"{path}:{line_number}: {what} {value!r} is not a number") from None
    if not math.isfinite(seconds):
        raise DataError(f"{path}:{line_number}: {what} {value!r} is not finite")
    if abs(seconds) > MAX_SECONDS:
        raise DataError(f"{path}:{line_number}: {what} {value!r} is out of range (more than {MAX_SECONDS:g} s)")
    return seconds


def load_rttm(path: str | Path, *, allow_empty: bool = False) -> dict[str, Annotation]:
    """Load the ``SPEAKER`` turns of an RTTM file.

    Args:
        path: RTTM file (UTF-8).
        allow_empty: accept a file without any ``SPEAKER`` line (returns ``{}``). Use it only
            for files that are known to contain no speech.

    Returns:
        uri -> Annotation (``annotation.uri`` set; one track per line, labels are speaker names).

    Raises:
        DataError: missing file, wrong field count, non-numeric or non-finite times,
            negative start, zero or negative duration, unknown line type, or an empty file
            when ``allow_empty`` is False.
    """
    path = Path(path)
    annotations: dict[str, Annotation] = {}
    for line_number, fields in _iter_records(path):
        line_type = fields[0]
        if line_type in _OTHER_RTTM_TYPES:
            continue
        if line_type != "SPEAKER":
            raise DataError(
                f"{path}:{line_number}: unknown RTTM line type {line_type!r} "
                "(expected 'SPEAKER' or another NIST RTTM type)"
            )
        if len(fields) not in _RTTM_NUM_FIELDS:
            raise DataError(
                f"{path}:{line_number}: expected 10 fields "
                f"'SPEAKER uri channel start duration <NA> <NA> speaker <NA> <NA>', "
                f"got {len(fields)}"
            )
        uri, start_field, duration_field, speaker = normalize_uri(fields[1]), fields[3], fields[4], fields[7]
        start_s = _parse_seconds(start_field, "start", path, line_number)
        duration_s = _parse_seconds(duration_field, "duration", path, line_number)
        if start_s < 0.0:
            raise DataError(f"{path}:{line_number}: negative start {start_s} s")
        if duration_s <= 0.0:
            raise DataError(
                f"{path}:{line_number}: duration must be positive, got {duration_s} s"
            )
        if duration_s < SEGMENT_PRECISION:  # pyannote would drop the turn silently
            raise DataError(
                f"{path}:{line_number}: duration {duration_s} s is below pyannote's "
                f"{SEGMENT_PRECISION} s precision"
            )
        annotation = annotations.setdefault(uri, Annotation(uri=uri))
        # the line number is a unique track name, so repeated turns are kept, not merged
        annotation[Segment(start_s, start_s + duration_s), line_number] = speaker
    if not annotations and not allow_empty:
        raise DataError(
            f"{path}: no SPEAKER line; if this file really has no speech, set "
            "dataset.allow_empty_references=true (dataset=folder; Python: allow_empty=True)"
        )
    return annotations


def get_reference(
    annotations: Mapping[str, Annotation],
    uri: str,
    *,
    source: str | Path,
    allow_empty: bool = False,
) -> Annotation:
    """Return the reference of ``uri``; an absent uri is an error unless ``allow_empty``.

    Args:
        annotations: uri -> Annotation, as returned by :func:`load_rttm`.
        uri: file identifier.
        source: where ``annotations`` came from (RTTM path), quoted in the error.
        allow_empty: return an empty Annotation for an absent uri (file known to have no speech).
    """
    uri = normalize_uri(uri)
    if uri in annotations:
        return annotations[uri]
    if allow_empty:
        return Annotation(uri=uri)
    raise DataError(f"{source}: no reference for uri {describe_uri(uri)}")


def load_uem(path: str | Path) -> dict[str, Timeline]:
    """Load a UEM file.

    Returns:
        uri -> Timeline of scored regions (``timeline.uri`` set).

    Raises:
        DataError: missing file, wrong field count, non-numeric or non-finite times, negative
            start, ``end <= start``, regions of one uri that overlap, or no region at all.
    """
    path = Path(path)
    segments_by_uri: dict[str, list[tuple[Segment, int]]] = {}
    for line_number, fields in _iter_records(path):
        if len(fields) != _UEM_NUM_FIELDS:
            raise DataError(
                f"{path}:{line_number}: expected 4 fields 'uri channel start end', "
                f"got {len(fields)}"
            )
        uri = normalize_uri(fields[0])
        start_s = _parse_seconds(fields[2], "start", path, line_number)
        end_s = _parse_seconds(fields[3], "end", path, line_number)
        if start_s < 0.0:
            raise DataError(f"{path}:{line_number}: negative start {start_s} s")
        if end_s - start_s < SEGMENT_PRECISION:
            raise DataError(
                f"{path}:{line_number}: end {end_s} s must be greater than start {start_s} s"
                + (f" (by at least {SEGMENT_PRECISION} s)" if end_s > start_s else "")
            )
        segments_by_uri.setdefault(uri, []).append((Segment(start_s, end_s), line_number))
    if not segments_by_uri:
        raise DataError(f"{path}: no UEM region")

    timelines: dict[str, Timeline] = {}
    for uri, segments in segments_by_uri.items():
        ordered = sorted(segments, key=lambda item: (item[0].start, item[0].end))
        for (previous, previous_line), (current, current_line) in zip(ordered, ordered[1:]):
            if current.start < previous.end:
                raise DataError(
                    f"{path}:{current_line}: region [{current.start}, {current.end}] s of uri {uri!r} "
                    f"overlaps region [{previous.start}, {previous.end}] s of line {previous_line}"
                )
        timelines[uri] = Timeline(segments=[segment for segment, _ in ordered], uri=uri)
    return timelines


def load_lst(path: str | Path) -> list[str]:
    """Load a list of uris (one per line, order kept).

    Raises:
        DataError: missing file, a line with more than one field, a duplicate uri, no uri.
    """
    path = Path(path)
    uris: list[str] = []
    first_line: dict[str, int] = {}
    for line_number, fields in _iter_records(path):
        if len(fields) != 1:
            raise DataError(f"{path}:{line_number}: expected one uri, got {len(fields)} fields")
        uri = normalize_uri(fields[0])
        if uri in first_line:
            raise DataError(
                f"{path}:{line_number}: duplicate uri {uri!r} (first on line {first_line[uri]})"
            )
        first_line[uri] = line_number
        uris.append(uri)
    if not uris:
        raise DataError(f"{path}: no uri")
    return uris


def _check_rttm_token(value: str, what: str) -> str:
    if not value or any(character.isspace() for character in value):
        raise DataError(f"cannot write RTTM: {what} {value!r} is empty or contains whitespace")
    return value


def _rttm_lines(annotation: Annotation, uri: str) -> Iterator[str]:
    num_skipped = 0
    for segment, _, label in annotation.itertracks(yield_label=True):
        # round the boundaries (not the duration) so neither end drifts more than 0.5 ms
        start_ms = round(segment.start * 1000)
        end_ms = round(segment.end * 1000)
        if end_ms <= start_ms:
            num_skipped += 1
            continue
        speaker = _check_rttm_token(str(label), "speaker label")
        yield (
            f"SPEAKER {uri} 1 {start_ms / 1000:.3f} {(end_ms - start_ms) / 1000:.3f} "
            f"<NA> <NA> {speaker} <NA> <NA>\n"
        )
    if num_skipped:
        warnings.warn(
            f"RTTM of {uri!r}: skipped {num_skipped} segment(s) shorter than 1 ms",
            stacklevel=3,
        )


def write_rttm(
    annotations: Annotation | Iterable[Annotation],
    file: str | Path | IO[str],
    *,
    uri: str | None = None,
) -> None:
    """Write one or several annotations as RTTM ``SPEAKER`` lines (times rounded to 1 ms).

    Args:
        annotations: an Annotation or an iterable of them (one RTTM file for several uris).
        file: destination path or an open text stream. A path is written atomically (a temporary
            file renamed onto it): a failed write (disk full) leaves no file there, never a partial
            or empty one (an empty RTTM is a valid "no speech" answer).
        uri: uri written for a single annotation; defaults to ``annotation.uri``.

    Segment boundaries are rounded to the millisecond; segments that vanish at that precision
    are skipped with a warning. Labels are written with ``str(label)``.

    Raises:
        DataError: missing uri, or uri/label that is empty or contains whitespace.
    """
    if isinstance(annotations, Annotation):
        items = [(annotations, uri if uri is not None else annotations.uri)]
    else:
        if uri is not None:
            raise ValueError("'uri' can only be given with a single Annotation")
        items = [(annotation, annotation.uri) for annotation in annotations]
    lines: list[str] = []
    for annotation, item_uri in items:
        if item_uri is None:
            raise DataError("cannot write RTTM: annotation has no uri (pass uri=...)")
        lines.extend(_rttm_lines(annotation, _check_rttm_token(str(item_uri), "uri")))
    if isinstance(file, (str, Path)):
        with atomic_path(file) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
    else:
        file.writelines(lines)
