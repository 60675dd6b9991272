"""Third-party messages that do not apply on this host are dropped; others and ours are kept."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging
from diaropt.quiet import quiet_third_party
quiet_third_party()
import coremltools
logging.getLogger("coremltools").warning("an unrelated coremltools warning")
logging.getLogger("diaropt.sweep").warning("a diaropt warning")
"""


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS libcoremlpython loads: nothing to silence")
def test_coremltools_noise_is_dropped_and_the_rest_kept() -> None:
    pytest.importorskip("coremltools")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    assert "libcoremlpython" not in done.stderr
    assert "scikit-learn version" not in done.stderr
    assert "has not been tested with coremltools" not in done.stderr
    assert "an unrelated coremltools warning" in done.stderr
    assert "a diaropt warning" in done.stderr
