"""Cache of the network outputs (segmentation log-probabilities, embeddings) per (audio, models).

A sweep over clustering or post-processing parameters then re-clusters without re-running the
networks. The key hashes the audio samples, the models' identity (content keys of the built files,
or weights sha256 for torch) and every parameter that changes those arrays (step, batching does
not, masks do). Timings of a job that hit the cache are not comparable: it is tagged as such.
Entries are ``.npz`` files written to a temporary name and renamed, so a reader never sees a
partial one; each holds a sha256 of its arrays (``__sha256__``), and an entry that is unreadable,
lacks it or does not match it is deleted and recomputed.

:func:`write_manifest` / :func:`verify_manifest` do the same for cache folders (built models): a
``manifest.json`` of every file's sha256, checked on each hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from diaropt.files import atomic_path, sha256_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHECKSUM = "__sha256__"


def write_manifest(folder: Path) -> dict[str, str]:
    """Write ``folder/manifest.json``: relative path -> sha256 of every file (written last)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))
    return files


def verify_manifest(folder: Path) -> list[str]:
    """Problems of a cache folder against its manifest (empty: intact)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return [f"{MANIFEST} (missing or unreadable)"]
    bad = []
    for relative, sha256 in files.items():
        path = folder / relative
        if not path.is_file():
            bad.append(f"{relative} (missing)")
        elif sha256_of(path) != sha256:
            bad.append(f"{relative} (sha256 mismatch)")
    return bad


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class ArrayCache:
    def __init__(self, root: Path, identity: dict) -> None:
        self.root = Path(root)
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self.hits = 0
        self.misses = 0

    def key(self, audio: np.ndarray) -> str:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return digest.hexdigest()[:32]

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.root / f"{key}.npz"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
            checksum = str(arrays.pop(_CHECKSUM, ""))
            if checksum != _arrays_sha256(arrays):
                raise ValueError("content does not match its sha256")
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # corrupt: recompute
            log.warning("array cache entry %s is unusable (%s); recomputing", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self.root / f"{key}.npz") as tmp:
            np.savez(tmp, **arrays, **{_CHECKSUM: np.array(_arrays_sha256(arrays))})
