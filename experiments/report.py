"""Team review of a sweep, read from MLflow: recommendation, Pareto front, timings, axis effects, parity.

    python experiments/report.py                          # the latest sweep of experiment "diaropt"
    python experiments/report.py diaropt --parent RUN_ID --der-tolerance 0.005 --install-preset
    python experiments/report.py --tracking-uri sqlite:////tmp/demo/mlflow.db --out /tmp/report

Writes outputs/reports/<parent run id>/report.md and report.html (self-contained), the plots and a
Hydra preset of the recommended run; logs them on the parent run (artifacts under report/) and tags
the recommended child ``diaropt.recommended=true``. Library: src/diaropt/report/ (the package diaropt.report).
"""

from __future__ import annotations

import sys

from diaropt.quiet import quiet_third_party

quiet_third_party()  # before coremltools is imported

from diaropt.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
