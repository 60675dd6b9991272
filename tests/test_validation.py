"""Issue 17: every value checked against the schema before any work, and the dataset checked once per
sweep before any model is built. docs/robustness.md lists the cases with the observed behaviour."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf, open_dict

from diaropt.config import CONF_DIR, REPO_ROOT, Config, compose, job_metric_names, validate
from diaropt.data.annotations import DataError

SR = 16000


@pytest.fixture(scope="module")
def default_cfg():
    return compose([])


# ------------------------------------------------------------------------------------------------
# values: derived from the schema, cross-field rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["clustering.threshold=7"], r"clustering.threshold = 7.0: must be in \[0, 2\]"),
    (["clustering.min_speakers=3", "clustering.max_speakers=2"], r"min_speakers must be <= max_speakers"),
    (["clustering.num_speakers=5", "clustering.max_speakers=3"], r"clustering.num_speakers = 5: must be within"),
    (["dataset.max_files=-1"], r"dataset.max_files = -1: must be >= 1"),
    (["embedding.min_num_clean_frames=-1"], r"embedding.min_num_clean_frames = -1: must be >= 0"),
    (["postprocess.min_duration_on_s=-0.5"], r"postprocess.min_duration_on_s = -0.5: must be >= 0 s"),
    (["backend.num_threads=-2"], r"backend.num_threads = -2: must be >= 0"),
    (["torch_threads=-1"], r"torch_threads = -1: must be >= 0"),
    (["clustering=ahc", "clustering.threshold=0"], r"must be > 0 with clustering.method=ahc"),
    (["objectives=[der_pyanote]"], r"'der_pyanote' is not a metric a job returns; did you mean der_pyannote"),
    (["objectives=[der_pyannote,parity_ok]", "parity.enabled=false"], r"'parity_ok' .*parity.enabled=false"),
    (["objectives=[]"], r"objectives = \[\]"),
    (["backend.ort_optimization_level=max"], r"must be one of disable, basic, extended, all"),
])
def test_each_bad_value_is_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compose(overrides)


def _bounded_fields(schema: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    found = []
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[spec.name]):
            found += _bounded_fields(hints[spec.name], f"{prefix}{spec.name}.")
        elif spec.metadata:
            found.append((f"{prefix}{spec.name}", spec))
    return found


def _violation(spec: dataclasses.Field) -> typing.Any:
    limits = spec.metadata
    if "choices" in limits:
        return "not-a-choice"
    if "ge" in limits:
        return limits["ge"] - 1
    if "gt" in limits:
        return limits["gt"]
    if "le" in limits:
        return limits["le"] + 1
    return limits["lt"]


def test_every_bounded_field_of_the_schema_is_checked(default_cfg) -> None:
    """Derived from the schema: every field with a range or choice set refuses a value outside it."""
    bounded = _bounded_fields()
    names = {key for key, _ in bounded}
    assert {"clustering.threshold", "dataset.max_files", "embedding.min_num_clean_frames",
            "postprocess.min_duration_on_s", "backend.num_threads", "segmentation.step_s", "repeats"} <= names
    for key, spec in bounded:
        cfg = default_cfg.copy()
        with open_dict(cfg):
            OmegaConf.update(cfg, key, _violation(spec), merge=False)
        with pytest.raises(ValueError, match=re.escape(f"{key} = ")):
            validate(cfg)
    validate(default_cfg)  # the defaults themselves pass


@pytest.mark.parametrize("overrides", [
    *[[f"experiment={p.stem}"] for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))],
    *[[f"{group.name}={option.stem}"] for group in sorted(CONF_DIR.iterdir())
      if group.is_dir() and group.name in ("quant", "frame_extraction", "fusion", "clustering", "embedding",
                                           "backend", "compute_unit")
      for option in sorted(group.glob("*.yaml"))],
])
def test_every_shipped_option_and_preset_is_valid(overrides: list[str]) -> None:
    """The limits are not tighter than what the repository itself ships."""
    compose(overrides)


def test_objective_names_are_the_metrics_a_job_returns(tiny_sweep) -> None:
    """The names ``objectives`` may use (derived from the scorer, timer and parity code) are all logged
    by a real job, so a valid objective is never NaN for want of its metric."""
    import mlflow

    uri, experiment = tiny_sweep
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    children = [r for r in client.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    assert children
    logged = set(children[0].data.metrics)
    missing = job_metric_names(parity_enabled=True) - logged - {"array_cache_hits"}
    assert not missing, missing


# ------------------------------------------------------------------------------------------------
# whole sweeps: one bad value anywhere -> exit 2 in seconds, nothing built
# ------------------------------------------------------------------------------------------------

TINY = ["dataset=sample", "dataset.max_duration_s=12", "segmentation.batch_size=4", "embedding.batch_size=4",
        "parity.enabled=false"]


def _sweep(tmp_path: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "experiments/sweep.py"), "-m", *TINY,
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment_name=test",
               f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={tmp_path}/cache", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _assert_nothing_started(tmp_path: Path, result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "no job was started" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep" / ".diaropt").exists()
    assert not (tmp_path / "cache").exists()  # no model was built, no array cached


_SEARCH = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
objectives: [der_pyannote, rtfx]
hydra:
  sweeper:
    direction: [minimize, maximize]
    n_trials: 2
    params:
      embedding.batch_size: choice(4, 8)
      clustering.threshold: interval(0.3, 2.5)
"""


