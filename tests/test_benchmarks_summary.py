"""The benchmark scripts' bookkeeping (no benchmark is run): the review summary reads the results
files and judges the targets from their numbers; the long-form benchmark finds the installed preset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diaropt.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import long_form  # noqa: E402
import summarize  # noqa: E402


def _spread(median: float, low: float, high: float) -> dict[str, float]:
    return {"median": median, "min": low, "max": high, "n": 3}


def _entry(total_s: float, der: float, embedding_share: float, speedup: tuple[float, float, float],
           delta_pts: float) -> dict:
    return {"timing": {"time_total_s": _spread(total_s, total_s * 0.9, total_s * 1.1),
                       "rtfx": _spread(1020 / total_s, 1020 / total_s / 1.1, 1020 / total_s / 0.9)},
            "share": {"segmentation": 0.1, "embedding": embedding_share},
            "scores": {"der_pyannote": der, "der_fluidaudio": der - 0.1},
            "speedup_vs_seed_baseline": {"total": _spread(*speedup)},
            "der_delta_vs_seed_baseline_pts": delta_pts}


def _write_results(folder: Path, recommended_speedup: float, recommended_delta_pts: float,
                   peak_60min_bytes: int, default_embedding_share: float = 0.88) -> None:
    common = {"commit": "0123456789abcdef", "date": "2026-11-25", "load_average_start": {"load_1min": 0.2},
              "cpu_count_usable": 2}
    recommended = _entry(70.0, 0.49 + recommended_delta_pts / 100, 0.7,
                         (recommended_speedup, recommended_speedup - 0.2, recommended_speedup + 0.1),
                         recommended_delta_pts)
    long_form_result = {**common, "repeats": 3, "status": "complete",
                        "recommended": {"overrides": ["experiment=recommended_x"], "source": "test"},
                        "recordings": {"ami": {"duration_s": 1020.0, "num_speakers_reference": 25,
                                               "overlap_fraction_reference": 0.25}},
                        "results": {"ami": {"seed_baseline": _entry(230.0, 0.49, 0.9, (1, 1, 1), 0.0),
                                            "default": _entry(200.0, 0.49, default_embedding_share, (1.15, 1.1, 1.2), 0.0),
                                            "recommended": recommended}}}
    run = {"time_total_s": 1.0, "rtfx": 1.0, "time_segmentation_s": 0.1, "time_embedding_s": 0.8,
           "der_pyannote": 0.5}
    scaling_result = {**common, "runs": [{**run, "length_min": 1, "peak_rss_bytes": 900 << 20},
                                         {**run, "length_min": 60, "peak_rss_bytes": peak_60min_bytes}],
                      "fits": {"time_total_s": {"loglog_exponent": 1.0, "r2": 0.99, "verdict": "linear"},
                               "peak_rss_bytes": {"loglog_exponent": 0.1, "r2": 0.9, "verdict": "constant"}},
                      "memory_growth_mb_per_hour": 400.0, "kept_arrays_mb_longest": {"audio_float32": 220.0}}
    (folder / "long_form.json").write_text(json.dumps(long_form_result))
    (folder / "scaling.json").write_text(json.dumps(scaling_result))


def test_summary_judges_targets_from_the_results(tmp_path: Path) -> None:
    _write_results(tmp_path, recommended_speedup=3.3, recommended_delta_pts=0.1, peak_60min_bytes=1500 << 20)
    text = summarize.summarize(tmp_path)
    assert "(long_form.json): recommended vs seed_baseline 3.30x (median; min 3.10x) — ≥ 3x met; DER +0.10 pts — ≤ +0.5 met" in text
    assert "embedding share of the default configuration 88.0 % — below the design note's 46.5 % **not met**" in text
    assert "60 min file: 1500 MiB — < 2048 MiB met" in text
    assert "Not found (not run yet): compute_limit, profile_default" in text
    assert "peak_rss_bytes |" not in text  # memory is described by its growth, not a log-log verdict

    _write_results(tmp_path, recommended_speedup=2.4, recommended_delta_pts=0.7, peak_60min_bytes=2500 << 20,
                   default_embedding_share=0.40)
    text = summarize.summarize(tmp_path)
    assert "embedding share of the default configuration 40.0 % — below the design note's 46.5 % met" in text
    assert "2.40x (median; min 2.20x) — ≥ 3x **not met**; DER +0.70 pts — ≤ +0.5 **not met**" in text
    assert "2500 MiB — < 2048 MiB **not met**" in text


def test_long_form_prefers_the_installed_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diaropt.config

    (tmp_path / "experiment").mkdir()
    monkeypatch.setattr(diaropt.config, "CONF_DIR", tmp_path)
    (tmp_path / "experiment" / "recommended_aaaa1111.yaml").write_text("# @package _global_\n")
    found = long_form.report_preset()
    assert found is not None
    overrides, source = found
    assert overrides == ["experiment=recommended_aaaa1111"]
    assert source.endswith("recommended_aaaa1111.yaml")
