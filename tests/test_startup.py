"""Start-up (issue 19): the run path imports no torch, a cache hit builds no module, and the
torch-free shapes of ``models.constants`` are the ones the modules' forward passes produce."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diaropt.models.constants import (CHUNK_SAMPLES, EMBEDDING_GEOMETRY, NUM_FRAMES, NUM_LOCAL_SPEAKERS,
                                      NUM_POWERSET_CLASSES, num_fbank_frames)


@pytest.mark.parametrize("name", sorted(EMBEDDING_GEOMETRY))
def test_trunk_geometry_matches_the_forward(name):
    """``EmbeddingGeometry`` (what ``tiled_stage_specs`` declares) = the trunk's real output shape,
    on chunk lengths with odd and even fbank frame counts."""
    from diaropt.models.embedding import SpeakerEmbedding
    from diaropt.variants.fusion import TrunkFeatures

    geometry = EMBEDDING_GEOMETRY[name]
    embedding = SpeakerEmbedding(name, "strided").eval()
    assert embedding.embedding_dim == geometry.embedding_dim
    assert embedding.network.time_stride == geometry.time_stride
    assert embedding.fbank.frame_shift * embedding.network.time_stride == geometry.frame_hop_samples
    assert (embedding.fbank.frame_length, embedding.fbank.frame_shift) == (geometry.frame_length, geometry.frame_shift)
    trunk = TrunkFeatures(embedding)
    lengths = [16000, 16000 + 160, 16000 + 3 * 160 + 7] + ([CHUNK_SAMPLES] if name == "campplus" else [])
    for num_samples in lengths:
        with torch.no_grad():
            frames = trunk(torch.zeros(1, num_samples))
        assert tuple(frames.shape) == (1, geometry.trunk_channels, geometry.trunk_frames(num_samples)), num_samples
        assert embedding.fbank.num_frames(num_samples) == geometry.num_fbank_frames(num_samples)


def test_segmentation_constants_match_the_forward():
    from diaropt.models.segmentation import PyanNet

    assert PyanNet.num_output_frames(CHUNK_SAMPLES) == NUM_FRAMES == 589
    with torch.no_grad():
        out = PyanNet().eval()(torch.zeros(1, 1, CHUNK_SAMPLES))
    assert tuple(out.shape) == (1, NUM_FRAMES, NUM_POWERSET_CLASSES)
    assert num_fbank_frames(CHUNK_SAMPLES) == 998 and NUM_LOCAL_SPEAKERS == 3


def test_pinned_weights_digest_without_loading_equals_the_loaded_digest(assets):
    """The cache key's weights sha256 taken from the pinned asset (no torch) is the digest the
    loaded checkpoint has, so every existing cache entry keeps its key."""
    from diaropt.config import compose
    from diaropt.variants import build

    cfg = compose([])
    _, _, lazy_digests, dim = build._model_sources(cfg)
    _, loaded_digests, loaded_dim = build._torch_modules(cfg)
    assert lazy_digests == loaded_digests and dim == loaded_dim


_CHILD = r"""
import json, sys
from pathlib import Path
import diaropt.__main__, diaropt.runner
from diaropt.config import compose
from diaropt.variants import build

payloads = []
def fake_cached_build(cache_root, payload, filename, make):  # a cache hit: the builder is never called
    payloads.append(payload)
    return Path(cache_root) / "x" / filename, {"content_key": build.content_key(payload), "cache_hit": 1}
build.cached_build = fake_cached_build
def refuse(cfg):
    raise AssertionError("torch modules were built on a cache hit")
build._torch_modules = refuse
cfg = compose(sys.argv[1:])
built = build.build_models(cfg)
print(json.dumps({"payloads": payloads, "modules": sorted(m for m in ("torch", "onnx", "coremltools",
      "pyannote.metrics", "mlflow") if m in sys.modules), "kinds": [m.kind for m in built.stages]}))
