"""senko 0.2.2 (the peer of ``peer.py``) run on CPU the way its own scripts run it, in-process or as a CLI.

    python benchmarks/senko_runner.py AUDIO.wav... --out DIR [--fbank auto|native|kaldi-native-fbank]

senko's own example/evaluation scripts (``examples/diarize.py``, ``evaluation/eval.py`` of
github.com/narcotic-sh/senko) build one ``senko.Diarizer(..., warmup=True)``, call
``diarize(wav_path)`` per file and keep ``merged_segments`` (written with ``senko.save_rttm``). On a
CPU host without CUDA that is: Silero VAD (TorchScript, one thread), senko's native Kaldi fbank
(``libfbank_extractor.so``, a C++ library built for x86-64 with AVX-512), CAM++ in PyTorch eager fp32
(the same 3D-Speaker ``campplus_cn_en_common`` weights as diaropt's embedding), spectral clustering
below 20 min of audio and UMAP + HDBSCAN above. Input: 16 kHz mono 16-bit WAV only (senko's check).

Where the native fbank library cannot run (a CPU without AVX-512: it loads, then dies with SIGILL; or a missing file), the
fbank step is replaced by kaldi-native-fbank with the options senko's CUDA path declares "to match
the C++ extractor" (:data:`FBANK_OPTIONS`), per subsegment, mean-subtracted per subsegment like
the C++ code; :func:`load_diarizer` says which one ran (``fbank`` in its info) so results record the
substitution. :func:`fbank_parity` measures how far the substitute is from the native library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from diaropt.tracking.host import cpu_flags

SAMPLE_RATE_HZ = 16000
MIN_SEGMENT_SAMPLES = 400  # senko's C++ extractor zero-pads shorter subsegments to one 25 ms frame
# senko/diarizer.py, CUDA branch: kaldifeat options "to match C++ extractor"
FBANK_OPTIONS: dict[str, Any] = {
    "frame_opts": {"samp_freq": 16000.0, "frame_shift_ms": 10.0, "frame_length_ms": 25.0, "dither": 0.0,
                   "preemph_coeff": 0.97, "remove_dc_offset": True, "window_type": "povey",
                   "round_to_power_of_two": True, "blackman_coeff": 0.42, "snip_edges": True},
    "mel_opts": {"num_bins": 80, "low_freq": 20.0, "high_freq": 0.0, "vtln_low": 100.0, "vtln_high": -500.0},
    "use_energy": False, "energy_floor": 1.0, "raw_energy": True, "use_log_fbank": True, "use_power": True,
}


def senko_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("senko")
    except PackageNotFoundError:
        return None


#: run in a child process by ``native_fbank_status``: senko's own constructor and fbank call on 2 s of silence
_NATIVE_PROBE = """
import numpy as np, senko
diarizer = senko.Diarizer(device="cpu", warmup=False, quiet=True)
diarizer._extract_fbank_features(np.zeros(32000, dtype=np.float32), [(0.0, 1.5)])
"""


def native_fbank_status(timeout_s: float = 120.0) -> tuple[bool, str]:
    """(runs, why): whether senko's native fbank library runs on this CPU.

    Loading it is not enough: on an x86 CPU without AVX-512 the library loads and then dies with
    SIGILL (which would kill this process) on its first extraction. So senko's own constructor and
    one extraction run in a child process first; a child killed by a signal or failing means no.
    """
    try:
        from senko import config
    except ImportError as error:
        return False, f"senko not importable: {error}"
    try:
        lib = ctypes.CDLL(config.get_fbank_lib_path())
        handle = lib.create_fbank_extractor
        del handle
    except (OSError, FileNotFoundError, AttributeError) as error:
        return False, f"{type(error).__name__}: {error}"
    flags = cpu_flags() or set()
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    cpu = "CPU has " + ", ".join(avx512) if avx512 else "CPU has no AVX-512 flag"
    try:
        child = subprocess.run([sys.executable, "-c", _NATIVE_PROBE], capture_output=True, text=True,
                               timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"loads, but a 1.5 s extraction in a child process did not finish in {timeout_s:.0f} s; {cpu}"
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return False, f"loads, but its first extraction killed a child process with {name}; {cpu}"
    if child.returncode:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"loads, but its first extraction failed in a child process ({last}); {cpu}"
    return True, f"runs; {cpu}"


def _kaldi_options():
    import kaldi_native_fbank as knf

    options = knf.FbankOptions()
    for group in ("frame_opts", "mel_opts"):
        for key, value in FBANK_OPTIONS[group].items():
            setattr(getattr(options, group), key, value)
    for key, value in FBANK_OPTIONS.items():
        if not isinstance(value, dict):
            setattr(options, key, value)
    return options


def _read_pcm(audio_source: str | np.ndarray) -> np.ndarray:
    """float32 samples as senko's C++ reader makes them (int16 / 32768)."""
    if isinstance(audio_source, np.ndarray):
        return np.asarray(audio_source, dtype=np.float32)
    import soundfile as sf

    samples, rate = sf.read(audio_source, dtype="int16", always_2d=True)
    if rate != SAMPLE_RATE_HZ:
        raise ValueError(f"{audio_source}: {rate} Hz, senko needs {SAMPLE_RATE_HZ} Hz")
    return samples[:, 0].astype(np.float32) / 32768.0