@pytest.mark.parametrize(("overrides", "message"), [
    (["clustering.threshold=0.5,7"], r"clustering.threshold=7: invalid configuration: clustering.threshold = 7.0"),
    (["clustering.max_speakers=2", "clustering.min_speakers=1,3"], r"min_speakers must be <= max_speakers"),
    (["objectives=[der_pyanote]", "quant=fp32,fp16"], r"'der_pyanote' is not a metric a job returns"),
    (["hydra.searchpath=[file://{tmp}/conf]", "experiment=bad_search"],
     r"clustering.threshold=2.5: invalid configuration: clustering.threshold = 2.5: must be in \[0, 2\]"),
])
def test_a_sweep_with_one_bad_value_anywhere_exits_2_with_nothing_built(tmp_path: Path, overrides: list[str],
                                                                        message: str) -> None:
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "bad_search.yaml").write_text(_SEARCH)  # an Optuna search space
    result = _sweep(tmp_path, *[o.format(tmp=tmp_path) for o in overrides])
    _assert_nothing_started(tmp_path, result, message)


# ------------------------------------------------------------------------------------------------
# the dataset, once per sweep, before any model is built
# ------------------------------------------------------------------------------------------------


def _speech(assets, seconds: float) -> np.ndarray:
    audio, rate = sf.read(assets["sample"] / "sample.wav", dtype="float32")
    assert rate == SR
    return audio[: int(seconds * SR)]


def _folder(tmp_path: Path, assets, files: dict[str, tuple[float, float]]) -> tuple[Path, Path]:
    """``uri -> (audio seconds, reference end seconds)``: audio cut from ``sample``, one turn to the end."""
    audio_dir, rttm_dir = tmp_path / "audio", tmp_path / "rttm"
    audio_dir.mkdir(parents=True)
    rttm_dir.mkdir(parents=True)
    for uri, (audio_s, reference_end_s) in files.items():
        sf.write(audio_dir / f"{uri}.wav", _speech(assets, audio_s), SR)
        (rttm_dir / f"{uri}.rttm").write_text(
            f"SPEAKER {uri} 1 0.500 {reference_end_s - 0.5:.3f} <NA> <NA> A <NA> <NA>\n")
    return audio_dir, rttm_dir


