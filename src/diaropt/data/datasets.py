"""Evaluation datasets: audio files with their reference diarization and scored regions.

Use :func:`load_dataset` with one of the names of :data:`DATASET_NAMES`:

``ami_mini`` (11 files, the default evaluation set)
    The 10 fully annotated AMI debug clips ``dev00 dev01 tst00 trn03 ... trn09`` (30 s each,
    references from the union of ``debug.{train,development,test}.rttm``, UEMs honoured) plus the
    30 s, 2-speaker pyannote ``sample`` file. Four AMI debug clips are left out:

    - ``trn00``: upstream its audio is ``trñ00.wav`` and ``debug.train.lst`` says ``trñ00`` while
      the RTTM and UEM say ``trn00``, so its uri depends on which file a tool trusts. The ``ami``
      asset stores it as ``trn00.wav``; it stays out of the default set so that scores remain
      comparable with tools that read the upstream files.
    - ``trn01``, ``trn02``, ``tst01``: large stretches of audible speech have no reference turn.
      A rough energy check (50 ms frames within 25 dB of the loud frames) finds about 20 s of
      active but unlabelled audio in ``trn01`` (3.4 s annotated), 21 s in ``trn02`` (0.7 s
      annotated) and 11 s in ``tst01`` (6.1 s annotated): a correct system would be charged
      with false alarm there, which would swamp the small differences this project measures.

``ami_debug_all`` (14 files)
    All AMI debug clips, including the four above with defective references. For comparison
    with upstream numbers only; do not use it to rank variants.

``sample`` (1 file)
    The pyannote sample file (30 s, 2 speakers, uri ``sample``).

``folder``
    ``audio_dir`` (``*.wav``, ``*.flac``, ``*.ogg``) with ``rttm_dir`` (a directory of ``*.rttm``
    or one RTTM file) and an optional ``uem_dir`` (a directory of ``*.uem`` or one UEM file).
    The uri of an audio file is its stem. Every audio file needs a reference and every reference
    uri needs an audio file.

``synthetic``
    Conversations built by :func:`make_synthetic_conversation` from folders of single-speaker
    utterances, written once to ``cache_dir`` (keyed by the parameters) and read back.

``protocol``
    A ``pyannote.database`` protocol subset (needs ``pip install pyannote.database``).

The AMI and sample files come from :func:`diaropt.assets.asset_path` (``"ami"``, ``"sample"``),
unless ``ami_dir`` / ``sample_dir`` point at a directory with the same layout.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from pyannote.core import Annotation, Segment, Timeline

from diaropt.data.annotations import DataError, describe_uri, get_reference, load_rttm, load_uem, rttm_uri, write_rttm

__all__ = [
    "AMI_DEBUG_URIS",
    "AMI_MINI_URIS",
    "AUDIO_EXTENSIONS",
    "DATASET_NAMES",
    "Dataset",
    "DatasetItem",
    "check_uri",
    "list_audio_files",
    "load_dataset",
    "make_synthetic_conversation",
    "synthetic_file_seed",
    "trim_silence",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
AMI_SUBSETS = ("train", "development", "test")
AMI_MINI_URIS = (
    "dev00", "dev01", "tst00",
    "trn03", "trn04", "trn05", "trn06", "trn07", "trn08", "trn09",
)  # fmt: skip
AMI_DEBUG_URIS = (
    "dev00", "dev01", "tst00", "tst01",
    "trn00", "trn01", "trn02", "trn03", "trn04", "trn05", "trn06", "trn07", "trn08", "trn09",
)  # fmt: skip
SAMPLE_URI = "sample"


def check_uri(uri: str, source: str | Path) -> str:
    """``uri`` if it can name output files (``<dir>/<uri>.rttm``) without leaving ``<dir>``.

    Raises:
        DataError: an empty uri, ``.``/``..``, a path separator, whitespace or a control character.
    """
    if (not isinstance(uri, str) or not uri or uri in (".", "..")
            or any(c in "/\\" or c.isspace() or not c.isprintable() for c in uri)):
        raise DataError(f"{source}: uri {uri!r} cannot name an output file "
                        "(empty, '.', '..', a path separator, whitespace or a control character)")
    return uri


@dataclass(frozen=True)
class DatasetItem:
    """One evaluation file.

    Attributes:
        uri: file identifier (also ``reference.uri``).
        audio_path: audio file (any sample rate / channel count; decoding is the pipeline's job).
        reference: reference speaker turns, in seconds.
        uem: scored regions in seconds, or None to score the extent of reference ∪ hypothesis.
    """

    uri: str
    audio_path: Path
    reference: Annotation
    uem: Timeline | None = None

    def __post_init__(self) -> None:
        check_uri(self.uri, self.audio_path)
        if self.reference.uri is not None and self.reference.uri != self.uri:
            raise DataError(
                f"{self.audio_path}: reference uri {self.reference.uri!r} != item uri {self.uri!r}"
            )
        if self.uem is not None and self.uem.uri is not None and self.uem.uri != self.uri:
            raise DataError(f"{self.audio_path}: UEM uri {self.uem.uri!r} != item uri {self.uri!r}")


@dataclass(frozen=True)
class Dataset:
    """A named, ordered collection of :class:`DatasetItem` with unique uris."""

    name: str
    items: tuple[DatasetItem, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))
        first: dict[str, DatasetItem] = {}
        for item in self.items:
            if item.uri in first:
                raise DataError(
                    f"dataset {self.name!r}: duplicate uri {item.uri!r} "
                    f"({first[item.uri].audio_path} and {item.audio_path})"
                )
            first[item.uri] = item

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[DatasetItem]:
        return iter(self.items)

    @property
    def uris(self) -> list[str]:
        return [item.uri for item in self.items]

    def __getitem__(self, uri: str) -> DatasetItem:
        for item in self.items:
            if item.uri == uri:
                return item
        raise KeyError(f"dataset {self.name!r} has no uri {uri!r}")


# ---------------------------------------------------------------------------------------------
# helpers


def list_audio_files(directory: str | Path) -> list[Path]:
    """Audio files (extensions in :data:`AUDIO_EXTENSIONS`, any case) directly in ``directory``,
    sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS
    )


