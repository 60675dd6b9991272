"""Cache of the network outputs (segmentation log-probabilities, embeddings) per (audio, models).

A sweep over clustering or post-processing parameters then re-clusters without re-running the
networks. The key hashes the audio samples, the models' identity (content keys of the built files,
or weights sha256 for torch) and every parameter that changes those arrays (step, batching does
not, masks do). Timings of a job that hit the cache are not comparable: it is tagged as such.
Entries are ``.npz`` files written to a temporary name and renamed, so a reader never sees a
partial one; an unreadable entry is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


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
            with np.load(path) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except (OSError, ValueError) as error:  # corrupt or partial: recompute
            log.warning("array cache entry %s is unreadable (%s); recomputing", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.root / f"{key}.npz")