def test_a_reference_past_the_end_of_its_audio_is_refused_naming_the_file(tmp_path: Path, assets,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from diaropt.data.checks import check_dataset
    from diaropt.data.datasets import load_folder_dataset

    audio_dir, rttm_dir = _folder(tmp_path, assets, {"good": (6, 6), "rounding": (6, 6.2), "long": (3, 30)})
    (audio_dir / "notes.wav").write_text("meeting notes, not audio")
    (rttm_dir / "notes.rttm").write_text("SPEAKER notes 1 0 1 <NA> <NA> A <NA> <NA>\n")
    dataset = load_folder_dataset(audio_dir, rttm_dir)
    with caplog.at_level(logging.WARNING, logger="diaropt.data.checks"), pytest.raises(DataError) as error:
        check_dataset(dataset)
    message = str(error.value)
    assert message.startswith("dataset 'folder': 2 of 4 file(s) cannot be used")
    assert f"{audio_dir / 'long.wav'}: the reference of uri 'long' ends at 30.000 s but the audio lasts 3.000 s" \
        in message
    assert f"{audio_dir / 'notes.wav'}: not a readable audio file" in message  # every bad file named at once
    assert "rounding" in caplog.text and "ends 0.200 s after the audio" in caplog.text  # small: a warning
    # cropping the job to the first 2 s crops the reference too: nothing unscorable remains
    ok = load_folder_dataset(*_folder(tmp_path / "ok", assets, {"long": (3, 30)}))
    assert check_dataset(ok, max_duration_s=2.0) == []


def test_a_bad_dataset_stops_the_sweep_before_any_model_is_built(tmp_path: Path, assets) -> None:
    audio_dir, rttm_dir = _folder(tmp_path, assets, {"short": (3, 30)})
    result = _sweep(tmp_path, "dataset=folder", f"dataset.audio_dir={audio_dir}", f"dataset.rttm_dir={rttm_dir}",
                    "dataset.max_duration_s=null", "quant=fp32,fp16")
    _assert_nothing_started(tmp_path, result, re.escape(f"{audio_dir / 'short.wav'}: the reference of uri 'short' "
                                                        "ends at 30.000 s but the audio lasts 3.000 s"))


def test_the_dataset_of_a_sweep_is_checked_once(monkeypatch: pytest.MonkeyPatch, assets) -> None:
    """Four jobs on one dataset: one load and one check, not one per job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import diaropt.data.checks as checks
    from diaropt.config import register_configs
    from diaropt.sweep import validate_sweep

    calls: list[str] = []
    original = checks.check_dataset
    monkeypatch.setattr(checks, "check_dataset",
                        lambda dataset, *args: calls.append(dataset.name) or original(dataset, *args))
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = hydra_compose("config", overrides=["dataset=sample"], return_hydra_config=True)
        with open_dict(config):  # what a multirun's parent sees: the sweep's overrides
            config.hydra.overrides.task = ["dataset=sample", "clustering.threshold=0.4,0.5", "quant=fp32,fp16"]
        assert validate_sweep(config) == 4
    assert calls == ["sample"]


@pytest.mark.parametrize(("override", "allowed"), [("segmentation.sinc_shared=maybe", "allowed: true, false, null"),
                                                   ("backend.ort_force_spinning_stop=x", "allowed: true, false")])
def test_a_bad_bool_override_says_why_and_what_is_allowed(override: str, allowed: str) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as caught:
        compose([override])
    message = str(caught.value)
    assert override in message and "is not a valid bool" in message and message.endswith(allowed)


def test_a_missing_group_option_is_one_line_with_the_options() -> None:
    """``quant=int9``: Hydra's option list on one line, without its config search path; still a
    ``MissingConfigException`` (an ``OSError`` too) for callers that catch it."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as caught:
        compose(["quant=int9"])
    message = str(caught.value)
    assert "\n" not in message and "search path" not in message
    assert message.startswith("In 'config': Could not find 'quant/int9'; available options in 'quant': ")
    assert {"fp32", "int8", "w8a8"} <= set(message.split(": ")[-1].split(", "))


@pytest.mark.parametrize(("override", "suggested"), [("clustering.treshold=0.5", "clustering.threshold"),
                                                     ("segmentation.step=2", "segmentation.step_s"),
                                                     ("nosuch.key=1", None)])
def test_an_unknown_key_is_one_line_with_close_keys_not_an_append_hint(override: str, suggested: str | None) -> None:
    """A key the schema lacks: named in one line, with close schema keys; not Hydra's '+key=value'
    hint (an appended key is read by nothing)."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as caught:
        compose([override])
    message = str(caught.value)
    key = override.split("=")[0]
    assert "\n" not in message and "+" not in message and message.startswith(f"Could not override '{key}': Key ")
    if suggested:
        assert message.endswith("?") and suggested in message.split("did you mean ")[1]
    else:
        assert "did you mean" not in message


def test_an_override_without_a_value_is_one_line() -> None:
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException) as caught:
        compose(["segmentation"])
    assert "\n" not in str(caught.value) and str(caught.value).startswith("Error parsing override 'segmentation'; ")


@pytest.mark.parametrize("override", ["quant=int9", "clustering.treshold=0.5", "segmentation.sinc_shared=maybe",
                                      "segmentation.step_s=abc", "segmentation", "clustering.threshold=1,2",
                                      "+clustering.treshold=0.5"])
def test_diarize_says_a_bad_override_in_one_line_and_writes_nothing(tmp_path: Path, capsys, override: str) -> None:
    from diaropt.__main__ import main

    assert main(["diarize", str(tmp_path / "x.wav"), "--out", str(tmp_path / "out"), "--no-progress", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad configuration override: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("under", ["", "sub/deeper"])
def test_diarize_refuses_an_out_that_is_a_file_in_one_line_before_any_build(tmp_path: Path, capsys, monkeypatch,
                                                                            under: str) -> None:
    """``--out`` naming a file (or a folder under one): exit 2 with one line before the models are built
    (was a FileExistsError / NotADirectoryError traceback after the build)."""
    import diaropt.variants.build as build
    from diaropt.__main__ import main

    monkeypatch.setattr(build, "build_models", lambda cfg: pytest.fail("built despite an unusable --out"))
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(SR, dtype=np.float32), SR)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = blocker / under if under else blocker
    assert main(["diarize", str(audio), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: ") and "is a file, not a folder" in err[0]
    assert blocker.read_text() == ""


@pytest.mark.parametrize(("override", "suggested"), [("+segmentation.step=2", "segmentation.step_s"),
                                                     ("+clustering.treshold=0.5", "clustering.threshold"),
                                                     ("+nosuch=1", None)])
def test_an_appended_key_the_schema_lacks_is_refused(override: str, suggested: str | None) -> None:
    """``+key=value`` composes (Hydra opens the node for it) but nothing reads the key: a typo would run
    the default silently. ``validate`` names it (with close schema keys); Hydra's own keys stay open."""
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ValueError, match=re.escape(f"invalid configuration: {key}: not a configuration key")) as caught:
        compose([override])
    assert (f"did you mean {suggested}" in str(caught.value)) if suggested else "did you mean" not in str(caught.value)
    assert compose(["+hydra.job.env_set.DIAROPT_X=1"]).hydra.job.env_set.DIAROPT_X == "1"
