"""Long-form recordings with exact references, built reproducibly from short annotated clips.

:func:`make_long_form` concatenates clips end to end (sample-exact), cycling through them (each
cycle in a seeded order) until ``target_duration_s`` is reached, then crops to it. Each clip's
reference turns and UEM are shifted by the clip's offset; speaker labels are kept as they are, so
clips whose labels are global ids (AMI's, e.g. ``MEE009``) keep one label per person across clips.

:func:`load_ami_long_form` does this with the fully annotated AMI debug clips of the pinned
``ami`` asset (:data:`AMI_LONG_FORM_URIS`: every clip but ``trn01``, ``trn02`` and ``tst01``, which
have long stretches of unannotated speech, see :mod:`diaropt.data.datasets`), writes the waveform
once to ``cache_dir`` and returns a one-item :class:`Dataset`. A synthetic long meeting needs no
code here: ``load_dataset("synthetic", num_files=1, duration_s=..., ...)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from pyannote.core import Annotation, Segment, Timeline

from diaropt.data.annotations import DataError, write_rttm
from diaropt.data.datasets import AMI_DEBUG_URIS, Dataset, DatasetItem, load_ami_debug_all
from diaropt.files import atomic_path

__all__ = ["AMI_LONG_FORM_URIS", "LongForm", "load_ami_long_form", "make_long_form", "overlap_fraction"]

#: AMI debug clips whose speech is fully annotated (trn00 included: the asset stores it as trn00.wav).
AMI_LONG_FORM_URIS = tuple(uri for uri in AMI_DEBUG_URIS if uri not in ("trn01", "trn02", "tst01"))
_LONG_FORM_VERSION = 1  # bump when the layout rule changes: it invalidates cached waveforms


@dataclass(frozen=True)
class LongForm:
    """A concatenated recording: its reference, scored regions and where each clip went."""

    uri: str
    reference: Annotation
    uem: Timeline
    duration_s: float
    placements: tuple[tuple[str, int], ...]  # (clip uri, offset in samples), in order
    sample_rate_hz: int


def _clip_order(uris: Sequence[str], cycle: int, seed: int) -> list[str]:
    if cycle == 0 or seed < 0:  # first cycle (or seed < 0: every cycle) in the given order
        return list(uris)
    rng = np.random.default_rng([seed, cycle])
    return [uris[i] for i in rng.permutation(len(uris))]


def make_long_form(items: Sequence[DatasetItem], target_duration_s: float, uri: str, seed: int = 0,
                   sample_rate_hz: int = 16000) -> LongForm:
    """Layout, reference and UEM of ``items`` concatenated to ``target_duration_s`` (no audio read).

    Clips are placed back to back by their sample counts; cycle 0 keeps the given order, later cycles
    are permuted by ``seed``. A clip's missing UEM means "scored where it has audio". The last clip
    is cut at the target; reference and UEM are cropped to it.
    """
    if target_duration_s <= 0:
        raise ValueError(f"target_duration_s must be positive, got {target_duration_s}")
    if not items:
        raise DataError("make_long_form needs at least one clip")
    by_uri = {item.uri: item for item in items}
    lengths = {}
    for item in items:
        info = sf.info(str(item.audio_path))
        if info.samplerate != sample_rate_hz:
            raise DataError(f"{item.audio_path}: {info.samplerate} Hz, expected {sample_rate_hz} Hz")
        lengths[item.uri] = int(info.frames)
    target_samples = round(target_duration_s * sample_rate_hz)
    placements: list[tuple[str, int]] = []
    offset = cycle = 0
    while offset < target_samples:
        for clip in _clip_order(list(by_uri), cycle, seed):
            if offset >= target_samples:
                break
            placements.append((clip, offset))
            offset += lengths[clip]
        cycle += 1
    duration_s = target_samples / sample_rate_hz
    window = Segment(0.0, duration_s)
    reference = Annotation(uri=uri)
    scored: list[Segment] = []
    track = 0
    for clip, start in placements:
        shift_s = start / sample_rate_hz
        item = by_uri[clip]
        for segment, _, label in item.reference.itertracks(yield_label=True):
            shifted = Segment(segment.start + shift_s, segment.end + shift_s) & window
            if shifted.duration > 0:
                reference[shifted, f"t{track}"] = label
                track += 1
        clip_uem = item.uem if item.uem is not None else Timeline([Segment(0.0, lengths[clip] / sample_rate_hz)])
        for segment in clip_uem:
            shifted = Segment(segment.start + shift_s, segment.end + shift_s) & window
            if shifted.duration > 0:
                scored.append(shifted)
    uem = Timeline(scored, uri=uri).support()
    return LongForm(uri, reference, uem, duration_s, tuple(placements), sample_rate_hz)


def render_long_form(layout: LongForm, items: Sequence[DatasetItem]) -> np.ndarray:
    """(round(duration_s * rate),) float32 waveform of ``layout`` (clips read with soundfile)."""
    paths = {item.uri: item.audio_path for item in items}
    total = round(layout.duration_s * layout.sample_rate_hz)
    waveform = np.zeros(total, dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for clip, start in layout.placements:
        if clip not in cache:
            audio, _ = sf.read(str(paths[clip]), dtype="float32", always_2d=True)
            cache[clip] = audio.mean(axis=1, dtype=np.float32)
        audio = cache[clip][: total - start]
        waveform[start: start + len(audio)] = audio
    return waveform


def _layout_key(layout: LongForm, items: Sequence[DatasetItem]) -> str:
    sizes = {item.uri: Path(item.audio_path).stat().st_size for item in items}
    payload = {"version": _LONG_FORM_VERSION, "placements": layout.placements, "sizes": sizes,
               "sample_rate_hz": layout.sample_rate_hz, "duration_s": layout.duration_s}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def load_ami_long_form(target_duration_s: float, cache_dir: str | Path, ami_dir: str | Path | None = None,
                       uris: Sequence[str] = AMI_LONG_FORM_URIS, seed: int = 0) -> tuple[Dataset, LongForm]:
    """A one-item dataset: the AMI clips ``uris`` concatenated to ``target_duration_s``.

    The waveform (PCM 16 wav) and its RTTM are written once to ``cache_dir/ami_long_form_{key}/``
    (``key`` hashes the layout and clip file sizes) and reused. The item's uri is
    ``ami_long_{minutes}min`` (one decimal if not whole).
    """
    clips = load_ami_debug_all(ami_dir)
    items = [clips[uri] for uri in uris]
    minutes = target_duration_s / 60.0
    uri = f"ami_long_{minutes:.0f}min" if float(minutes).is_integer() else f"ami_long_{minutes:.1f}min"
    layout = make_long_form(items, target_duration_s, uri, seed)
    out_dir = Path(cache_dir) / f"ami_long_form_{_layout_key(layout, items)}"
    audio_path = out_dir / f"{uri}.wav"
    if not audio_path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_rttm(layout.reference, out_dir / f"{uri}.rttm", uri=uri)
        with atomic_path(out_dir / "placements.json") as tmp:
            tmp.write_text(json.dumps(layout.placements))
        with atomic_path(audio_path) as tmp:  # a concurrent reader never sees a partial file
            sf.write(tmp, render_long_form(layout, items), layout.sample_rate_hz, subtype="PCM_16")
    item = DatasetItem(uri, audio_path, layout.reference, layout.uem)
    return Dataset("ami_long_form", [item]), layout


def overlap_fraction(reference: Annotation) -> float:
    """Overlapped speech / total speech (seconds with >= 2 speakers over seconds with >= 1)."""
    speech = reference.get_timeline().support().duration()
    if speech <= 0:
        return 0.0
    overlap = reference.get_overlap().duration()
    return float(overlap / speech)
