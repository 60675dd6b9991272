"""Our powerset decoding, speaker count and reconstruction against pyannote.audio 4.0.7's own functions.

pyannote.audio is not installed (``pip install pyannote.audio`` would pull torchaudio and lightning and
could replace torch 2.13.0+cpu), so its functions are taken from the pinned sdist
(``diaropt.assets``, sha256-verified): ``utils/powerset.py`` and ``utils/signal.py`` import only
installed packages and are loaded as they are; ``Inference.aggregate`` / ``Inference.trim``
(``core/inference.py``), ``SpeakerDiarizationMixin.speaker_count`` / ``to_diarization``
(``pipelines/utils/diarization.py``) and ``SpeakerDiarization.reconstruct``
(``pipelines/speaker_diarization.py``) live in modules that import lightning, so their function
definitions are read from the sdist's source with ``ast`` and executed unchanged in a namespace with
what they use (numpy, pyannote.core). Every test skips with the reason if the sdist or torch is
unavailable.

Deliberate differences (documented, not tested as equal):

* output grid length: pyannote's aggregation adds ``rint(chunk_duration / step) - num_frames + 1``
  frames after the last chunk's frames (5 for segmentation-3.0), all with count 0; ours stops at the
  last chunk frame. Compared on the common frames, and pyannote's extra frames are checked to be 0.
* ties in reconstruction: pyannote picks each frame's top-``count`` clusters with ``np.argsort``
  (default kind, not stable: with numpy's SIMD sorts the order of equal activations depends on the
  CPU), ours with a stable sort (lower cluster index first, the same on every machine). The outputs
  may differ only on frames where the ``count``-th and ``count + 1``-th summed activations are
  equal; there both pick clusters with the same activations (checked), elsewhere they are equal.
"""

from __future__ import annotations

import ast
import importlib.util
import tarfile
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from pyannote.core import SlidingWindow, SlidingWindowFeature

from diaropt.pipeline import preprocessing, reconstruction
from diaropt.pipeline.preprocessing import SEGMENTATION_FRAMES

pytestmark = pytest.mark.slow

_ROOT = "pyannote_audio-4.0.7/src/pyannote/audio"
CHUNK_S, STEP_S, NUM_FRAMES = 10.0, 1.0, 589


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The pinned pyannote.audio 4.0.7 sdist's ``src/pyannote/audio`` folder, extracted."""
    from diaropt.assets import PYANNOTE_SDIST, _download, default_cache_dir

    try:
        archive = Path(_download(PYANNOTE_SDIST, Path(default_cache_dir())))  # sha256-verified
    except Exception as error:
        pytest.skip(f"pyannote.audio 4.0.7 sdist unavailable ({type(error).__name__}: {error})")
    out = tmp_path_factory.mktemp("pyannote_sdist")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_ROOT) and m.name.endswith(".py")]
        tar.extractall(out, members=members, filter="data")
    return out / _ROOT


def _load_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        pytest.skip(f"{path.name} of the pyannote sdist cannot be imported here: {error}")
    return module


def _functions(path: Path, class_name: str, names: tuple[str, ...], namespace: dict) -> dict:
    """The methods ``names`` of ``class_name`` in ``path``, executed from their source in ``namespace``."""
    tree = ast.parse(path.read_text())
    source = path.read_text()
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    found = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []  # staticmethod: called as plain functions here
            code = textwrap.dedent(ast.get_source_segment(source, node))
            code = code[code.index("def "):]  # drop decorator lines kept by get_source_segment
            exec(compile(code, str(path), "exec"), namespace)
            found[node.name] = namespace[node.name]
    missing = set(names) - set(found)
    assert not missing, f"{class_name} in {path} has no {missing}"
    return found


@pytest.fixture(scope="module")
def pyannote(sdist: Path) -> SimpleNamespace:
    """pyannote.audio 4.0.7's functions, unchanged, from the sdist."""
    try:
        import torch  # noqa: F401
    except ImportError as error:
        pytest.skip(f"torch unavailable: {error}")
    powerset = _load_file(sdist / "utils/powerset.py", "pyannote_sdist_powerset")
    namespace: dict = {"np": np, "SlidingWindow": SlidingWindow, "SlidingWindowFeature": SlidingWindowFeature,
                       "Tuple": tuple, "warnings": __import__("warnings")}
    inference = _functions(sdist / "core/inference.py", "Inference", ("aggregate", "trim"), namespace)
    namespace["Inference"] = SimpleNamespace(**inference)
    mixin = _functions(sdist / "pipelines/utils/diarization.py", "SpeakerDiarizationMixin",
                       ("speaker_count", "to_diarization"), namespace)
    diarization = _functions(sdist / "pipelines/speaker_diarization.py", "SpeakerDiarization", ("reconstruct",),
                             namespace)
    pipeline_self = SimpleNamespace(to_diarization=mixin["to_diarization"])
    return SimpleNamespace(Powerset=powerset.Powerset, speaker_count=mixin["speaker_count"],
                           reconstruct=lambda *args: diarization["reconstruct"](pipeline_self, *args))


