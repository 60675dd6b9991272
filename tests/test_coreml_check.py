"""``python -m diaropt.coreml_check``: every step up to Apple's runtime, which is mocked at its one boundary."""

from __future__ import annotations

import numpy as np
import pytest

from diaropt.backends.base import BackendUnavailable, TensorSpec
from diaropt.coreml_check import check, clip_feeds, compare


def test_compare_and_clip_feeds():
    result = compare(np.array([1.0, 2.0, np.inf]), np.array([1.0, 2.5, 3.0]))
    assert result["max_abs"] == pytest.approx(0.5) and result["nonfinite_mismatch"] == 1
    assert 0.99 < result["cosine"] <= 1.0
    clip = np.arange(10, dtype=np.float32)
    feeds = clip_feeds([TensorSpec("waveforms", (2, 10)), TensorSpec("masks", (2, 3))], clip, {})
    assert (feeds["waveforms"][1] == clip).all() and (feeds["masks"] == 1).all()
    with pytest.raises(ValueError, match="features"):
        clip_feeds([TensorSpec("features", (2, 4))], clip, {})


class FakeApple:
    """Stands in for Apple's runtime at the boundary: 'predicts' by the executor plus 1e-3."""

    calls: list[tuple[str, str]] = []

    def compile(self, path):
        return str(path)

    def load(self, compiled, compute_unit):
        from diaropt.backends.coreml_program import CoreMLProgramModel

        FakeApple.calls.append(("load", compute_unit))
        return CoreMLProgramModel(compiled, "fake")

    def op_placement(self, compiled, compute_unit):
        return {"MLCPUComputeDevice": 3}

    def predict(self, model, feeds):
        return {k: v + 1e-3 for k, v in model(**feeds).items()}


def _unavailable():
    raise BackendUnavailable("compile, load, MLComputePlan and prediction needs macOS")


@pytest.mark.slow
def test_check_runs_build_and_executor_and_compares_with_the_mocked_runtime(tmp_path, assets):
    overrides = ["dataset=sample", "segmentation.batch_size=1", "embedding.batch_size=1", f"paths.cache_dir={tmp_path}",
                 "compute_unit=cpu_only"]
    off_mac = check(overrides, runtime_factory=_unavailable)
    assert "prediction" in off_mac["steps_needing_macos"] and "needs macOS" in off_mac["macos_reason"]
    assert set(off_mac["models"]) >= {"segmentation", "embedding"}
    assert all(entry["units"] == {} and entry["executor_stats"]["calls"] == 1 for entry in off_mac["models"].values())
    mocked = check(overrides, compute_units=("all", "cpu_and_ne"), runtime_factory=FakeApple)
    for entry in mocked["models"].values():
        assert set(entry["units"]) == {"all", "cpu_and_ne"}
        for row in entry["units"].values():
            assert row["op_placement"] == {"MLCPUComputeDevice": 3}
            for diff in row["vs_executor"].values():
                assert diff["max_abs"] == pytest.approx(1e-3, rel=1e-2) and diff["cosine"] > 0.999


def test_sinc_shared_is_refused_in_one_line_before_any_build(tmp_path, capsys, monkeypatch):
    """Its rest model takes the front's rows cut per chunk, which the check cannot feed from a clip:
    exit 2 with one line, not a traceback after the build."""
    import diaropt.variants.build as build
    from diaropt.coreml_check import main

    monkeypatch.setattr(build, "build_models", lambda *a, **k: pytest.fail("built before the refusal"))
    assert main(["segmentation.sinc_shared=true", f"paths.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: segmentation.sinc_shared=true") and "Traceback" not in err[0]


def test_the_command_drops_coremltools_notices_that_do_not_apply(tmp_path):
    """``main`` installs the filter before anything imports coremltools: off macOS its 'Failed to load
    _MLModelProxy' lines and the version notices (:mod:`diaropt.quiet`) do not reach the user."""
    import subprocess
    import sys

    code = ("import sys; from diaropt.coreml_check import main; "
            f"code = main(['segmentation.sinc_shared=true', 'paths.cache_dir={tmp_path}']); "
            "import coremltools; print(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "2", done.stderr[-2000:]
    assert done.stderr.strip().startswith("error: segmentation.sinc_shared=true"), done.stderr
    noise = ("libcoremlpython", "scikit-learn version", "has not been tested with coremltools")
    if sys.platform != "darwin":
        assert not any(text in done.stderr for text in noise), done.stderr


@pytest.mark.parametrize(("override", "said"), [
    ("segmentation.sinc_shared=maybe", "is not a valid bool"), ("quant=int9", "Could not find 'quant/int9'"),
    ("clustering.treshold=0.5", "did you mean clustering.threshold"),
    ("backend=torch", "backend=torch: this check builds and checks backend=coreml"),
    ("backend.name=onnxruntime", "backend.name=onnxruntime: this check builds and checks backend=coreml")])
def test_a_bad_override_is_one_line_exit_2_before_any_build(tmp_path, capsys, monkeypatch, override, said):
    """A bad override: exit 2, one line naming it (not a traceback); another backend is refused rather than
    replaced by backend=coreml under a report that names it. Nothing is built or written."""
    import diaropt.variants.build as build
    from diaropt.coreml_check import main

    monkeypatch.setattr(build, "build_models", lambda cfg: pytest.fail("built despite a bad override"))
    out = tmp_path / "report.json"
    assert main([override, f"paths.cache_dir={tmp_path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad configuration override: ") and said in err[0], err
    assert not out.exists()


def test_backend_coreml_override_is_accepted(tmp_path, monkeypatch):
    import diaropt.variants.build as build

    class Built(Exception):
        pass

    def refuse(cfg):
        raise Built(cfg.backend.name)

    monkeypatch.setattr(build, "build_models", refuse)
    with pytest.raises(Built, match="coreml"):
        check(["backend=coreml", "segmentation.sinc_shared=false", f"paths.cache_dir={tmp_path}"])


def test_an_unwritable_out_is_one_line_after_the_printed_report(tmp_path, capsys, monkeypatch):
    import diaropt.coreml_check as coreml_check

    report = {"overrides": [], "host_is_macos": True, "models": {}}
    monkeypatch.setattr(coreml_check, "check", lambda overrides, units: report)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert coreml_check.main(["--out", str(blocker / "report.json")]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write {blocker / 'report.json'}: "), err
    assert '"overrides": []' in captured.out
