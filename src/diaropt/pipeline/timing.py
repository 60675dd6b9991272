"""Per-stage wall-clock timing (``time.perf_counter``) under the design note's categories.

Stage names are shared by the pipeline, MLflow metric keys (``time_<stage>_s``) and reports.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

# The design note's categories, in pipeline order. "audio" (decode + resample) and
# "preprocessing" (masks, clean frames) are timed separately rather than hidden in a neighbour.
STAGES = ("compile", "audio", "segmentation", "preprocessing", "embedding", "clustering", "postprocess")


class StageTimer:
    """Accumulates seconds per stage; ``sync`` (a backend's) runs before each clock read."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync or (lambda: None)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in STAGES and name != "warmup":
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def metrics(self, audio_duration_s: float) -> dict[str, float]:
        """``time_<stage>_s`` for every stage, ``time_total_s`` (warm-up excluded), ``rtfx``."""
        result = {f"time_{stage}_s": float(self.seconds.get(stage, 0.0)) for stage in STAGES}
        total = sum(result.values())
        result["time_total_s"] = total
        result["time_warmup_s"] = float(self.seconds.get("warmup", 0.0))
        result["audio_duration_s"] = float(audio_duration_s)
        result["rtfx"] = audio_duration_s / total if total > 0 else float("nan")
        return result

    def merge(self, other: "StageTimer") -> None:
        for name, seconds in other.seconds.items():
            self.seconds[name] += seconds
