"""One source of defaults: a library user who builds ``PipelineParams()`` or a clustering variant without
Hydra gets what the default configuration builds (``python experiments/sweep.py`` with no overrides).

``PipelineParams`` reads its defaults from the schema (``diaropt.config``); the clustering variants read
``min_active_ratio`` and VBx's ``chunk_step_s`` from it, and their per-variant values must equal those of
``conf/clustering/<name>.yaml``. Compared here on the composed configuration, so a value set in a YAML
file of a config group (not only the schema's default) counts.
"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from diaropt.config import CONF_DIR, compose
from diaropt.pipeline.clustering import CLUSTERING, VBxClustering, get_clustering
from diaropt.pipeline.diarization import PipelineParams
from diaropt.runner import PIPELINE_PARAM_KEYS, clustering_from_config, params_from_config

CLUSTERING_OPTIONS = sorted(p.stem for p in (CONF_DIR / "clustering").glob("*.yaml"))


def test_pipeline_params_defaults_are_the_default_configuration() -> None:
    cfg = compose([])
    for name, key in PIPELINE_PARAM_KEYS.items():
        if key is not None:
            assert getattr(PipelineParams(), name) == OmegaConf.select(cfg, key), f"PipelineParams.{name} vs {key}"
    assert params_from_config(cfg) == PipelineParams()  # every field, the unconfigurable ones too
    assert {f.name for f in dataclasses.fields(PipelineParams)} == set(PIPELINE_PARAM_KEYS)


@pytest.mark.parametrize("option", CLUSTERING_OPTIONS)
def test_clustering_defaults_are_the_configured_option(option: str) -> None:
    cfg = compose([f"clustering={option}"])
    configured = clustering_from_config(cfg)
    default = CLUSTERING[option]()
    assert type(default) is type(configured)
    node = OmegaConf.to_container(cfg.clustering, resolve=True, enum_to_str=True)
    for key, value in node.items():
        if key not in ("_target_", "method") and value is not None:  # null: the variant has no such key
            assert getattr(default, key) == value, f"{type(default).__name__}().{key} vs clustering.{key} ({option})"
    assert vars(default) == vars(configured)  # every attribute, keys the file leaves null included
    assert vars(get_clustering(option)) == vars(configured)


def test_every_clustering_variant_has_a_config_option() -> None:
    assert set(CLUSTERING) == set(CLUSTERING_OPTIONS)


def test_default_vbx_runs_the_default_fa() -> None:
    """The default Fa (``fa`` x the default chunk step) is the configuration's: 0.1 x 1.5 s (README)."""
    cfg = compose([])
    vbx = VBxClustering()
    assert vbx.chunk_step_s == cfg.segmentation.step_s == PipelineParams().step_s
    assert vbx.effective_fa == pytest.approx(cfg.clustering.fa * cfg.segmentation.step_s)
