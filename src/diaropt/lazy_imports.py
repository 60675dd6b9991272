"""Third-party imports the command line defers until they are used (issue 19, start-up).

``import pyannote.core`` (6.1) builds its notebook display at import time (``notebook = Notebook()``
in ``pyannote/core/notebook.py``), which imports ``matplotlib.pyplot``: about 0.4-0.6 s of every
``python -m diaropt diarize`` start-up on the 2-core benchmark host (``benchmarks/startup_profile.py``,
``python -X importtime``), for a display the command never shows. :func:`import_pyannote_core_without_pyplot`
imports pyannote.core with matplotlib hidden, so pyannote.core takes its own "matplotlib is not
installed" path, then gives ``pyannote.core.notebook`` back on first use (it then imports matplotlib).

Used by the command line only; a library import of diaropt (notebooks, tests) imports pyannote.core as is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType

__all__ = ["import_pyannote_core_without_pyplot"]


class _HideMatplotlib(importlib.abc.MetaPathFinder):
    """A finder that makes ``matplotlib`` and its submodules unimportable while installed."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "matplotlib" or fullname.startswith("matplotlib."):
            raise ModuleNotFoundError(f"{fullname} deferred by diaropt.lazy_imports", name=fullname)
        return None


def _notebook_on_first_use(core: ModuleType):
    def __getattr__(name: str):  # PEP 562: called only for attributes the module does not have
        if name != "notebook":
            raise AttributeError(f"module 'pyannote.core' has no attribute {name!r}")
        from pyannote.core.notebook import notebook  # the Notebook instance; imports matplotlib now

        core.notebook = notebook  # the submodule import bound the module object to this name
        return notebook

    return __getattr__


def import_pyannote_core_without_pyplot() -> ModuleType:
    """Import and return ``pyannote.core`` without importing matplotlib.

    A no-op (plain import) when pyannote.core or matplotlib is already imported. Afterwards
    ``from pyannote.core import notebook`` still returns pyannote.core's ``Notebook`` instance: it is
    built on first access. Raises whatever ``import pyannote.core`` raises.
    """
    if "pyannote.core" in sys.modules or "matplotlib" in sys.modules:
        return importlib.import_module("pyannote.core")
    hide = _HideMatplotlib()
    sys.meta_path.insert(0, hide)
    try:
        core = importlib.import_module("pyannote.core")
    finally:
        sys.meta_path.remove(hide)
    if "notebook" not in vars(core):
        core.__getattr__ = _notebook_on_first_use(core)
    return core
