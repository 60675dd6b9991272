"""diaropt: measure and review optimizations of an on-device speaker-diarization pipeline."""

from __future__ import annotations

__version__ = "0.1.0"
