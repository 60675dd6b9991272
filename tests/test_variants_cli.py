"""``python -m diaropt.variants``: build a configuration's files; op tables beside the references."""

from __future__ import annotations

import json

import pytest

from diaropt.variants.__main__ import main, op_table


def test_op_table_has_a_row_per_op_and_totals():
    table = op_table({"ours": {"conv": 3, "slice_by_index": 998}, "theirs": {"conv": 3}})
    lines = table.splitlines()
    assert lines[0] == "| op | ours | theirs |"
    assert "| conv | 3 | 3 |" in lines and "| slice_by_index | 998 |  |" in lines
    assert lines[-1] == "| **total (non-const)** | 1001 | 3 |"


def test_build_writes_the_files_and_a_summary(tmp_path, capsys):
    out = tmp_path / "built"
    assert main(["build", "backend=onnxruntime", "quant=fp16", "frame_extraction=strided", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["backend"] == "onnxruntime" and set(summary["models"]) >= {"segmentation", "embedding"}
    for kind in ("segmentation", "embedding"):
        model = summary["models"][kind]
        assert (out / kind / "model.onnx").is_file() and model["file"] == str(out / kind / "model.onnx")
        assert model["info"]["quant"] == "fp16"
        assert (out / kind / "info.json").is_file()
    assert json.loads((out / "config.json").read_text())["quant"]["mode"] == "fp16"


def test_bad_override_is_one_clear_error(tmp_path, capsys):
    assert main(["build", "quant=int3", "--out", str(tmp_path)]) != 0 or pytest.fail("accepted quant=int3")
    assert "int3" in capsys.readouterr().err
