"""Tracking-layer robustness (issue 17, round 2): overrides as a JSON list, interrupts, stale parents."""

from __future__ import annotations

from pathlib import Path

import pytest

from diaropt.keys import TAG_OVERRIDES, overrides_from_tag, overrides_tag
from diaropt.report.load import parse_overrides
from diaropt.tracking import Tracker


@pytest.fixture()
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")


SPACED = ["dataset.audio_dir='/data/my set'", "quant=int8"]


def test_overrides_with_a_spaced_value_match_on_resume(tracker: Tracker) -> None:
    """``dataset.audio_dir='/data/my set'``: stored as a JSON list and compared as a list, so a
    ``resume=true`` re-run finds the finished child (space-joined + ``.split()`` never matched)."""
    parent_id = tracker.get_or_create_parent("/sweeps/a")
    with tracker.start_child("job", parent_id, {TAG_OVERRIDES: overrides_tag(SPACED)}):
        pass
    assert tracker.find_finished_child(parent_id, [*SPACED, "resume=true"]) is not None
    assert tracker.find_finished_child(parent_id, ["dataset.audio_dir='/data/my'", "quant=int8"]) is None
    assert parse_overrides(overrides_tag(SPACED)) == {"dataset.audio_dir": "'/data/my set'", "quant": "int8"}


def test_old_space_joined_override_tags_are_still_read(tracker: Tracker) -> None:
    parent_id = tracker.get_or_create_parent("/sweeps/b")
    with tracker.start_child("job", parent_id, {TAG_OVERRIDES: "quant=int8 dataset=sample"}):
        pass
    assert tracker.find_finished_child(parent_id, ["quant=int8", "dataset=sample", "resume=true"]) is not None
    assert overrides_from_tag("quant=int8 dataset=sample") == ["quant=int8", "dataset=sample"]
    assert overrides_from_tag(None) == []
