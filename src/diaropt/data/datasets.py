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

``synthetic``, ``synthetic_dev``, ``synthetic_test``
    Conversations built by :func:`diaropt.data.synthetic.make_synthetic_conversation` from
    folders of single-speaker utterances, written once to ``cache_dir`` and read back; the split
    sets use disjoint LibriSpeech readers (see :mod:`diaropt.data.synthetic`).

``ami_dev``, ``ami_test`` (:func:`load_ami_split`)
    ``ami_mini`` split so that no speaker is in both: clips that share a speaker come from one
    meeting series and stay together (:data:`AMI_SPLIT_URIS`). dev: ``dev00 dev01 trn04 trn06
    trn09`` (7 speakers); test: ``tst00 trn03 trn05 trn07 trn08 sample`` (15 + 2 speakers).

``dev``, ``test`` (:func:`load_split`)
    The tuning set (``ami_dev`` + ``synthetic_dev``) and the evaluation set (``ami_test`` +
    ``synthetic_test``). Choose thresholds and defaults on ``dev`` only; report ``test``.

``protocol``
    A ``pyannote.database`` protocol subset (needs ``pip install pyannote.database``).

The AMI and sample files come from :func:`diaropt.assets.asset_path` (``"ami"``, ``"sample"``),
unless ``ami_dir`` / ``sample_dir`` point at a directory with the same layout.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyannote.core import Annotation, Timeline

from diaropt.data.annotations import DataError, describe_uri, get_reference, load_rttm, load_uem, rttm_uri

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
    "AMI_SPLIT_URIS",
    "load_ami_split",
    "load_split",
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
#: ``ami_mini`` split by speaker: clips sharing a speaker (dev00/dev01: MEE009 MEE012; trn06/trn09:
#: FEE083; trn07/trn08: the same four) stay on one side; no speaker is on both sides.
AMI_SPLIT_URIS: dict[str, tuple[str, ...]] = {
    "dev": ("dev00", "dev01", "trn04", "trn06", "trn09"),
    "test": ("tst00", "trn03", "trn05", "trn07", "trn08", SAMPLE_URI),
}


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


def load_ami_split(split: str, ami_dir: str | Path | None = None, sample_dir: str | Path | None = None) -> Dataset:
    """``ami_dev`` / ``ami_test``: the ``ami_mini`` files of one side of :data:`AMI_SPLIT_URIS`."""
    if split not in AMI_SPLIT_URIS:
        raise ValueError(f"split must be one of {sorted(AMI_SPLIT_URIS)}, got {split!r}")
    uris = [uri for uri in AMI_SPLIT_URIS[split] if uri != SAMPLE_URI]
    ami = Path(ami_dir) if ami_dir is not None else _asset_dir("ami")
    items = _ami_items(uris, ami)
    if SAMPLE_URI in AMI_SPLIT_URIS[split]:
        items.append(_sample_item(Path(sample_dir) if sample_dir is not None else _asset_dir("sample")))
    return Dataset(f"ami_{split}", items)


def load_split(split: str, source_dir: str | Path, cache_dir: str | Path | None = None, seed: int = 0,
               ami_dir: str | Path | None = None, sample_dir: str | Path | None = None) -> Dataset:
    """``dev`` / ``test``: ``ami_{split}`` followed by ``synthetic_{split}`` (same arguments as theirs)."""
    from diaropt.data.synthetic import load_synthetic_split

    ami = load_ami_split(split, ami_dir, sample_dir)
    synthetic = load_synthetic_split(split, source_dir, cache_dir, seed)
    return Dataset(split, (*ami.items, *synthetic.items))


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
# registry

def _synthetic(name: str) -> Callable[..., Dataset]:
    from diaropt.data import synthetic  # imports this module: loaded on first use

    return getattr(synthetic, name)


def _loaders() -> dict[str, Callable[..., Dataset]]:
    return {
        "ami_mini": load_ami_mini,
        "ami_debug_all": load_ami_debug_all,
        "sample": load_sample,
        "folder": load_folder_dataset,
        "synthetic": _synthetic("load_synthetic_dataset"),
        "protocol": load_protocol_dataset,
        "ami_dev": functools.partial(load_ami_split, "dev"),
        "ami_test": functools.partial(load_ami_split, "test"),
        "synthetic_dev": functools.partial(_synthetic("load_synthetic_split"), "dev"),
        "synthetic_test": functools.partial(_synthetic("load_synthetic_split"), "test"),
        "dev": functools.partial(load_split, "dev"),
        "test": functools.partial(load_split, "test"),
    }


DATASET_NAMES = ("ami_mini", "ami_debug_all", "sample", "folder", "synthetic", "protocol",
                 "ami_dev", "ami_test", "synthetic_dev", "synthetic_test", "dev", "test")


def load_dataset(name: str, **options) -> Dataset:
    """Load a declared dataset by name (see the module docstring for names and options).

    Raises:
        ValueError: unknown name (lists the valid ones).
        TypeError: missing or unknown option for that dataset.
    """
    try:
        loader = _loaders()[name]
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