def _segmentations(num_chunks: int, seed: int) -> np.ndarray:
    """Hard multilabel activations with runs of speech and overlap, (num_chunks, 589, 3) float32."""
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(size=(num_chunks, NUM_FRAMES // 20 + 1, 7)).repeat(20, axis=1)[:, :NUM_FRAMES]
    logprobs[..., 0] += 0.8  # silence is common
    return preprocessing.powerset_to_multilabel(logprobs)


def _chunk_window(num_chunks: int) -> SlidingWindow:
    return SlidingWindow(start=0.0, duration=CHUNK_S, step=STEP_S)


def _frames() -> SlidingWindow:
    return SlidingWindow(start=SEGMENTATION_FRAMES.start, duration=SEGMENTATION_FRAMES.duration,
                         step=SEGMENTATION_FRAMES.step)


def test_powerset_to_multilabel_equals_pyannote(pyannote: SimpleNamespace) -> None:
    import torch

    logprobs = np.random.default_rng(0).normal(size=(6, NUM_FRAMES, 7)).astype(np.float32)
    theirs = pyannote.Powerset(3, 2).to_multilabel(torch.from_numpy(logprobs), soft=False).numpy()
    np.testing.assert_array_equal(preprocessing.powerset_to_multilabel(logprobs), theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speaker_count_equals_pyannote(pyannote: SimpleNamespace, seed: int) -> None:
    num_chunks = 25
    segmentations = _segmentations(num_chunks, seed)
    starts_s = np.arange(num_chunks) * STEP_S
    theirs = pyannote.speaker_count(SlidingWindowFeature(segmentations, _chunk_window(num_chunks)), _frames(),
                                    warm_up=(0.0, 0.0)).data[:, 0]
    ours = preprocessing.speaker_count(segmentations, starts_s)
    assert ours.shape[0] <= theirs.shape[0] and np.all(theirs[ours.shape[0]:] == 0)
    np.testing.assert_array_equal(ours, theirs[: ours.shape[0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_equals_pyannote(pyannote: SimpleNamespace, seed: int) -> None:
    num_chunks, num_clusters = 25, 4
    rng = np.random.default_rng(100 + seed)
    segmentations = _segmentations(num_chunks, seed)
    hard_clusters = np.full((num_chunks, 3), -2, dtype=np.int8)
    for c in range(num_chunks):  # distinct clusters per chunk (constrained assignment); silent slots -2
        active = segmentations[c].sum(axis=0) > 0
        hard_clusters[c, active] = rng.choice(num_clusters, size=3, replace=False)[active]
    starts_s = np.arange(num_chunks) * STEP_S
    count = preprocessing.speaker_count(segmentations, starts_s)
    chunks = SlidingWindowFeature(segmentations, _chunk_window(num_chunks))
    their_count = pyannote.speaker_count(chunks, _frames(), warm_up=(0.0, 0.0))
    their_count.data = their_count.data.astype(np.int8)
    theirs = pyannote.reconstruct(chunks, hard_clusters, their_count).data
    ours = reconstruction.reconstruct(segmentations, hard_clusters, count, starts_s,
                                      num_clusters=int(hard_clusters.max()) + 1, require_positive_activation=False)
    assert theirs.shape[1] == ours.shape[1]
    theirs_common = theirs[: ours.shape[0]].astype(np.uint8)
    assert np.all(theirs[ours.shape[0]:] == 0)
    activations = reconstruction.cluster_activations(segmentations, hard_clusters, num_clusters=ours.shape[1])
    summed = np.nan_to_num(preprocessing.overlap_add(activations, starts_s, SEGMENTATION_FRAMES,
                                                     num_out_frames=ours.shape[0], average=False))
    differ = np.flatnonzero(np.any(ours != theirs_common, axis=1))
    ranked = -np.sort(-summed, axis=1)
    k = count.astype(np.int64)
    tie = (k > 0) & (k < summed.shape[1])
    tie[tie] = ranked[tie, k[tie] - 1] == ranked[tie, k[tie]]
    assert np.all(tie[differ]), f"frames {differ[~tie[differ]][:5]} differ without a tie"
    for t in differ:  # same activations picked, only the tied cluster indices differ
        assert sorted(summed[t, ours[t] > 0]) == sorted(summed[t, theirs_common[t] > 0])