"""


@pytest.mark.parametrize("overrides", [["backend=onnxruntime"],
                                       ["backend=onnxruntime", "embedding.tiled_trunk=false", "fusion=on"]])
def test_a_cache_hit_imports_no_torch_and_builds_no_module(overrides, tmp_path, assets):
    done = subprocess.run([sys.executable, "-c", _CHILD, *overrides, f"paths.cache_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] == [], f"imported on the run path: {result['modules']}"
    assert result["payloads"] and all(p["weights_sha256"] for p in result["payloads"])


def test_cache_keys_are_those_of_the_module_path(tmp_path, assets, monkeypatch):
    """The payloads (hence cache keys) of the default configuration equal the ones computed from the
    loaded modules, as before the lazy path (stage specs from the modules, digests from loading)."""
    from diaropt.config import compose
    from diaropt.variants import build, fusion

    cfg = compose(["backend=onnxruntime", f"paths.cache_dir={tmp_path}"])
    modules, digests, _ = build._torch_modules(cfg)
    plan = fusion.FusionPlan.from_config(cfg, "onnxruntime")
    eager = fusion.stage_specs(plan, modules["segmentation"], modules["embedding"],
                               cfg.segmentation.batch_size, cfg.embedding.batch_size)
    payloads = []

    def fake_cached_build(cache_root, payload, filename, make):
        payloads.append(payload)
        return tmp_path / filename, {"content_key": build.content_key(payload)}

    monkeypatch.setattr(build, "cached_build", fake_cached_build)
    built = build.build_models(cfg)
    assert [p["kind"] for p in payloads] == [s.kind for s in eager]
    for payload, spec in zip(payloads, eager):
        # the sinc split (the ONNX Runtime default) adds the segmentation_sinc front model
        assert payload["weights_sha256"] == digests["segmentation" if spec.kind.startswith("segmentation")
                                                    else "embedding"]
        assert {k: payload[k] for k in spec.variant} == spec.variant
    lazy = {s.kind: s for s in fusion.stage_specs(plan, *build._model_sources(cfg)[:2],
                                                  cfg.segmentation.batch_size, cfg.embedding.batch_size)}
    for spec in eager:
        assert (lazy[spec.kind].inputs, lazy[spec.kind].outputs) == (spec.inputs, spec.outputs)
    assert built.embedding_dim == 192


def test_run_path_modules_import_without_torch():
    code = ("import sys, diaropt.__main__, diaropt.runner, diaropt.variants.build, diaropt.backends.onnxruntime, "
            "diaropt.pipeline.diarization, diaropt.variants.fusion_plan; "
            "print(sorted(m for m in ('torch', 'onnx', 'coremltools', 'pyannote.metrics') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_default_objective_is_a_job_metric():
    """``compose`` skips the objectives check for the default (it imports pyannote.metrics)."""
    from diaropt.config import _DEFAULT_OBJECTIVES, Config, job_metric_names

    assert Config().objectives == _DEFAULT_OBJECTIVES
    assert set(_DEFAULT_OBJECTIVES) <= job_metric_names(True) and set(_DEFAULT_OBJECTIVES) <= job_metric_names(False)


_CLI_CHILD = r"""
import json, sys
import diaropt.__main__ as cli
code = cli.main(sys.argv[1:])
print(json.dumps({"exit": code, "modules": sorted(m for m in ("torch", "matplotlib", "coremltools", "mlflow",
                  "pyannote.metrics") if m in sys.modules)}))
"""


def test_diarize_command_runs_without_torch_or_matplotlib(tmp_path, assets):
    """The whole ``diarize`` command (cache hit or not) leaves out torch, matplotlib (pyannote.core's
    notebook display, ~0.5 s: :mod:`diaropt.lazy_imports`), MLflow and coremltools."""
    import soundfile as sf

    audio = tmp_path / "short.wav"
    samples, rate = sf.read(assets["ami"] / "dev00.wav", dtype="float32")
    sf.write(audio, samples[: 12 * rate], rate)
    done = subprocess.run([sys.executable, "-c", _CLI_CHILD, "diarize", str(audio), "--out", str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "modules": []}
    assert (tmp_path / "out" / "short.rttm").read_text().startswith("SPEAKER short 1 ")


def _fresh_python(code: str) -> list[str]:
    """The whitespace-separated words ``code`` prints in a new interpreter (which must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_pyannote_core_without_pyplot_keeps_its_notebook():
    """After the deferred import, pyannote.core works and ``from pyannote.core import notebook`` is
    still its ``Notebook`` instance (built on first access, with matplotlib imported then)."""
    code = ("import sys; from diaropt.lazy_imports import import_pyannote_core_without_pyplot as f; f(); "
            "before = 'matplotlib' in sys.modules; "
            "from pyannote.core import Annotation, Segment; a = Annotation(uri='u'); a[Segment(0, 1)] = 'A'; "
            "from pyannote.core import notebook; import pyannote.core; "
            "print(before, type(notebook).__name__, pyannote.core.notebook is notebook, 'matplotlib' in sys.modules, "
            "a.labels(), sys.meta_path[0].__class__.__name__ != '_HideMatplotlib')")
    assert _fresh_python(code) == ["False", "Notebook", "True", "True", "['A']", "True"]


def test_pyannote_core_notebook_stays_the_notebook_after_its_submodule_is_imported():
    """``Annotation._repr_png_`` (a notebook's display) imports the submodule ``pyannote.core.notebook``,
    which binds the submodule object to ``pyannote.core.notebook``: after the deferred import it must
    still be the ``Notebook`` instance (``notebook.crop = ...``, ``notebook.reset()``), as after a plain
    import, and ``notebook`` stays in ``pyannote.core.__all__``."""
    code = ("import sys; from diaropt.lazy_imports import import_pyannote_core_without_pyplot as f; core = f(); "
            "from pyannote.core import Annotation, Segment; a = Annotation(uri='u'); a[Segment(0, 1)] = 'A'; "
            "png = a._repr_png_(); import pyannote.core.notebook; "
            "from pyannote.core import notebook; notebook.crop = Segment(0, 2); notebook.reset(); "
            "print(type(core.notebook).__name__, core.notebook is notebook, 'notebook' in core.__all__, "
            "png[:4] == b'\\x89PNG', notebook.crop)")
    assert _fresh_python(code) == ["Notebook", "True", "True", "True", "None"]


def test_pyannote_core_without_matplotlib_has_no_notebook_as_a_plain_import():
    """Without matplotlib, the deferred import leaves ``pyannote.core`` as a plain import does: no
    ``notebook`` attribute (``hasattr`` is False, not an ImportError), none in ``__all__``."""
    code = ("import sys; from diaropt.lazy_imports import _HideMatplotlib, import_pyannote_core_without_pyplot as f; "
            "sys.meta_path.insert(0, _HideMatplotlib()); core = f(); "
            "print(hasattr(core, 'notebook'), 'notebook' in core.__all__)")
    assert _fresh_python(code) == ["False", "False"]
