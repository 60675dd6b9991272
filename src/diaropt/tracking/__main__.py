"""``python -m diaropt.tracking relog DIR... [--tracking-uri URI] [--experiment NAME]``."""

from __future__ import annotations

import sys

from diaropt.tracking.relog import main

if __name__ == "__main__":
    sys.exit(main())