def _merge_by_uri(
    loaded: Sequence[tuple[Path, Mapping[str, Annotation | Timeline]]], what: str
) -> tuple[dict, dict[str, Path]]:
    """Merge per-file uri dicts; a uri defined in two files is an error naming both."""
    merged: dict = {}
    source_of: dict[str, Path] = {}
    for path, by_uri in loaded:
        for uri, value in by_uri.items():
            if uri in merged:
                raise DataError(
                    f"{what} of uri {uri!r} is defined in both {source_of[uri]} and {path}"
                )
            merged[uri] = value
            source_of[uri] = path
    return merged, source_of


def _files_of(path: Path, suffix: str, what: str) -> list[Path]:
    """``path`` itself if it is a file, else its ``*{suffix}`` files (at least one)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: {what} directory or file not found")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == suffix)
    if not files:
        raise DataError(f"{path}: no *{suffix} file")
    return files


def _asset_dir(key: str) -> Path:
    from diaropt.assets import asset_path  # lazy: fetching is only needed for declared sets

    return Path(asset_path(key))


# ---------------------------------------------------------------------------------------------
# declared datasets


def _ami_items(uris: Sequence[str], ami_dir: Path) -> list[DatasetItem]:
    rttm_paths = [ami_dir / f"debug.{subset}.rttm" for subset in AMI_SUBSETS]
    uem_paths = [ami_dir / f"debug.{subset}.uem" for subset in AMI_SUBSETS]
    references, _ = _merge_by_uri([(p, load_rttm(p)) for p in rttm_paths], "reference")
    uems, _ = _merge_by_uri([(p, load_uem(p)) for p in uem_paths], "UEM")
    rttm_source = f"{ami_dir}/debug.{{{','.join(AMI_SUBSETS)}}}.rttm"
    uem_source = f"{ami_dir}/debug.{{{','.join(AMI_SUBSETS)}}}.uem"
    items = []
    for uri in uris:
        audio_path = ami_dir / f"{uri}.wav"
        if not audio_path.is_file():
            raise DataError(f"{audio_path}: audio file of uri {uri!r} not found")
        if uri not in uems:
            raise DataError(f"{uem_source}: no UEM for uri {uri!r}")
        reference = get_reference(references, uri, source=rttm_source)
        items.append(DatasetItem(uri, audio_path, reference, uems[uri]))
    return items


def _sample_item(sample_dir: Path) -> DatasetItem:
    audio_path = sample_dir / f"{SAMPLE_URI}.wav"
    rttm_path = sample_dir / f"{SAMPLE_URI}.rttm"
    if not audio_path.is_file():
        raise DataError(f"{audio_path}: audio file not found")
    reference = get_reference(load_rttm(rttm_path), SAMPLE_URI, source=rttm_path)
    return DatasetItem(SAMPLE_URI, audio_path, reference, None)


def load_ami_mini(
    ami_dir: str | Path | None = None, sample_dir: str | Path | None = None
) -> Dataset:
    """``ami_mini``: 10 fully annotated AMI debug clips + ``sample`` (see module docstring)."""
    ami = Path(ami_dir) if ami_dir is not None else _asset_dir("ami")
    sample = Path(sample_dir) if sample_dir is not None else _asset_dir("sample")
    return Dataset("ami_mini", (*_ami_items(AMI_MINI_URIS, ami), _sample_item(sample)))


def load_ami_debug_all(ami_dir: str | Path | None = None) -> Dataset:
    """``ami_debug_all``: the 14 AMI debug clips, four of them with defective references."""
    ami = Path(ami_dir) if ami_dir is not None else _asset_dir("ami")
    return Dataset("ami_debug_all", _ami_items(AMI_DEBUG_URIS, ami))


def load_sample(sample_dir: str | Path | None = None) -> Dataset:
    """``sample``: the pyannote sample file."""
    sample = Path(sample_dir) if sample_dir is not None else _asset_dir("sample")
    return Dataset("sample", [_sample_item(sample)])


def load_folder_dataset(
    audio_dir: str | Path,
    rttm_dir: str | Path,
    uem_dir: str | Path | None = None,
    *,
    allow_empty_references: bool = False,
    name: str = "folder",
) -> Dataset:
    """``folder``: pair ``audio_dir/{uri}.{wav,flac,ogg}`` with RTTM (and UEM) turns of ``uri``.

    Args:
        audio_dir: directory of audio files; the uri of a file is its stem.
        rttm_dir: directory of ``*.rttm`` files (a uri may appear in one file only) or one file.
        uem_dir: optional directory of ``*.uem`` files or one file; audio without UEM gets None.
        allow_empty_references: an audio file without any reference turn gets an empty
            reference (files known to contain no speech) instead of an error.
        name: dataset name.

    Raises:
        DataError: two audio files with one uri, an audio file without reference, a reference
            or UEM uri without audio file, or any malformed RTTM/UEM line.
    """
    audio_dir, rttm_dir = Path(audio_dir), Path(rttm_dir)
    audio_files = list_audio_files(audio_dir)
    if not audio_files:
        raise DataError(f"{audio_dir}: no audio file ({', '.join(AUDIO_EXTENSIONS)})")
    audio_of: dict[str, Path] = {}
    for path in audio_files:
        uri = rttm_uri(path.stem, path)  # NFC, whitespace -> "_": the uri an RTTM can hold
        if uri != path.stem:
            logging.getLogger(__name__).info("%s: uri %s (the file name %s as an RTTM uri)", path,
                                             describe_uri(uri), describe_uri(path.stem))
        if uri in audio_of:
            raise DataError(f"duplicate uri {describe_uri(uri)}: {audio_of[uri]} and {path}")
        audio_of[uri] = path

    rttm_files = _files_of(rttm_dir, ".rttm", "RTTM")
    references, rttm_of = _merge_by_uri(
        [(p, load_rttm(p, allow_empty=allow_empty_references)) for p in rttm_files], "reference"
    )
    uems: dict[str, Timeline] = {}
    uem_of: dict[str, Path] = {}
    if uem_dir is not None:
        uem_files = _files_of(Path(uem_dir), ".uem", "UEM")
        uems, uem_of = _merge_by_uri([(p, load_uem(p)) for p in uem_files], "UEM")

    extensions = ",".join(extension[1:] for extension in AUDIO_EXTENSIONS)
    for kind, source_of in (("reference", rttm_of), ("UEM", uem_of)):
        orphans = sorted(set(source_of) - set(audio_of))
        if orphans:
            more = f" (and {len(orphans) - 1} more: {orphans[1:6]})" if len(orphans) > 1 else ""
            similar = _similar_names(orphans[0], list(audio_of))
            raise DataError(
                f"{source_of[orphans[0]]}: {kind} uri {describe_uri(orphans[0])} has no audio file "
                f"{audio_dir}/{orphans[0]}.{{{extensions}}}{more}"
                + (f"; audio with a similar name: {', '.join(describe_uri(u) for u in similar)}" if similar else "")
            )
    items = []
    for uri, audio_path in audio_of.items():
        if uri not in references and not allow_empty_references:
            raise DataError(
                f"{audio_path}: no reference for uri {describe_uri(uri)} in {rttm_dir} (if the file has no "
                "speech: dataset.allow_empty_references=true; Python: allow_empty_references=True)"
            )
        reference = get_reference(references, uri, source=rttm_dir, allow_empty=True)
        items.append(DatasetItem(uri, audio_path, reference, uems.get(uri)))
    return Dataset(name, items)


def _similar_names(uri: str, candidates: list[str]) -> list[str]:
    """Candidates equal to ``uri`` once accents and case are dropped, else the closest spellings."""
    import difflib
    import unicodedata

    def fold(name: str) -> str:
        return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()

    return [c for c in candidates if fold(c) == fold(uri)] or difflib.get_close_matches(uri, candidates, n=3)


def load_protocol_dataset(
    protocol: str,
    subset: str = "test",
    *,
    database_yml: str | Path | None = None,
    allow_empty_references: bool = False,
) -> Dataset:
    """``protocol``: a ``pyannote.database`` speaker-diarization protocol subset.

    pyannote.database gives an empty reference to a uri that its RTTM does not mention (as for
    ``trñ00`` of the upstream AMI debug protocol); that is an error here unless
    ``allow_empty_references``. An empty ``annotated`` timeline (nothing scored) is an error.

    Args:
        protocol: full name, e.g. ``"AMI.SpeakerDiarization.mini"``.
        subset: ``"train"``, ``"development"`` or ``"test"``.
        database_yml: configuration file to load into the registry first; otherwise the usual
            pyannote.database lookup (``PYANNOTE_DATABASE_CONFIG``, ``~/.pyannote``, ``./``).
    """
    try:
        from pyannote.database import FileFinder, registry
    except ImportError as error:
        raise ImportError(
            "load_dataset('protocol', ...) needs pyannote.database: "
            "pip install pyannote.database"
        ) from error
    if subset not in AMI_SUBSETS:
        raise ValueError(f"subset must be one of {AMI_SUBSETS}, got {subset!r}")
    if database_yml is not None:
        registry.load_database(database_yml)
    try:
        resolved = registry.get_protocol(protocol, preprocessors={"audio": FileFinder()})
    except (ValueError, KeyError, AttributeError) as error:
        raise DataError(f"pyannote.database protocol {protocol!r}: {error}") from error
    items = []
    for file in getattr(resolved, subset)():
        uri = str(file["uri"])
        try:
            audio_path = Path(file["audio"])
            reference = file["annotation"]
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise DataError(f"protocol {protocol!r} {subset}, uri {uri!r}: {error}") from error
        if not reference and not allow_empty_references:
            raise DataError(
                f"protocol {protocol!r} {subset}: uri {uri!r} has no reference turn "
                "(pass allow_empty_references=True if the file has no speech)"
            )
        uem = file["annotated"] if "annotated" in file else None
        if uem is not None and not uem:
            raise DataError(f"protocol {protocol!r} {subset}: uri {uri!r} has an empty UEM")
        items.append(DatasetItem(uri, audio_path, reference, uem))
    return Dataset(f"{protocol}.{subset}", items)


# ---------------------------------------------------------------------------------------------
# synthetic conversations

_SYNTHETIC_VERSION = 1  # bump when the generator changes: it invalidates the caches
_FRAME_S = 0.01  # energy frame for trimming
_FADE_S = 0.005  # raised-cosine fade at trimmed edges (no clicks)
_TARGET_LEVEL_DBFS = -26.0  # RMS of the speech span of each utterance, before jitter
_LEVEL_JITTER_DB = 3.0
_PEAK_MAX = 0.95
_FIRST_ONSET_S = (0.2, 1.0)  # leading silence of the conversation
_GAP_S = (0.1, 1.0)  # silence between turns that do not overlap
_MIN_OVERLAP_S = 0.2  # overlaps shorter than this are not made (they would be inaudible)
_MAX_OVERLAP_S = 3.0
_MIN_SOLO_S = 0.2  # each turn outlasts the previous one by at least this


def trim_silence(
    waveform: np.ndarray, sample_rate_hz: int, *, threshold_db: float = -35.0
) -> tuple[int, int]:
    """Span of speech in an utterance, by frame energy.

    Args:
        waveform: (num_samples,) float mono signal.
        sample_rate_hz: sampling rate.
        threshold_db: a 10 ms frame is speech if its RMS is within this many dB of the loudest
            frame (and above -80 dBFS).

    Returns:
        (start_sample, end_sample): from the first speech frame's start to the last one's end.

    Raises:
        DataError: no frame is speech (silent utterance).
    """
    frame_length = max(1, round(_FRAME_S * sample_rate_hz))
    num_frames = -(-len(waveform) // frame_length)
    padded = np.zeros(num_frames * frame_length, dtype=np.float64)
    padded[: len(waveform)] = waveform
    rms = np.sqrt(np.mean(padded.reshape(num_frames, frame_length) ** 2, axis=1))
    loudest = rms.max(initial=0.0)
    threshold = max(loudest * 10.0 ** (threshold_db / 20.0), 1e-4)
    active = np.flatnonzero(rms > threshold)
    if active.size == 0:
        raise DataError("utterance is silent (no frame above the energy threshold)")
    return int(active[0] * frame_length), int(min(len(waveform), (active[-1] + 1) * frame_length))


def _resolve_speaker_dirs(speaker_dirs: Sequence[str | Path] | str | Path) -> list[Path]:
    if isinstance(speaker_dirs, (str, Path)):
        source_dir = Path(speaker_dirs)
        if not source_dir.is_dir():
            raise DataError(f"{source_dir}: speaker source directory not found")
        dirs = sorted(d for d in source_dir.iterdir() if d.is_dir() and list_audio_files(d))
        if not dirs:
            raise DataError(f"{source_dir}: no speaker sub-directory with audio files")
        return dirs
    dirs = [Path(d) for d in speaker_dirs]
    for directory in dirs:
        if not list_audio_files(directory):
            raise DataError(f"{directory}: speaker directory has no audio file")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise DataError(f"speaker directories must have distinct names (labels): {names}")
    return dirs


def _load_utterance(path: Path, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Read, downmix, resample, trim, fade and level-normalize one utterance: (num_samples,)."""
    try:
        waveform, file_rate_hz = sf.read(path, dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise DataError(f"{path}: cannot read audio ({error})") from error
    waveform = waveform.mean(axis=1)
    if file_rate_hz != sample_rate_hz:
        import soxr

        waveform = soxr.resample(waveform, file_rate_hz, sample_rate_hz)
    try:
        start, end = trim_silence(waveform, sample_rate_hz)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    speech = waveform[start:end].copy()
    num_fade = min(round(_FADE_S * sample_rate_hz), len(speech) // 2)
    if num_fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(num_fade) + 0.5) / num_fade)
        speech[:num_fade] *= ramp
        speech[-num_fade:] *= ramp[::-1]
    level_dbfs = _TARGET_LEVEL_DBFS + rng.uniform(-_LEVEL_JITTER_DB, _LEVEL_JITTER_DB)
    rms = np.sqrt(np.mean(speech**2))
    return speech * (10.0 ** (level_dbfs / 20.0) / rms)


