"""Saved ONNX Runtime optimized graphs (``backend.ort_cache_optimized``): same outputs, keyed against
staleness, corrupt files replaced."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from diaropt.backends.base import TensorSpec
from diaropt.backends.onnxruntime import OnnxRuntimeModel, export_onnx, optimized_graph_path


@pytest.fixture()
def model_path(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(1, 8, 5), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 4, 3)).eval()
    return export_onnx(module, (torch.zeros(2, 1, 64),), [TensorSpec("x", (2, 1, 64))], [TensorSpec("y", (2, 4, 58))],
                       tmp_path / "m" / "model.onnx")


def _run(model):
    x = np.random.default_rng(0).standard_normal((3, 1, 64)).astype(np.float32)
    return model(x=x)["y"]


def test_saved_graph_is_reused_with_identical_outputs(model_path):
    online = OnnxRuntimeModel(model_path, cache_optimized=False)
    assert online.optimized_graph == "online"
    first = OnnxRuntimeModel(model_path)
    assert first.optimized_graph == "saved"
    cached = optimized_graph_path(model_path, "all")
    assert cached.is_file() and cached.with_name(cached.name + ".sha256").is_file()
    assert not list(model_path.parent.glob(".*.tmp"))
    second = OnnxRuntimeModel(model_path)
    assert second.optimized_graph == "cached"
    np.testing.assert_array_equal(_run(second), _run(online))
    np.testing.assert_array_equal(_run(first), _run(online))


def test_corrupt_or_stale_graphs_are_not_used(model_path, caplog):
    OnnxRuntimeModel(model_path)
    cached = optimized_graph_path(model_path, "all")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    model = OnnxRuntimeModel(model_path)
    assert model.optimized_graph == "saved" and "unusable" in caplog.text
    np.testing.assert_array_equal(_run(model), _run(OnnxRuntimeModel(model_path, cache_optimized=False)))
    assert OnnxRuntimeModel(model_path).optimized_graph == "cached"
    # a rebuilt model file (new mtime) or another level gets another graph
    os.utime(model_path, ns=(1, 1))
    assert optimized_graph_path(model_path, "all") != cached
    assert optimized_graph_path(model_path, "extended") != optimized_graph_path(model_path, "all")
    assert OnnxRuntimeModel(model_path).optimized_graph == "saved"


def test_no_cache_where_the_folder_is_read_only(model_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    os.chmod(model_path.parent, 0o555)
    try:
        assert OnnxRuntimeModel(model_path).optimized_graph == "online"
    finally:
        os.chmod(model_path.parent, 0o755)


@pytest.mark.parametrize("cache_optimized", [True, False])
def test_force_spinning_stop_reaches_the_session_and_changes_no_output(model_path, cache_optimized):
    """``backend.ort_force_spinning_stop`` (on by default) is ONNX Runtime's ``session.force_spinning_stop``
    on the session actually run, on both load paths (cached optimized graph, online optimization)."""
    plain = OnnxRuntimeModel(model_path, cache_optimized=cache_optimized)
    stopping = OnnxRuntimeModel(model_path, cache_optimized=cache_optimized, force_spinning_stop=True)
    entry = "session.force_spinning_stop"
    assert stopping.session.get_session_options().get_session_config_entry(entry) == "1"
    np.testing.assert_array_equal(_run(plain), _run(stopping))
