"""Checks of an evaluation set before any model is built (once per sweep, :func:`check_dataset`).

Loading a :class:`~diaropt.data.datasets.Dataset` already parses every reference and UEM (a bad
line is a :class:`DataError` naming file and line) and refuses duplicate or unsafe uris. What only
the audio can tell is checked here, without decoding whole files:

- every audio file exists, is not empty, has a readable header, decodes at its first and last
  second, and is at least :data:`~diaropt.pipeline.audio.MIN_DURATION_S` long;
- the scored reference (the reference inside the UEM, if any) ends no later than the audio plus
  :data:`REFERENCE_OVERHANG_TOLERANCE_S`. A reference that runs past the end of its audio is
  speech the system can never find: it is scored as missed (issue 17 saw DER 69 % instead of 7 %),
  so it is refused with the file, both ends and the fix.
  A smaller overhang (above 1 ms) is a warning.

NaN samples and clipping are found when a job decodes the whole file (``load_audio``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import soundfile as sf

from diaropt.data.annotations import DataError
from diaropt.data.datasets import Dataset, DatasetItem
from diaropt.pipeline.audio import MIN_DURATION_S

__all__ = ["REFERENCE_OVERHANG_TOLERANCE_S", "audio_duration_s", "check_dataset", "check_item"]

log = logging.getLogger(__name__)

#: A scored reference may end this much after its audio (rounding, resampling); more is refused.
REFERENCE_OVERHANG_TOLERANCE_S = 0.5
#: Overhangs below this are rounding (RTTM times have 1 ms precision) and pass silently.
_ROUNDING_S = 1e-3
#: Shown in the error of a dataset with many bad files.
_MAX_LISTED = 10


def audio_duration_s(path: Path) -> float:
    """Duration of ``path`` in seconds from its header, after decoding its first and last second.

    Raises:
        DataError: missing, empty, unreadable or undecodable file, no samples, shorter than
            ``MIN_DURATION_S``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty audio file (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            frames, rate = f.frames, f.samplerate
            if frames <= 0:
                raise DataError(f"{path}: contains no samples")
            block = min(frames, rate)
            f.read(block, dtype="float32")  # the first second decodes
            if frames > block and f.seekable():
                f.seek(frames - block)
                f.read(block, dtype="float32")  # and so does the last
    except DataError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as error:
        raise DataError(f"{path}: not a readable audio file ({error})") from error
    duration_s = frames / rate
    if duration_s < MIN_DURATION_S:
        raise DataError(f"{path}: too short ({duration_s:.3f} s; at least {MIN_DURATION_S} s is needed)")
    return duration_s


def check_item(item: DatasetItem, max_duration_s: float | None = None) -> list[str]:
    """Check one file; returns warnings.

    Args:
        item: the file, its reference and UEM.
        max_duration_s: the job crops audio and reference to this (``dataset.max_duration_s``):
            a reference beyond it is cropped, not scored.

    Raises:
        DataError: the audio cannot be used, or the scored reference ends more than
            :data:`REFERENCE_OVERHANG_TOLERANCE_S` after the audio.
    """
    duration_s = audio_duration_s(item.audio_path)
    if max_duration_s is not None and duration_s > max_duration_s:
        return []  # reference and UEM are cropped to the first max_duration_s with the audio
    reference = item.reference if item.uem is None else item.reference.crop(item.uem)
    if not len(reference):
        return []
    end_s = reference.get_timeline().extent().end
    overhang_s = end_s - duration_s
    if overhang_s > REFERENCE_OVERHANG_TOLERANCE_S:
        raise DataError(
            f"{item.audio_path}: the reference of uri {item.uri!r} ends at {end_s:.3f} s but the audio lasts "
            f"{duration_s:.3f} s ({overhang_s:.3f} s of reference speech can never be found and would be "
            f"scored as missed): wrong audio file or reference, or crop the reference"
            + (" (or add a UEM ending at the audio's end)" if item.uem is None else " and its UEM"))
    if overhang_s > _ROUNDING_S:
        return [f"{item.audio_path}: the reference of uri {item.uri!r} ends {overhang_s:.3f} s after the audio "
                f"({end_s:.3f} s vs {duration_s:.3f} s)"]
    return []


def check_dataset(dataset: Dataset, max_duration_s: float | None = None) -> list[str]:
    """Check every file of ``dataset`` (see the module docstring); warnings are logged and returned.

    Every file is checked before an error is raised, so one run names every bad file.

    Raises:
        DataError: ``dataset '<name>': N of M file(s) cannot be used: <problem>; ...`` (at most
            10 problems listed, each naming its file).
    """
    problems: list[str] = []
    warnings: list[str] = []
    for item in dataset:
        try:
            warnings += check_item(item, max_duration_s)
        except DataError as error:
            problems.append(str(error))
    for warning in warnings:
        log.warning("%s", warning)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"dataset {dataset.name!r}: {len(problems)} of {len(dataset)} file(s) cannot be used: "
                        f"{listed}{more}")
    return warnings
