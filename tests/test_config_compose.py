"""Every preset and every option of every config group composes, validates and instantiates; every
clustering / dataset / pipeline key reaches the object built from it (nothing logged is unused)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diaropt.config import CONF_DIR, compose
from diaropt.data.annotations import DataError
from diaropt.pipeline.clustering import BaseClustering
from diaropt.pipeline.diarization import PipelineParams
from diaropt.runner import (
    DATASET_RUNNER_KEYS,
    PIPELINE_PARAM_KEYS,
    clustering_from_config,
    dataset_from_config,
    params_from_config,
)

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "local"))
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
LIBRISPEECH = Path("/work/shared/data/librispeech_test-other")


def test_every_group_has_options() -> None:
    assert {"clustering", "dataset", "experiment", "quant"} <= set(GROUPS)
    assert ("clustering", "vbx") in OPTIONS and ("dataset", "dev") in OPTIONS and ("dataset", "test") in OPTIONS


@pytest.mark.parametrize(("group", "option"), [o for o in OPTIONS if o[0] != "dataset"],
                         ids=lambda v: str(v))
def test_option_composes_and_instantiates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    assert isinstance(clustering_from_config(cfg), BaseClustering)
    params = params_from_config(cfg)
    for name, key in PIPELINE_PARAM_KEYS.items():
        if key is not None:
            assert getattr(params, name) == OmegaConf.select(cfg, key), name


def test_pipeline_param_keys_cover_every_field() -> None:
    assert set(PIPELINE_PARAM_KEYS) == {f.name for f in dataclasses.fields(PipelineParams)}
    cfg = compose([])
    for key in PIPELINE_PARAM_KEYS.values():
        assert key is None or OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "clustering"])
def test_every_clustering_key_reaches_the_object(option: str) -> None:
    cfg = compose([f"clustering={option}", "clustering.num_speakers=3", "clustering.min_active_ratio=0.3"])
    clustering = clustering_from_config(cfg)
    node = OmegaConf.to_container(cfg.clustering, resolve=True, enum_to_str=True)
    assert type(clustering).name == node["method"]
    for key, value in node.items():
        if key in ("_target_", "method") or value is None:
            continue
        assert getattr(clustering, key) == value, f"clustering.{key}={value} not used by {option}"
    # a key the variant does not have is an error, not a silently dropped value
    foreign = {"ahc": "clustering.ema_alpha=0.2", "vbx": "clustering.min_cluster_size=3",
               "online_ema": "clustering.fa=0.1"}[option]
    with pytest.raises(TypeError, match=foreign.split(".")[1].split("=")[0]):
        clustering_from_config(compose([f"clustering={option}", foreign]))


def test_clustering_method_and_target_cannot_disagree() -> None:
    with pytest.raises(ValueError, match="method"):
        clustering_from_config(compose(["clustering=ahc", "clustering.method=online_ema"]))


_DATASET_OVERRIDES = {
    "folder": lambda tmp: [f"dataset.audio_dir={tmp}", f"dataset.rttm_dir={tmp}"],
    "protocol": lambda tmp: ["dataset.protocol=Nope.SpeakerDiarization.None"],
}


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "dataset"])
def test_every_dataset_option_instantiates(option: str, tmp_path: Path) -> None:
    overrides = [f"dataset={option}", f"paths.cache_dir={tmp_path / 'cache'}"]
    if "synthetic" in option or option in ("dev", "test"):
        if not LIBRISPEECH.is_dir():
            pytest.skip(f"{LIBRISPEECH} (LibriSpeech readers for the synthetic conversations) not on this machine")
        overrides.append(f"dataset.source_dir={LIBRISPEECH}")
    if option in _DATASET_OVERRIDES:
        folder = tmp_path / "files"
        folder.mkdir()
        (folder / "a.wav").write_bytes(b"")
        (folder / "a.rttm").write_text("SPEAKER a 1 0.0 1.0 <NA> <NA> spk <NA> <NA>\n")
        overrides += _DATASET_OVERRIDES[option](folder)
    cfg = compose(overrides)
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    if option == "protocol":  # instantiated: the loader itself reports the unknown protocol
        pytest.importorskip("pyannote.database")
        with pytest.raises(DataError, match="Nope.SpeakerDiarization.None"):
            dataset_from_config(cfg)
        return
    try:
        dataset = dataset_from_config(cfg)
    except Exception as error:  # AMI / sample come from the pinned assets: offline without a cache
        if "asset" in type(error).__name__.lower() or "DIAROPT_OFFLINE" in str(error):
            pytest.skip(f"assets unavailable: {error}")
        raise
    assert len(dataset) >= 1
    if option in ("dev", "test"):
        assert {item.uri for item in dataset} >= set(dataset_from_config(compose(
            [f"dataset=ami_{option}", f"paths.cache_dir={tmp_path / 'cache'}"])).uris)


def test_dataset_key_the_loader_does_not_take_is_an_error() -> None:
    with pytest.raises(TypeError, match="num_files"):
        dataset_from_config(compose(["dataset=ami_mini", "dataset.num_files=3"]))


def test_dev_and_test_presets_exist_and_differ() -> None:
    dev, test = compose(["dataset=dev"]).dataset, compose(["dataset=test"]).dataset
    assert (dev.split, test.split) == ("dev", "test") and dev._target_ == test._target_


@pytest.mark.parametrize("overrides, macos, backend, unit", [
    ([], False, "onnxruntime", "cpu_only"),               # the default off macOS: ONNX Runtime's CPU path
    ([], True, "coreml", "all"),                          # the default on a Mac: Core ML as an app ships it
    (["backend=coreml"], False, "coreml", "all"),
    (["backend=torch"], False, "torch", "cpu_only"),
    (["backend=coreml", "compute_unit=cpu_and_ne"], False, "coreml", "cpu_and_ne"),  # an explicit unit wins
])
def test_compute_unit_auto_resolves_per_backend(overrides, macos, backend, unit, monkeypatch):
    from diaropt.variants import build
    from diaropt.variants.build import _value, resolve_backend, resolve_compute_unit

    monkeypatch.setattr(build, "is_macos", lambda: macos)
    cfg = compose(overrides)
    resolved_backend = resolve_backend(_value(cfg.backend.name))
    assert resolved_backend == backend
    assert resolve_compute_unit(_value(cfg.compute_unit.name), resolved_backend) == unit


def test_librispeech_source_defaults_beside_the_checkout_whatever_the_working_directory(tmp_path, monkeypatch):
    """``${repo_sibling:...}``: ``../shared/...`` of the checkout, not of the current directory (benchmarks/
    scripts run from their folder); ``DIAROPT_SYNTHETIC_SOURCE`` still wins."""
    from diaropt.config import REPO_ROOT

    monkeypatch.delenv("DIAROPT_SYNTHETIC_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = str(REPO_ROOT.parent / "shared" / "data" / "librispeech_test-other")
    assert compose(["dataset=dev"]).dataset.source_dir == expected
    assert compose(["dataset=synthetic"]).dataset.source_dir == expected
    monkeypatch.setenv("DIAROPT_SYNTHETIC_SOURCE", str(tmp_path))
    assert compose(["dataset=test"]).dataset.source_dir == str(tmp_path)
