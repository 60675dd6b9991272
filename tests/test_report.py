"""The sweep report: selection rule, Pareto front, preset, report files and MLflow tags, notebook.

Selection, Pareto, report and notebook tests log synthetic runs straight into a temporary SQLite
store (fast, and every case of the rule is spelled out). The end-to-end tests (``-m slow``: the sweep
builds and runs the models) run the report command and the notebook on a real tiny sweep
(``tiny_sweep`` in conftest.py).
"""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from diaropt import report
from diaropt.config import REPO_ROOT, compose

EXPERIMENT = "report-test"


class Store:
    """A temporary MLflow store with helpers to log synthetic sweeps."""

    def __init__(self, path: Path) -> None:
        self.uri = f"sqlite:///{path}/mlflow.db"
        self.client = MlflowClient(self.uri)
        self.experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=(path / "artifacts").as_uri())

    def sweep(self, children: list[dict], name: str = "sweep") -> tuple[str, dict[str, str]]:
        """A parent run and one child per spec; returns (parent id, {child name: run id})."""
        parent = self.client.create_run(self.experiment_id, run_name=name, tags={"diaropt.role": "parent"})
        ids = {}
        for spec in children:
            overrides = spec["overrides"]
            tags = {"mlflow.parentRunId": parent.info.run_id, "diaropt.role": "child",
                    "diaropt.overrides": " ".join(overrides + ["tracking.tracking_uri=sqlite\\:////x.db"]),
                    "diaropt.timing_source": "target", "diaropt.numerics_source": "onnxruntime",
                    **spec.get("tags", {})}
            run = self.client.create_run(self.experiment_id, run_name=",".join(overrides), tags=tags)
            values = dict(o.split("=", 1) for o in overrides)
            params = {"quant.mode": values.get("quant", "fp32"),
                      "frame_extraction.mode": values.get("frame_extraction", "strided"),
                      "dataset.name": values.get("dataset", "ami_mini")}
            metrics = dict(spec.get("metrics", {}))
            if "der" in spec:
                metrics["der_pyannote"] = spec["der"]
            if "rtfx" in spec:  # 30 s of audio, 3 repeats
                stages = {"compile": 0.5, "segmentation": 2.0, "preprocessing": 0.3, "clustering": 0.05,
                          "postprocess": 0.05}
                stages["embedding"] = max(0.05, 30.0 / spec["rtfx"] - sum(stages.values()))
                total = sum(stages.values())
                metrics.update({f"time_{k}_s": v for k, v in stages.items()}, time_total_s=total,
                               time_total_s_min=0.9 * total, time_total_s_max=1.1 * total, rtfx=spec["rtfx"],
                               rtfx_min=0.9 * spec["rtfx"], rtfx_max=1.1 * spec["rtfx"], repeats=3.0)
                if spec.get("repeats") == 1:  # one timed pass: no spread measured
                    for key in ("time_total_s_min", "time_total_s_max", "rtfx_min", "rtfx_max"):
                        metrics.pop(key)
                    metrics["repeats"] = 1.0
                elif spec.get("repeats") == "1 as logged":  # what a sweep job logs for repeats=1: min = max
                    metrics.update(time_total_s_min=total, time_total_s_max=total, rtfx_min=spec["rtfx"],
                                   rtfx_max=spec["rtfx"], repeats=1.0)
            if spec.get("parity") is not None:
                ok, flag = spec["parity"]
                metrics.update(parity_ok=ok, parity_emb_cos_min=0.99 if ok else 0.9, parity_emb_cos_mean=0.995,
                               parity_seg_max_abs_diff=1e-3, parity_seg_powerset_agreement=0.999, parity_der_delta=0.0)
                self.client.log_batch(run.info.run_id, tags=[RunTag("diaropt.parity_flag", flag)])
            self.client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                                  params=[Param(k, v) for k, v in params.items()])
            self.client.set_terminated(run.info.run_id, spec.get("status", "FINISHED"))
            ids[spec["name"]] = run.info.run_id
        self.client.set_terminated(parent.info.run_id, "FINISHED")
        return parent.info.run_id, ids


