"""Silence third-party messages that do not apply on this host, in one place (:func:`quiet_third_party`).

Called at the entry points (``experiments/*.py``, ``python -m diaropt``, the report) before anything
imports coremltools. Only messages known not to apply are dropped; diaropt's own messages and every
other third-party warning are kept.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

#: coremltools messages that do not apply: (pattern, when it does not apply).
_COREMLTOOLS_NOISE = (
    # Apple's runtime bindings exist only on macOS; off macOS diaropt never calls them (its Core ML
    # backend reports the job as not executable, and the ML-program executor stands in).
    (re.compile(r"libcoremlpython|RemoteProxy'\. Remote device functionality"), sys.platform != "darwin"),
    # diaropt converts from torch/ONNX only, never from scikit-learn.
    (re.compile(r"^scikit-learn version .* is not supported"), True),
    # diaropt's conversions are checked against torch by the parity check of every job, whatever the
    # torch version coremltools was tested with.
    (re.compile(r"^Torch version .* has not been tested with coremltools"), True),
)


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(applies and pattern.search(message) for pattern, applies in _COREMLTOOLS_NOISE)


_FILTER = _Drop()


def quiet_third_party() -> None:
    """Install the filter on coremltools' loggers (idempotent; call before importing coremltools), and
    turn third-party tqdm bars off when stderr is not a terminal (``diaropt.progress``).

    Also drops Hydra's notice that ``conf/hydra/launcher/joblib.yaml`` is merged with the joblib
    plugin's schema of the same name: diaropt's file replaces the plugin's launcher on purpose and
    accepts every field of that schema (:mod:`diaropt.launcher`).
    """
    from diaropt.progress import plain_output_off_terminal

    plain_output_off_terminal()
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema",
                            category=UserWarning)
    for name in ("coremltools", "coremltools.models.model", "coremltools.models.compute_plan"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
