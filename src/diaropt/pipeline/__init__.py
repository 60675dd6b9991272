"""Diarization pipeline stages (pure array-in/array-out functions, no model code)."""