OK = (1.0, "ok")
FLAGGED = (0.0, "below_cosine_floor")
#: fp32/strided is the default-axes baseline (DER 10 %), though fp32/per_frame has a better DER.
MIXED = [
    {"name": "fp32_per_frame", "overrides": ["quant=fp32", "frame_extraction=per_frame"], "der": 0.090, "rtfx": 1.0,
     "parity": OK},
    {"name": "baseline", "overrides": ["quant=fp32", "frame_extraction=strided"], "der": 0.100, "rtfx": 2.0,
     "parity": OK},
    {"name": "fp16", "overrides": ["quant=fp16", "frame_extraction=strided"], "der": 0.104, "rtfx": 3.0, "parity": OK},
    {"name": "int8_flagged", "overrides": ["quant=int8", "frame_extraction=strided"], "der": 0.101, "rtfx": 5.0,
     "parity": FLAGGED},
    {"name": "int4_inaccurate", "overrides": ["quant=int4", "frame_extraction=strided"], "der": 0.200, "rtfx": 8.0,
     "parity": OK},
    {"name": "pal8_unchecked", "overrides": ["quant=palettize8", "frame_extraction=strided"], "der": 0.100,
     "rtfx": 6.0},
    {"name": "cached", "overrides": ["quant=fp16", "frame_extraction=batched"], "der": 0.100, "rtfx": 50.0,
     "parity": OK, "tags": {"diaropt.timings_comparable": "false"}},
    {"name": "skipped", "overrides": ["quant=w8a8", "frame_extraction=strided"],
     "tags": {"diaropt.skipped": "true", "diaropt.skip_reason": "Core ML cannot run on Linux"}},
    {"name": "failed", "overrides": ["quant=int8_dynamic", "frame_extraction=strided"], "status": "FAILED"},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def mixed(store):
    return store.sweep(MIXED, "mixed")


def select(store: Store, parent: str, tolerance: float = 0.005, allow_unchecked: bool = False):
    sweep = report.load_sweep(EXPERIMENT, parent, store.uri)
    return sweep, report.select_recommended(sweep.runs, tolerance, allow_unchecked, sweep.axes,
                                            report.default_axis_values(sweep.axes))


# ----------------------------------------------------------------------------------------------
# Selection rule
# ----------------------------------------------------------------------------------------------


def test_a_recommendation_without_measured_spread_carries_a_caution(store):
    """repeats=1: no spread, so a small RTFx lead is not checked against noise; the report says so beside the
    recommendation (found when a one-file sweep recommended w8a8 at 1.03x)."""
    parent, ids = store.sweep([
        {"name": "base", "overrides": ["quant=fp32"], "der": 0.07, "rtfx": 29.3, "parity": OK, "repeats": 1},
        {"name": "w8a8", "overrides": ["quant=w8a8"], "der": 0.07, "rtfx": 30.2, "parity": OK, "repeats": 1},
    ], "one_pass")
    sweep, selection = select(store, parent)
    assert selection.recommended_run_id == ids["w8a8"]
    text = " ".join(str(content) for _, content in report.render.recommendation_section(sweep, selection).blocks)
    assert "**Caution:** no spread over repeats was measured" in text and "repeats=1" in text


def test_one_timed_pass_logged_as_min_equal_max_still_carries_the_caution(store):
    """A real repeats=1 job logs rtfx_min = rtfx_max = rtfx: that is no measured spread either."""
    parent, ids = store.sweep([
        {"name": "base", "overrides": ["quant=fp32"], "der": 0.07, "rtfx": 12.6, "parity": OK,
         "repeats": "1 as logged"},
        {"name": "fp16", "overrides": ["quant=fp16"], "der": 0.07, "rtfx": 15.7, "parity": OK,
         "repeats": "1 as logged"},
    ], "one_pass_logged")
    sweep, selection = select(store, parent)
    assert selection.recommended_run_id == ids["fp16"]
    text = " ".join(str(content) for _, content in report.render.recommendation_section(sweep, selection).blocks)
    assert "**Caution:** no spread over repeats was measured" in text


def test_a_model_only_one_run_builds_does_not_make_timings_incomparable(store):
    """segmentation.sinc_shared adds a segmentation_sinc model (its own ORT level param): timings still compare
    on the models both runs have; a different level on a shared model still does not compare."""
    parent, ids = store.sweep([
        {"name": "auto", "overrides": ["segmentation.sinc_shared=null"], "der": 0.07, "rtfx": 12.0, "parity": OK},
        {"name": "off", "overrides": ["segmentation.sinc_shared=false"], "der": 0.07, "rtfx": 20.0, "parity": OK},
        {"name": "on_ext", "overrides": ["segmentation.sinc_shared=true"], "der": 0.07, "rtfx": 30.0, "parity": OK},
    ], "sinc_levels")
    levels = {"auto": {"segmentation": "all", "segmentation_sinc": "all", "embedding": "all"},
              "off": {"segmentation": "all", "embedding": "all"},
              "on_ext": {"segmentation": "all", "segmentation_sinc": "all", "embedding": "extended"}}
    for name, run_id in ids.items():
        store.client.log_param(run_id, "backend.resolved", "onnxruntime")
        for kind, level in levels[name].items():
            store.client.log_param(run_id, f"ort_optimization_level.{kind}", level)
    sweep, selection = select(store, parent)
    verdict = selection.candidates.set_index("run_id")["reason"]
    assert selection.baseline_run_id == ids["auto"]
    assert verdict[ids["off"]] == "" and selection.recommended_run_id == ids["off"]
    assert "not comparable" in verdict[ids["on_ext"]] and "embedding=extended" in verdict[ids["on_ext"]]


def test_selection_rule_on_a_mixed_sweep(store, mixed):
    parent, ids = mixed
    sweep, selection = select(store, parent)
    assert sweep.axes == ["quant", "frame_extraction"]
    assert selection.baseline_run_id == ids["baseline"]  # default other axes beats the better DER
    assert selection.recommended_run_id == ids["fp16"]
    verdict = selection.candidates.set_index("run_id")["reason"]
    assert verdict[ids["int8_flagged"]] == "parity flagged (below_cosine_floor)"
    assert verdict[ids["int4_inaccurate"]].startswith("DER +10.00 pts")
    assert verdict[ids["pal8_unchecked"]] == "parity not checked"
    assert verdict[ids["cached"]].startswith("timings not comparable")
    assert verdict[ids["skipped"]] == "skipped: Core ML cannot run on Linux"
    assert verdict[ids["failed"]] == "failed"
    assert verdict[ids["baseline"]] == ""  # the baseline counts even if unchecked; here it is checked
    assert selection.if_unchecked_allowed == ids["pal8_unchecked"]


def test_allow_unchecked_and_tolerance_change_the_choice(store, mixed):
    parent, ids = mixed
    assert select(store, parent, allow_unchecked=True)[1].recommended_run_id == ids["pal8_unchecked"]
    assert select(store, parent, tolerance=0.1)[1].recommended_run_id == ids["int4_inaccurate"]
    # with no tolerance only runs at least as accurate as the baseline remain: the baseline itself
    assert select(store, parent, tolerance=0.0)[1].recommended_run_id == ids["baseline"]


def test_no_qualifying_run_is_said_clearly(store):
    parent, ids = store.sweep([
        {"name": "fp32", "overrides": ["quant=fp32"], "der": 0.10, "rtfx": 2.0, "parity": FLAGGED},
        {"name": "int8", "overrides": ["quant=int8"], "der": 0.30, "rtfx": 9.0, "parity": OK},
        {"name": "fp16", "overrides": ["quant=fp16"], "der": 0.10, "rtfx": 4.0},
    ], "none")
    _, selection = select(store, parent)
    assert selection.baseline_run_id == ids["fp32"]
    assert selection.recommended_run_id is None
    assert selection.message.startswith("no configuration qualifies")
    document = report.build_report(report.load_sweep(EXPERIMENT, parent, store.uri), selection).document
    assert "**No configuration qualifies.**" in document.markdown()


def test_no_fp32_child_means_no_baseline_and_no_ranking(store):
    parent, ids = store.sweep([
        {"name": "fp16", "overrides": ["quant=fp16"], "der": 0.12, "rtfx": 3.0, "parity": OK},
        {"name": "int8", "overrides": ["quant=int8"], "der": 0.11, "rtfx": 4.0, "parity": OK,
         "tags": {"diaropt.timing_source": "proxy", "diaropt.timing_source_reason": "Core ML weights in ORT fp32"}},
    ], "no-fp32")
    _, selection = select(store, parent)
    assert selection.baseline_run_id is None  # never silently the best-DER child
    verdict = selection.candidates.set_index("run_id")["reason"]
    assert verdict[ids["fp16"]] == "no baseline"  # and the proxy would not be ranked by speed with one either
    assert verdict[ids["int8"]] == "no baseline, timing proxy: not ranked by speed"
    assert "no finished fp32 child in this sweep" in selection.baseline_note
    assert selection.recommended_run_id is None
    markdown = report.build_report(report.load_sweep(EXPERIMENT, parent, store.uri), selection).document.markdown()
    assert "no finished fp32 child in this sweep" in markdown
    assert "fp32 baseline" not in markdown


PROXY_REASON = "quant=int8 is a Core ML weight compression: ONNX Runtime runs its dequantized weights in fp32"


def test_speed_ranked_only_among_comparable_target_timings(store, tmp_path):
    parent, ids = store.sweep([
        {"name": "fp32", "overrides": ["quant=fp32"], "der": 0.100, "rtfx": 2.0, "parity": OK},
        {"name": "fp16", "overrides": ["quant=fp16"], "der": 0.101, "rtfx": 2.1, "parity": OK},  # inside spread
        {"name": "fp16_sel", "overrides": ["quant=fp16_selective"], "der": 0.100, "rtfx": 4.0, "parity": OK},
        {"name": "int8", "overrides": ["quant=int8"], "der": 0.100, "rtfx": 5.0, "parity": OK,
         "tags": {"diaropt.timing_source": "proxy", "diaropt.timing_source_reason": PROXY_REASON}},
        {"name": "flagged", "overrides": ["quant=int4"], "der": 0.090, "rtfx": 6.0, "parity": FLAGGED},
    ], "provenance")
    for run_id in ids.values():
        store.client.log_param(run_id, "backend.resolved", "onnxruntime")
        level = "extended" if run_id == ids["fp16_sel"] else "all"
        store.client.log_param(run_id, "ort_optimization_level.embedding", level)
    sweep, selection = select(store, parent)
    verdict = selection.candidates.set_index("run_id")["reason"]
    assert selection.baseline_run_id == ids["fp32"]
    assert verdict[ids["int8"]] == "timing proxy: not ranked by speed"
    assert "not comparable" in verdict[ids["fp16_sel"]] and "embedding=extended" in verdict[ids["fp16_sel"]]
    assert verdict[ids["fp16"]] == "RTFx advantage inside the measured spread over repeats"
    assert selection.recommended_run_id is None
    assert "inside the measured min-max spread" in selection.message
    done = report.scored(sweep.runs).set_index("run_id")
    assert not done.loc[ids["int8"], "on_front"] and not done.loc[ids["flagged"], "on_front"]
    assert done.loc[ids["fp16_sel"], "on_front"]
    markdown = report.build_report(sweep, selection).document.markdown()
    # no speed of a proxy beside a configuration's own: the axis medians leave it out, the timing table names it
    effects = report.axis_effects(sweep.runs, sweep.axes).set_index(["axis", "value"])
    assert np.isnan(effects.loc[("quant", "int8"), "rtfx_median"]) and effects.loc[("quant", "int8"), "timed_runs"] == 0
    assert effects.loc[("quant", "fp32"), "rtfx_median"] == pytest.approx(2.0)
    labels = report.timing_table(sweep.runs).set_index("run_id")["label"]
    assert labels[ids["int8"]].endswith("[timing proxy]") and "[timing" not in labels[ids["fp32"]]
    assert "backend(s) `onnxruntime`; numerics source(s) `onnxruntime`" in markdown
    assert "## Compared without speed" in markdown and PROXY_REASON in markdown
    assert "never on the front: `quant=int8` (timing proxy), `quant=int4` (parity flagged)" in markdown


def test_sweep_with_no_finished_child_has_no_baseline(store):
    parent, _ = store.sweep([{"name": "a", "overrides": ["quant=fp32"], "status": "FAILED"},
                             {"name": "b", "overrides": ["quant=int8"], "status": "KILLED"}], "all-failed")
    _, selection = select(store, parent)
    assert selection.baseline_run_id is None and selection.recommended_run_id is None
    assert "no configuration qualifies" in selection.message


def test_latest_parent_is_the_default(store, mixed):
    parent, _ = store.sweep([{"name": "x", "overrides": ["quant=fp32"], "der": 0.1, "rtfx": 1.0}], "latest")
    assert report.load_sweep(EXPERIMENT, None, store.uri).parent_run_id == parent


def test_parity_status():
    assert report.parity_status({"metrics.parity_ok": 1.0, "tags.diaropt.parity_flag": "ok"}) == "ok"
    assert report.parity_status({"metrics.parity_ok": 0.0}) == "flagged"
    flagged_but_ok = {"metrics.parity_ok": 1.0, "tags.diaropt.parity_flag": "below_cosine_floor"}
    assert report.parity_status(flagged_but_ok) == "flagged"  # an inconsistent record is not trusted
    assert report.parity_status({"metrics.parity_ok": math.nan}) == "unchecked"
    assert report.parity_status({}) == "unchecked"


# ----------------------------------------------------------------------------------------------
# Pareto front, axis effects
# ----------------------------------------------------------------------------------------------


def test_pareto_front():
    der = [0.10, 0.12, 0.11, 0.09, 0.20, np.nan, 0.10]
    rtfx = [2.0, 3.0, 1.5, 1.0, 8.0, 9.0, 2.0]
    # 0 and 6 are duplicates (both kept); 2 is beaten by 0; NaN never counts
    assert report.pareto_front(der, rtfx).tolist() == [True, True, False, True, True, False, True]
    assert report.pareto_front([], []).tolist() == []
    with pytest.raises(ValueError):
        report.pareto_front([0.1], [1.0, 2.0])


def test_pareto_and_axis_effects_of_a_sweep(store, mixed):
    parent, ids = mixed
    sweep = report.load_sweep(EXPERIMENT, parent, store.uri)
    done = report.scored(sweep.runs)
    on_front = set(done.loc[done["on_front"], "run_id"])
    assert on_front == {ids["fp32_per_frame"], ids["cached"]}  # the cached run beats every other on both
    effects = report.axis_effects(sweep.runs, sweep.axes).set_index(["axis", "value"])
    assert effects.loc[("quant", "fp32"), "runs"] == 2
    assert effects.loc[("quant", "fp32"), "rtfx_median"] == pytest.approx(1.5)
    assert effects.loc[("frame_extraction", "strided"), "der_median"] == pytest.approx(0.101)
    timings = report.timing_table(sweep.runs).set_index("run_id")
    assert timings.loc[ids["fp16"], "preprocessing+embedding"] == pytest.approx(30 / 3 - 2.9 + 0.3)
    assert timings.loc[ids["fp16"], ["total", "total_min", "repeats"]].tolist() == pytest.approx([10.0, 9.0, 3])


# ----------------------------------------------------------------------------------------------
# Preset, report files, MLflow artifacts and tags
# ----------------------------------------------------------------------------------------------


def test_preset_composes_to_the_same_axis_values(tmp_path):
    row = {"tags.diaropt.overrides": "quant=int8 frame_extraction=batched dataset=sample dataset.max_duration_s=12 "
                                     "clustering.threshold=0.5 tracking.tracking_uri=sqlite\\:////x.db "
                                     "hydra.sweep.dir=/tmp/s",
           "params.quant.mode": "int8", "params.frame_extraction.mode": "batched", "params.dataset.name": "sample",
           "params.dataset.max_duration_s": "12.0", "params.clustering.threshold": "0.5",
           "params.fusion.clean_frames_in_graph": "False"}
    text = report.preset_yaml(row, "recommended_test")
    assert text.startswith("# @package _global_\n")
    assert "  - override /quant: int8" in text and "  - override /dataset: sample" in text
    assert "tracking" not in text and "hydra" not in text
    preset = tmp_path / "experiment" / "recommended_test.yaml"
    preset.parent.mkdir()
    preset.write_text(text)
    compared, mismatches = report.compare_preset(preset, row)
    assert compared == 6 and mismatches == []
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=recommended_test"])
    assert (cfg.quant.mode.value, cfg.frame_extraction.mode.value, cfg.dataset.name) == ("int8", "batched", "sample")
    assert cfg.experiment_preset == "recommended_test"
    # a preset built on another preset keeps that preset's choices and overrides one of them
    row["tags.diaropt.overrides"] = "experiment=seed_plan quant=int8"
    preset.write_text(report.preset_yaml(row, "recommended_test"))
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=recommended_test"])
    assert (cfg.quant.mode.value, cfg.frame_extraction.mode.value, cfg.fusion.clean_frames_in_graph) == (
        "int8", "batched", True)
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    installed = report.install_preset(preset, tmp_path / "conf")
    assert installed == tmp_path / "conf" / "experiment" / "recommended_test.yaml" and installed.is_file()


def test_report_files_artifacts_and_recommended_tag(store, mixed, tmp_path):
    parent, ids = mixed
    _, paths = report.make_report(EXPERIMENT, parent, store.uri, out_dir=tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "**Recommended: `quant=fp16,frame_extraction=strided`**" in markdown
    assert "python experiments/sweep.py quant=fp16 frame_extraction=strided" in markdown
    assert "Preset check: `experiment=recommended_" in markdown and "keys compared" in markdown
    html = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert {p.name for p in paths["html"].parent.glob("*.png")} == {"pareto.png", "timing.png", "axes.png"}
    assert paths["preset"].name == f"recommended_{parent[:8]}.yaml"
    client = store.client
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.md", "report/report.html",
                                                                          "report/pareto.png", "report/conf"}
    assert client.get_run(ids["fp16"]).data.tags["diaropt.recommended"] == "true"
    assert client.get_run(parent).data.tags["diaropt.recommended_run_id"] == ids["fp16"]
    # a new verdict moves the tag: only one child of the sweep carries it
    report.make_report(EXPERIMENT, parent, store.uri, out_dir=tmp_path / "out2", allow_unchecked=True)
    tagged = [name for name, run_id in ids.items() if client.get_run(run_id).data.tags.get("diaropt.recommended")]
    assert tagged == ["pal8_unchecked"]


# ----------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------


def run_notebook(tmp_path: Path, **parameters: object) -> list:
    """Execute notebooks/compare_runs.ipynb with papermill-style injected parameters; returns its outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO_ROOT / "notebooks/compare_runs.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # Pareto front, timing breakdown, axis effects
    return outputs


def test_notebook_runs_against_the_tracking_store(store, mixed, tmp_path):
    parent, ids = mixed
    outputs = run_notebook(tmp_path, experiment_name=EXPERIMENT, parent_run_id=parent, tracking_uri=store.uri)
    text = "".join(o.get("text", "") for o in outputs)
    assert f"recommended: quant=fp16,frame_extraction=strided (run {ids['fp16']})" in text
    assert "python experiments/sweep.py quant=fp16 frame_extraction=strided" in text
    assert "# @package _global_" in text


# ----------------------------------------------------------------------------------------------
# End to end on a real tiny sweep (slow: the sweep builds and runs the models, ~45 s warm, minutes cold)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_command_on_a_real_sweep(tiny_sweep, tmp_path):
    uri, experiment = tiny_sweep
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/report.py"), experiment,
                           "--tracking-uri", uri, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("recommended: quant=")
    markdown = (out / "report.md").read_text()
    assert "composes to the recommended run's logged configuration" in markdown, markdown
    sweep = report.load_sweep(experiment, None, uri)
    assert set(sweep.runs["parity"]) <= {"ok", "flagged"}  # parity is on by default: every child was checked
    assert set(sweep.runs["metrics.repeats"]) == {3.0}  # repeats=null: timed (target) jobs run 3 passes
    assert "| ok |" in markdown or "| flagged |" in markdown
    tagged = sweep.runs[sweep.runs["tags.diaropt.recommended"] == "true"]
    assert len(tagged) == 1
    preset = next((out / "conf" / "experiment").glob("recommended_*.yaml"))
    cfg = compose([f"hydra.searchpath=[file://{preset.parent.parent}]", f"experiment={preset.stem}"])
    row = tagged.iloc[0]
    assert cfg.quant.mode.value == row["params.quant.mode"] and cfg.dataset.name == "sample"
    assert cfg.dataset.max_duration_s == float(row["params.dataset.max_duration_s"])


@pytest.mark.slow
def test_notebook_runs_against_a_real_sweep(tiny_sweep, tmp_path):
    uri, experiment = tiny_sweep
    outputs = run_notebook(tmp_path, experiment_name=experiment, tracking_uri=uri)
    text = "".join(o.get("text", "") for o in outputs)
    assert "python experiments/sweep.py" in text and "# @package _global_" in text


def test_parent_comparison_plot_totals_are_the_reports_time_total():
    """summary/comparison.png annotates each bar with time_total_s (median over repeats of each repeat's
    total), the report's number, not the sum of the per-stage medians."""
    import pandas as pd

    from diaropt.figures import comparison_figure

    frame = pd.DataFrame({"metrics.rtfx": [2.0], "metrics.der_pyannote": [0.3], "metrics.time_segmentation_s": [1.0],
                          "metrics.time_embedding_s": [2.0], "metrics.time_total_s": [3.5],
                          "metrics.time_total_s_min": [3.2], "metrics.time_total_s_max": [4.0],
                          "metrics.repeats": [3.0]})
    figure = comparison_figure(frame, ["quant=fp16"], "rtfx", "der_pyannote")
    texts = [t.get_text().strip() for ax in figure.axes for t in ax.texts]
    assert any(t.startswith("3.50 s") and "median of 3" in t for t in texts), texts
    assert not any(t.startswith("3.00 s") for t in texts)
