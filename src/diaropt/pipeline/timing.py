"""Per-stage wall-clock timing (``time.perf_counter``) under the design note's categories.

Stage names (defined in :mod:`diaropt.keys`) are shared by the pipeline, MLflow metric keys
(``time_<stage>_s``) and reports.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

from diaropt.keys import RTFX_METRIC, STAGES, TIME_TOTAL, WARMUP_STAGE, time_metric

__all__ = ["STAGES", "StageTimer"]


class StageTimer:
    """Accumulates seconds per stage; ``sync`` (a backend's) runs before each clock read."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync or (lambda: None)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in STAGES and name != WARMUP_STAGE:
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
        result = {time_metric(stage): float(self.seconds.get(stage, 0.0)) for stage in STAGES}
        total = sum(result.values())
        result[TIME_TOTAL] = total
        result[time_metric(WARMUP_STAGE)] = float(self.seconds.get(WARMUP_STAGE, 0.0))
        result["audio_duration_s"] = float(audio_duration_s)
        result[RTFX_METRIC] = audio_duration_s / total if total > 0 else float("nan")
        return result

    def merge(self, other: "StageTimer") -> None:
        for name, seconds in other.seconds.items():
            self.seconds[name] += seconds