def kaldi_native_fbank_features(audio_source: str | np.ndarray, subsegments: list[tuple[float, float]],
                                sample_offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """senko's ``_extract_fbank_features`` contract with kaldi-native-fbank: (features_flat float32,
    frames per subsegment, offsets into features_flat, 80). Subsegment bounds in seconds, cut like the
    C++ code (float32 seconds x 16000, truncated; at least 400 samples, zero-padded)."""
    import kaldi_native_fbank as knf

    wav = _read_pcm(audio_source)
    options = _kaldi_options()
    bounds = np.asarray(subsegments, dtype=np.float32).reshape(-1, 2)
    features, frames, offsets, offset = [], [], [], 0
    for start_s, end_s in bounds:
        start = int(start_s * np.float32(SAMPLE_RATE_HZ)) - sample_offset
        length = max(int((end_s - start_s) * np.float32(SAMPLE_RATE_HZ)), 1)
        segment = wav[start:start + length] if 0 <= start < len(wav) else wav[:0]
        if len(segment) < MIN_SEGMENT_SAMPLES:
            segment = np.pad(segment, (0, MIN_SEGMENT_SAMPLES - len(segment)))
        fbank = knf.OnlineFbank(options)
        fbank.accept_waveform(SAMPLE_RATE_HZ, segment.tolist())
        fbank.input_finished()
        feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
        feats -= feats.mean(axis=0, keepdims=True)
        features.append(feats.reshape(-1))
        frames.append(feats.shape[0])
        offsets.append(offset)
        offset += feats.size
    flat = np.concatenate(features) if features else np.zeros(0, np.float32)
    return flat, np.asarray(frames, dtype=np.int64), np.asarray(offsets, dtype=np.int64), 80


def load_diarizer(fbank: str = "auto", warmup: bool = True) -> tuple[Any, dict[str, Any]]:
    """``senko.Diarizer`` on CPU as senko's scripts make it, and what it runs (engine, precision, fbank).

    ``fbank``: ``auto`` (native library if it loads, else kaldi-native-fbank), ``native`` (fail if it
    cannot load) or ``kaldi-native-fbank`` (substitute even if native loads, e.g. to compare).
    """
    import torch

    loads, why = native_fbank_status()
    if fbank == "native" and not loads:
        raise RuntimeError(f"senko's native fbank library does not load here: {why}")
    use_native = loads and fbank in ("auto", "native")
    import senko

    start = time.perf_counter()
    if use_native:
        diarizer = senko.Diarizer(device="cpu", warmup=warmup, quiet=True)
    else:  # the constructor opens the native library: make it fail over to the substitute
        diarizer = _diarizer_without_native_fbank(senko, warmup)
    load_s = time.perf_counter() - start
    info = {"system": "senko", "senko_version": senko_version(), "device": diarizer.device,
            "vad": f"{diarizer.vad_model_type} (silero-vad {_version('silero-vad')}, TorchScript, 1 thread)",
            "embedding": "CAM++ campplus_cn_en_common, PyTorch eager, fp32",
            "clustering": "spectral below 20 min of audio, UMAP + HDBSCAN above (CPU)",
            "fbank": "native libfbank_extractor.so" if use_native else "kaldi-native-fbank (substitute)",
            "fbank_native_status": why, "fbank_substituted": not use_native,
            "engine": f"torch {torch.__version__} CPU", "precision": "fp32", "torch_threads": torch.get_num_threads(),
            "warmup": warmup, "load_s": load_s}
    return diarizer, info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _diarizer_without_native_fbank(senko: Any, warmup: bool) -> Any:
    """A Diarizer whose fbank step is :func:`kaldi_native_fbank_features` (the native library is
    never opened: its ctypes load is replaced by a stub for the constructor only)."""
    from senko import diarizer as module

    class _NoLibrary:  # every attribute the constructor sets or calls
        def __getattr__(self, name: str) -> Any:
            return _Callable()

    class _Callable:
        restype = None
        argtypes = None

        def __call__(self, *args: Any) -> None:
            return None

    real_cdll = module.ctypes.CDLL
    module.ctypes.CDLL = lambda *args, **kwargs: _NoLibrary()
    try:
        diarizer = senko.Diarizer(device="cpu", warmup=warmup, quiet=True)
    finally:
        module.ctypes.CDLL = real_cdll
    diarizer.fbank_extractor = None  # __del__ skips destroy
    diarizer._extract_fbank_features = (lambda audio_source, subsegments, *, sample_offset=0:
                                        kaldi_native_fbank_features(audio_source, subsegments, sample_offset))
    return diarizer


def diarize(diarizer: Any, wav_path: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """senko's merged segments (what its scripts score and write) and its stage timings (seconds)."""
    result = diarizer.diarize(str(wav_path))
    if result is None:  # senko: no speech found
        return [], dict(getattr(diarizer, "_timing_stats", {}))
    return result["merged_segments"], dict(result["timing_stats"])


def annotation_of(segments: list[dict[str, Any]], uri: str):
    from pyannote.core import Annotation, Segment

    annotation = Annotation(uri=uri)
    for index, segment in enumerate(segments):
        if segment["end"] > segment["start"]:
            annotation[Segment(float(segment["start"]), float(segment["end"])), index] = segment["speaker"]
    return annotation


def per_subsegment(flat: np.ndarray, frames: np.ndarray, offsets: np.ndarray, dim: int = 80) -> list[np.ndarray]:
    """(frames_i, dim) arrays in subsegment order (the native library's threads write the subsegments'
    features at offsets in completion order, not in subsegment order)."""
    return [np.asarray(flat[int(o):int(o) + int(n) * dim]).reshape(int(n), dim) for n, o in zip(frames, offsets)]


def fbank_parity(diarizer: Any, wav_path: Path, max_subsegments: int = 200) -> dict[str, float]:
    """Native library vs :func:`kaldi_native_fbank_features` on one file's first subsegments
    (1.5 s, senko's CPU windowing); needs the native library loaded in ``diarizer``."""
    segments = [(s, s + 1.5) for s in np.arange(0.0, 60.0, 0.6)][:max_subsegments]
    duration_s = len(_read_pcm(str(wav_path))) / SAMPLE_RATE_HZ
    segments = [(float(a), float(b)) for a, b in segments if b <= duration_s]
    native = diarizer._extract_fbank_features(str(wav_path), segments)
    substitute = kaldi_native_fbank_features(str(wav_path), segments)
    same_frames = bool(np.array_equal(native[1], substitute[1]))
    diff = (np.abs(np.concatenate([a - b for a, b in zip(per_subsegment(*native), per_subsegment(*substitute))]))
            if same_frames else np.array([np.inf]))
    return {"subsegments": len(segments), "same_frame_counts": same_frames, "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+", type=Path, help="16 kHz mono 16-bit WAV files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the RTTM files (<stem>.rttm)")
    parser.add_argument("--fbank", choices=("auto", "native", "kaldi-native-fbank"), default="auto")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip senko's warm-up (its scripts warm up: CAM++ x4 and UMAP+HDBSCAN on 4250 "
                             "random embeddings, which dominates a cold start)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.audio if not p.is_file()]
    if missing:
        print(f"error: no such audio file: {', '.join(missing)}", file=sys.stderr)
        return 2
    from senko.utils import save_rttm

    diarizer, info = load_diarizer(args.fbank, warmup=not args.no_warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.audio:
        segments, _ = diarize(diarizer, path)
        tmp = args.out / f".{path.stem}.rttm.tmp"
        save_rttm(segments, str(path), str(tmp))
        tmp.replace(args.out / f"{path.stem}.rttm")  # whole file or nothing
    print(json.dumps({k: v for k, v in info.items() if k in ("fbank", "fbank_substituted", "load_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
