"""``diaropt.files.atomic_path``: the target appears whole or not at all."""

from __future__ import annotations

import numpy as np
import pytest

from diaropt.files import atomic_path


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "sub" / "arrays.npz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.suffix == ".npz"
        np.savez(tmp, x=np.arange(3))  # np.savez keeps a path that already ends in .npz
        assert not target.exists()
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))
    assert [p.name for p in target.parent.iterdir()] == ["arrays.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