def make_synthetic_conversation(
    speaker_dirs: Sequence[str | Path] | str | Path,
    duration_s: float,
    num_speakers: int,
    overlap_ratio: float,
    seed: int,
    sample_rate_hz: int = 16000,
) -> tuple[np.ndarray, Annotation]:
    """Build a conversation with an exact reference from single-speaker utterances.

    Turns alternate between speakers (never the same speaker twice in a row; speakers who have
    spoken less are favoured). A turn either follows the previous one after a silence (uniform
    0.1-1.0 s) or starts before it ends, overlapping its solo tail (0.2-3 s). Overlaps are
    scheduled by feedback so that overlapped speech / total speech tracks ``overlap_ratio``;
    at most two speakers talk at once. Each utterance is trimmed to its speech span (10 ms
    frames within 35 dB of its loudest frame), faded over 5 ms and set to -26 ± 3 dBFS RMS;
    only that span is placed, so the reference is the placed span to the sample. Pauses inside
    an utterance stay labelled as speech, as in human references. The conversation may end
    with silence when no remaining utterance fits.

    Args:
        speaker_dirs: one directory per speaker (label = directory name), or a source
            directory whose sub-directories are speakers, each with wav/flac/ogg utterances.
        duration_s: length of the conversation.
        num_speakers: speakers drawn (without replacement, by ``seed``) from the available ones.
        overlap_ratio: target overlapped / total speech duration, in [0, 0.45].
        seed: random seed; same inputs and seed give an identical waveform.
        sample_rate_hz: output sampling rate (utterances are resampled with soxr if needed).

    Returns:
        waveform: (round(duration_s * sample_rate_hz),) float32, peak <= 0.95, silence is 0.
        reference: Annotation (uri None) of speaker turns, in seconds.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if not 0.0 <= overlap_ratio <= 0.45:
        raise ValueError(f"overlap_ratio must be in [0, 0.45], got {overlap_ratio}")
    if num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
    if num_speakers == 1 and overlap_ratio > 0:
        raise ValueError("one speaker cannot overlap with itself: use overlap_ratio=0")
    available = _resolve_speaker_dirs(speaker_dirs)
    if num_speakers > len(available):
        raise DataError(
            f"num_speakers={num_speakers} but only {len(available)} speaker directories: "
            f"{[str(d) for d in available]}"
        )
    rng = np.random.default_rng(seed)
    chosen = [available[i] for i in rng.choice(len(available), size=num_speakers, replace=False)]
    queues: dict[str, deque[Path]] = {}
    for directory in chosen:
        files = list_audio_files(directory)
        queues[directory.name] = deque(files[i] for i in rng.permutation(len(files)))
    cache: dict[Path, np.ndarray] = {}

    def utterance(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = _load_utterance(path, sample_rate_hz, rng)
        return cache[path]

    num_samples = round(duration_s * sample_rate_hz)
    min_overlap = round(_MIN_OVERLAP_S * sample_rate_hz)
    max_overlap = round(_MAX_OVERLAP_S * sample_rate_hz)
    min_solo = round(_MIN_SOLO_S * sample_rate_hz)
    spoken = {name: 0 for name in queues}
    placements: list[tuple[str, int, np.ndarray]] = []
    speech = overlap = 0  # samples with >= 1 speaker / with 2 speakers
    previous_end = previous_tail = 0
    previous_speaker: str | None = None
    while True:
        candidates = [name for name in queues if name != previous_speaker] or list(queues)
        weights = np.array([1.0 / (1.0 + spoken[name] / sample_rate_hz) for name in candidates])
        permutation = rng.choice(
            len(candidates), len(candidates), replace=False, p=weights / weights.sum()
        )
        order = [candidates[i] for i in permutation]
        placed = False
        for speaker in order:
            for _ in range(len(queues[speaker])):
                path = queues[speaker][0]
                queues[speaker].rotate(-1)
                samples = utterance(path)
                length = len(samples)
                if previous_speaker is None:
                    start, overlap_length = round(rng.uniform(*_FIRST_ONSET_S) * sample_rate_hz), 0
                else:
                    # overlap o such that (overlap + o) / (speech + length - o) == overlap_ratio
                    wanted = (overlap_ratio * (speech + length) - overlap) / (1.0 + overlap_ratio)
                    limit = min(previous_tail, length - min_solo, max_overlap)
                    if wanted >= min_overlap and limit >= min_overlap:
                        jittered = wanted * rng.uniform(0.8, 1.25)
                        overlap_length = int(np.clip(round(jittered), min_overlap, limit))
                        start = previous_end - overlap_length
                    else:
                        overlap_length = 0
                        start = previous_end + round(rng.uniform(*_GAP_S) * sample_rate_hz)
                if start + length > num_samples:
                    continue
                placements.append((speaker, start, samples))
                speech += length - overlap_length
                overlap += overlap_length
                spoken[speaker] += length
                previous_end, previous_tail = start + length, length - overlap_length
                previous_speaker = speaker
                placed = True
                break
            if placed:
                break
        if not placed:
            break
    if not placements:
        raise DataError(
            f"no utterance of {[str(d) for d in chosen]} fits in {duration_s} s: "
            "use a longer duration_s or shorter utterances"
        )

    mixture = np.zeros(num_samples, dtype=np.float64)
    reference = Annotation()
    for speaker, start, samples in placements:
        mixture[start : start + len(samples)] += samples
        end = start + len(samples)
        reference[Segment(start / sample_rate_hz, end / sample_rate_hz)] = speaker
    peak = np.abs(mixture).max()
    if peak > _PEAK_MAX:
        mixture *= _PEAK_MAX / peak
    return mixture.astype(np.float32), reference


def synthetic_file_seed(seed: int, index: int) -> int:
    """Seed of file ``index`` of a synthetic dataset: independent streams per file."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _synthetic_cache_key(parameters: dict, speaker_dirs: list[Path]) -> str:
    sources = [
        [d.name, [[p.name, p.stat().st_size] for p in list_audio_files(d)]] for d in speaker_dirs
    ]
    payload = json.dumps(
        {"version": _SYNTHETIC_VERSION, "parameters": parameters, "sources": sources},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_synthetic_dataset(
    source_dir: Sequence[str | Path] | str | Path,
    num_files: int,
    duration_s: float,
    num_speakers: int,
    overlap_ratio: float,
    seed: int,
    cache_dir: str | Path,
    sample_rate_hz: int = 16000,
) -> Dataset:
    """``synthetic``: ``num_files`` conversations cached as wav (PCM 16) + rttm in ``cache_dir``.

    Files go to ``cache_dir/synthetic_{key}/`` where ``key`` hashes the parameters, the generator
    version and the source file names and sizes; an existing directory is reused as is. File
    ``i`` uses the seed :func:`synthetic_file_seed` ``(seed, i)``; its uri is ``synthetic_{key}_{i:03d}`` and
    its UEM is ``[0, duration_s]``.
    """
    if num_files < 1:
        raise ValueError(f"num_files must be >= 1, got {num_files}")
    speaker_dirs = _resolve_speaker_dirs(source_dir)
    parameters = {
        "num_files": num_files,
        "duration_s": float(duration_s),
        "num_speakers": num_speakers,
        "overlap_ratio": float(overlap_ratio),
        "seed": seed,
        "sample_rate_hz": sample_rate_hz,
    }
    key = _synthetic_cache_key(parameters, speaker_dirs)
    cache_dir = Path(cache_dir)
    out_dir = cache_dir / f"synthetic_{key}"
    uris = [f"synthetic_{key}_{index:03d}" for index in range(num_files)]
    if not out_dir.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".synthetic_{key}.", dir=cache_dir))
        try:
            for index, uri in enumerate(uris):
                file_seed = synthetic_file_seed(seed, index)
                waveform, reference = make_synthetic_conversation(
                    speaker_dirs, duration_s, num_speakers, overlap_ratio, file_seed, sample_rate_hz
                )
                sf.write(tmp_dir / f"{uri}.wav", waveform, sample_rate_hz, subtype="PCM_16")
                write_rttm(reference, tmp_dir / f"{uri}.rttm", uri=uri)
            (tmp_dir / "parameters.json").write_text(
                json.dumps({**parameters, "version": _SYNTHETIC_VERSION,
                            "speaker_dirs": [str(d) for d in speaker_dirs]}, indent=2)
            )  # fmt: skip
            try:
                os.rename(tmp_dir, out_dir)
            except OSError:  # another process finished first: keep its files
                if not out_dir.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    items = []
    for uri in uris:
        rttm_path = out_dir / f"{uri}.rttm"
        reference = get_reference(load_rttm(rttm_path), uri, source=rttm_path)
        uem = Timeline([Segment(0.0, float(duration_s))], uri=uri)
        items.append(DatasetItem(uri, out_dir / f"{uri}.wav", reference, uem))
    return Dataset("synthetic", items)


# ---------------------------------------------------------------------------------------------
# registry

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "ami_mini": load_ami_mini,
    "ami_debug_all": load_ami_debug_all,
    "sample": load_sample,
    "folder": load_folder_dataset,
    "synthetic": load_synthetic_dataset,
    "protocol": load_protocol_dataset,
}
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, **options) -> Dataset:
    """Load a declared dataset by name (see the module docstring for names and options).

    Raises:
        ValueError: unknown name (lists the valid ones).
        TypeError: missing or unknown option for that dataset.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}"
        ) from None
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as error:
        raise TypeError(
            f"dataset {name!r}: {error}; signature: {name}{inspect.signature(loader)}"
        ) from None
    return loader(**options)
